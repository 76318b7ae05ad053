# Re-exports only: nnUNetTrainerSCSAM and its budget variants (see nnunet_foundation/methods/scsam/trainer.py).
from nnunet_foundation.methods.scsam.trainer import *  # noqa: F401,F403
