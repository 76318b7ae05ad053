"""nnunet-foundation: label-efficient nnU-Net v2 training.

Semi-supervised trainers (Mean Teacher, CPS, ...) and foundation-model guided trainers (SemiSAM, SynFoC, ...)
that plug into the stock ``nnUNetv2_train`` / ``nnUNetv2_predict`` commands through ``nnUNet_extTrainer``.

This module must stay import-light: nnU-Net imports trainer modules during its trainer lookup, and a missing
optional dependency (segment_anything, sam2) must never break that.
"""
__version__ = "0.1.0"
