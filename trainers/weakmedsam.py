# Re-exports only: nnUNetTrainerWeakMedSAM and its budget variants (see nnunet_foundation/methods/weakmedsam/trainer.py).
from nnunet_foundation.methods.weakmedsam.trainer import *  # noqa: F401,F403
