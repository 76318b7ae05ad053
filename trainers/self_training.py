# Re-exports only: nnUNetTrainerSelfTraining and its budget variants
# (see nnunet_foundation/methods/self_training.py).
from nnunet_foundation.methods.self_training import *  # noqa: F401,F403
