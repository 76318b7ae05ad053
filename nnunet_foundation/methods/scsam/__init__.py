"""SC-SAM (ISBI 2026, arXiv 2601.17934): ``prompting.py`` (the U-Net's point prompts, the learned prompt tokens and
SAM's prompted multi-class forward), ``trainer.py`` (``nnUNetTrainerSCSAM``) and ``sam_network.py`` (prediction with the
SAM it fine-tunes, prompted by the trained nnU-Net)."""
