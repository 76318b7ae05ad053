# Re-exports only: nnUNetTrainerCPS and its budget variants (see nnunet_foundation/methods/cps.py).
from nnunet_foundation.methods.cps import *  # noqa: F401,F403
