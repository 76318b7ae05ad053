"""Checkpoint files that survive a kill: atomic writes, and a readable fallback when ``--c`` meets a damaged file.

nnU-Net writes checkpoints in place, so a kill during ``torch.save`` (out of memory, a pre-empted job) leaves a
truncated ``checkpoint_latest.pth`` and ``--c`` then dies with "PytorchStreamReader failed reading zip archive",
naming no file. Here a checkpoint is written to a temporary file and renamed over the old one, and reading names the
file and what to do about it.
"""
from __future__ import annotations

import contextlib
import glob
import os
from typing import Callable, Optional, Tuple

import torch

from nnunet_foundation.atomic_files import write_atomically

#: the files nnU-Net's --c looks for, in the order it picks them (run/run_training.py: maybe_load_checkpoint)
RESUME_ORDER = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: where the semi-supervised trainers and the EMA baselines keep, beside the exported ``network_weights``, the state
#: ``--c`` needs - including the trained network's own weights (``student_weights``) when another model is exported
SSL_STATE_KEY = "ssl_state"
EMA_STATE_KEY = "ema_state"
#: the trained network of a run whose checkpoint exports another model, for ``nnUNetv2_predict -chk`` (never resumed)
STUDENT_CHECKPOINT = "checkpoint_student.pth"
#: what nnU-Net's predictor reads from a checkpoint (nnUNetPredictor.initialize_from_trained_model_folder)
_PREDICTOR_KEYS = ("init_args", "trainer_name", "inference_allowed_mirroring_axes")


def was_interrupted(training_folder: str) -> bool:
    """A training folder holding what nnU-Net's ``--c`` continues from without a final checkpoint: a latest one, or
    only the best one (short runs write checkpoint_latest.pth every 50 epochs only, but the best after any epoch)."""
    return not os.path.isfile(os.path.join(training_folder, RESUME_ORDER[0])) and \
        any(os.path.isfile(os.path.join(training_folder, name)) for name in RESUME_ORDER[1:])


class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read; the message names the file and the fix."""


def save_checkpoint_atomically(checkpoint: dict, filename: str) -> None:
    # temporary files of earlier writes that were killed before their rename: the target is intact, they are junk
    folder, name = os.path.split(os.path.abspath(filename))
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    write_atomically(filename, lambda tmp: torch.save(checkpoint, tmp))


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def read_checkpoint(filename: str, map_location) -> dict:
    try:
        # our own trainer's checkpoints hold plain Python objects besides tensors (logging, init args), as nnU-Net's
        return torch.load(filename, map_location=map_location, weights_only=False)
    except Exception as e:  # truncated zip archive, empty file, unpickling error
        raise UnreadableCheckpointError(f"{filename} cannot be read ({_reason(e)}): it is truncated or damaged, "
                                        f"e.g. the process was killed while writing it.") from e


def read_checkpoint_for_resume(filename: str, map_location, allow_fallback: bool,
                               log: Callable[[str], None]) -> Tuple[dict, str]:
    """Read ``filename``; if it is damaged and ``allow_fallback`` (``--c``), read the next readable checkpoint of
    the same folder in nnU-Net's order instead, saying so. Returns (checkpoint, the file it came from).

    The damaged file is never deleted: it may be all that is left of a long run.
    """
    try:
        return read_checkpoint(filename, map_location), filename
    except UnreadableCheckpointError as error:
        damaged = error
    folder, name = os.path.split(filename)
    if allow_fallback and name in RESUME_ORDER:
        for other in RESUME_ORDER:
            candidate = os.path.join(folder, other)
            if other == name or not os.path.isfile(candidate):
                continue
            try:
                checkpoint = read_checkpoint(candidate, map_location)
            except UnreadableCheckpointError as e:
                log(f"WARNING: {e}")
                continue
            log(f"WARNING: {damaged} It is kept as it is. Resuming from {candidate} instead (epoch "
                f"{checkpoint.get('current_epoch')}): the epochs after it are trained again.")
            return checkpoint, candidate
        others = "no other readable checkpoint (" + ", ".join(n for n in RESUME_ORDER if n != name) + \
                 f") is in {folder}. "
    else:
        others = ""
    raise UnreadableCheckpointError(
        f"{damaged} {others[:1].upper() + others[1:]}Restore the file from a backup, or move it away and start the "
        f"run again without --c.")


def student_weights(checkpoint: dict) -> Optional[dict]:
    """The trained network's weights when ``network_weights`` holds another model (an EMA teacher, an EMA of the
    weights), else None (the checkpoint exports the trained network itself, or is nnU-Net's own)."""
    for key in (SSL_STATE_KEY, EMA_STATE_KEY):
        state = checkpoint.get(key)
        if isinstance(state, dict) and state.get("student_weights") is not None:
            return state["student_weights"]
    return None


def write_student_checkpoint(final_checkpoint: str) -> Optional[str]:
    """Beside ``final_checkpoint``, :data:`STUDENT_CHECKPOINT`: what nnU-Net's predictor needs, with the trained
    network's weights as ``network_weights``, so that ``nnUNetv2_predict -chk checkpoint_student.pth`` scores the
    student of a run that exports its teacher. Returns its path, or None when there is no separate student."""
    checkpoint = read_checkpoint(final_checkpoint, "cpu")
    weights = student_weights(checkpoint)
    if weights is None:
        return None
    target = os.path.join(os.path.dirname(os.path.abspath(final_checkpoint)), STUDENT_CHECKPOINT)
    save_checkpoint_atomically({"network_weights": weights, **{k: checkpoint[k] for k in _PREDICTOR_KEYS
                                                               if k in checkpoint}}, target)
    return target
