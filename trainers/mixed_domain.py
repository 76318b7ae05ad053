# Re-exports only: nnUNetTrainerMixedDomain and its budget variants (see nnunet_foundation/methods/mixed_domain.py).
from nnunet_foundation.methods.mixed_domain import *  # noqa: F401,F403
