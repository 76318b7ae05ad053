# Re-exports only: nnUNetTrainerUniMatch and its budget variants (see nnunet_foundation/methods/unimatch.py).
from nnunet_foundation.methods.unimatch import *  # noqa: F401,F403
