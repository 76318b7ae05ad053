# Re-exports only: nnUNetTrainerIFLRound1..5 and their budget variants
# (see nnunet_foundation/methods/ifl/trainer.py; the rounds are run by nnunet-foundation ifl).
from nnunet_foundation.methods.ifl.trainer import *  # noqa: F401,F403
