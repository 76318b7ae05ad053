"""SFR (Li et al., "Stitching, Fine-tuning, Re-training: A SAM-enabled Framework for Semi-supervised 3D Medical Image
Segmentation", IEEE TMI 2025, arXiv 2403.11229): ``stitching.py`` (the generalist on native-size slice mosaics),
``fine_tune.py`` (stages 1-2 and SFR+: fine-tuning on stitched labeled patches, the saved generalist),
``trainer.py`` (stage 3: ``nnUNetTrainerSFR``, nnU-Net re-trained with the frozen fine-tuned generalist's
pseudo-labels). ``nnunet-foundation sfr`` (cli/sfr.py) runs stages 1-2."""
from nnunet_foundation.methods.sfr.trainer import *  # noqa: F401,F403
from nnunet_foundation.methods.sfr.trainer import __all__  # noqa: F401
