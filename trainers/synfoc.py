# Re-exports only: nnUNetTrainerSynFoC and its budget variants (see nnunet_foundation/methods/synfoc.py).
from nnunet_foundation.methods.synfoc import *  # noqa: F401,F403
