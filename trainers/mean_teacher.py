# Re-exports only: nnUNetTrainerMeanTeacher and its budget variants (see nnunet_foundation/methods/mean_teacher.py).
from nnunet_foundation.methods.mean_teacher import *  # noqa: F401,F403
