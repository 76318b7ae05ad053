# Re-exports only: nnUNetTrainerUAMT and its budget variants (see nnunet_foundation/methods/ua_mt.py).
from nnunet_foundation.methods.ua_mt import *  # noqa: F401,F403
