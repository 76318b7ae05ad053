# Re-exports only: nnUNetTrainerMultiModalSSL and its budget variants (see nnunet_foundation/methods/multimodal/).
from nnunet_foundation.methods.multimodal import *  # noqa: F401,F403
