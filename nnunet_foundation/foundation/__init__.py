"""Foundation models (SAM, MedSAM, SAM2) as promptable generalists for nnU-Net patches.

Importing this package imports neither ``segment_anything`` nor ``sam2``: backends load in :func:`build_generalist`,
so a missing optional dependency never breaks trainer lookup. Entry points:

* :func:`build_generalist` (a dict / JSON / file / list of them -> frozen :class:`Generalist` or ensemble),
* :class:`GeneralistConfig` (all settings, documented there), :func:`register_backend` (e.g. a native 3D model),
* :class:`GeneralistOutput` (what every generalist returns).
"""
from nnunet_foundation.foundation.checkpoints import CheckpointError
from nnunet_foundation.foundation.config import (GeneralistConfig, GeneralistConfigError, MissingBackendError,
                                                 available_backends, build_generalist, parse_generalist_setting,
                                                 register_backend)
from nnunet_foundation.foundation.generalist import (Generalist, GeneralistEnsemble, GeneralistOutput,
                                                     SliceGeneralist, combine_outputs)

__all__ = ["CheckpointError", "GeneralistConfig", "GeneralistConfigError", "MissingBackendError",
           "available_backends", "build_generalist", "parse_generalist_setting", "register_backend", "Generalist",
           "GeneralistEnsemble", "GeneralistOutput", "SliceGeneralist", "combine_outputs"]
