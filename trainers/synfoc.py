# Re-exports only: nnUNetTrainerSynFoC and its budget variants (see nnunet_foundation/methods/synfoc/trainer.py).
from nnunet_foundation.methods.synfoc.trainer import *  # noqa: F401,F403
