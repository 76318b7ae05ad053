# Re-exports only (nnU-Net imports every module here and drops it from sys.modules afterwards, so nothing is
# defined in this folder): nnUNetTrainer_smoke, nnUNetTrainer_cpu500, nnUNetTrainer_gpu10k.
from nnunet_foundation.training.baselines import *  # noqa: F401,F403
