"""SynFoC's SAM student at prediction time: the shared co-trained-SAM prediction (SynFoC's and SC-SAM's) now lives in
:mod:`nnunet_foundation.foundation.cotrained_sam`; these names are re-exported for the SynFoC trainer and old imports."""
from nnunet_foundation.foundation.cotrained_sam import (SAM_CONFIG_KEY, SAM_STUDENT_KEY, SAM_TEACHER_KEY,  # noqa: F401
                                                        SAMStudentNetwork, load_sam_students, predict_sam_student)
