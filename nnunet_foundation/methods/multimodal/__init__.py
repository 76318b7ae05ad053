"""Multi-modal SSL: the network (network.py, used through the plans) and the trainer (trainer.py)."""
from nnunet_foundation.methods.multimodal.trainer import *  # noqa: F401,F403
from nnunet_foundation.methods.multimodal.trainer import __all__  # noqa: F401
