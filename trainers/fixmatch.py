# Re-exports only: nnUNetTrainerFixMatch and its budget variants (see nnunet_foundation/methods/fixmatch.py).
from nnunet_foundation.methods.fixmatch import *  # noqa: F401,F403
