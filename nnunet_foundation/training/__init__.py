"""Trainers and the shared semi-supervised machinery. Submodules import nnunetv2 (and torch) on import."""
