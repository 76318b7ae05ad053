"""SynFoC (Ma et al., CVPR 2025): ``math.py`` (the per-iteration mathematics), ``trainer.py``
(``nnUNetTrainerSynFoC``) and ``sam_student.py`` (prediction with the SAM it fine-tunes)."""
