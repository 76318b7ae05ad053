# Re-exports only: nnUNetTrainerSFR and its budget variants (see nnunet_foundation/methods/sfr/trainer.py).
from nnunet_foundation.methods.sfr import *  # noqa: F401,F403
