"""WeakMedSAM (Wang et al., IEEE TMI 2025, arXiv 2503.04106): segmentation from slice-level labels through SAM with
sub-class exploration and prompt affinity mining. Offline stages in :mod:`.pipeline` (command
``nnunet-foundation weak-labels``), nnU-Net training on the pseudo-masks with :mod:`.trainer`.

Light on purpose: nnU-Net and the settings code import every module of ``nnunet_foundation.methods``, so the
SAM packages are imported only where a model is built.
"""
