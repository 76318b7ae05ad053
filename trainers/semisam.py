# Re-exports only: nnUNetTrainerSemiSAM, nnUNetTrainerSemiSAMUAMT, nnUNetTrainerSemiSAMMixedDomain and their budget variants
# (see nnunet_foundation/methods/semisam.py).
from nnunet_foundation.methods.semisam import *  # noqa: F401,F403
