"""Loading foundation-model checkpoints from local files, with errors that say what is wrong and what to do.

Only local paths are accepted (training nodes are often offline; downloads belong in
``setup_scripts/download_checkpoints.sh``). Files are read with ``torch.load(..., weights_only=True)`` so that a
checkpoint can never execute code. Supported layouts:

* SAM (``sam_vit_b_01ec64.pth`` ...): a plain ``state_dict``;
* MedSAM (``medsam_vit_b.pth``): a SAM ViT-B ``state_dict``, sometimes wrapped as ``{"model": ...}``;
* SAM2 / SAM2.1 (``sam2.1_hiera_tiny.pt`` ...): ``{"model": state_dict}``.

Keys are checked strictly: a missing, unexpected or differently shaped tensor is an error, never a silently
half-loaded model. When the shapes reveal which model the file holds (ViT embedding width, Hiera width and depth),
the error names it, so that the fix ("set model_type to vit_l") is in the message.
"""
from __future__ import annotations

import hashlib
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Dict, Mapping, Optional, Union

import torch

DOWNLOAD_HINT = "download it with setup_scripts/download_checkpoints.sh (or point 'checkpoint' to an existing file)"

# ViT embedding width of the SAM image encoder -> registry name
_SAM_WIDTH_TO_TYPE = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
# (Hiera stem width, number of Hiera blocks) -> SAM2 model type
_HIERA_TO_TYPE = {(96, 12): "hiera_t", (96, 16): "hiera_s", (112, 24): "hiera_b+", (144, 48): "hiera_l"}


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match the configured model."""


def describe_model(family: str, model_type: str) -> str:
    """Human-readable model name used in messages, e.g. ``"SAM vit_b"``, ``"SAM2 hiera_t"``."""
    return f"{family} {model_type}"


def read_state_dict(path: Union[str, os.PathLike], expected: str) -> Dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict.

    Args:
        path: local file.
        expected: description of the model the caller wants (e.g. ``"SAM vit_b"``), used in error messages.

    Raises:
        CheckpointError: the file does not exist, cannot be read safely, or holds no state dict.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path} (expected a {expected} checkpoint); {DOWNLOAD_HINT}.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated zip archives, non-tensor objects refused by weights_only
        raise CheckpointError(f"cannot read checkpoint {path} (expected a {expected} checkpoint): "
                              f"{_describe_load_failure(e, path)}; {DOWNLOAD_HINT}.") from None
    return unwrap_state_dict(obj, path, expected)


def _describe_load_failure(error: Exception, path: Path) -> str:
    """What a failed ``torch.load`` says about the file, in our words.

    torch's own message for anything its safe loader refuses advises re-running with ``weights_only=False``: wrong
    for a damaged file and unsafe for a file of unknown origin, so it is never passed on.
    """
    text = str(error)
    size = path.stat().st_size
    if "PytorchStreamReader" in text or "zip archive" in text or isinstance(error, EOFError) or size == 0:
        return f"the file ({size} bytes) is truncated or damaged (e.g. an interrupted download or copy)"
    if "Weights only load failed" in text or "weights_only" in text:
        return (f"the file ({size} bytes) is damaged or is not a plain checkpoint of tensors: it holds pickled "
                f"Python objects, which are not loaded because unpickling a file can run arbitrary code")
    return f"the file ({size} bytes) is damaged or not a PyTorch checkpoint ({type(error).__name__})"


def unwrap_state_dict(obj, path: Union[str, os.PathLike], expected: str) -> Dict[str, torch.Tensor]:
    """Accept a plain state dict or one nested under ``"model"`` / ``"state_dict"`` (MedSAM, SAM2, Lightning)."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not contain a model state dict (expected a {expected} "
                              f"checkpoint: a dict of tensors, optionally under the key 'model'); {DOWNLOAD_HINT}.")
    # checkpoints saved from DataParallel / DistributedDataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def detect_model_type(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """Guess which model a state dict belongs to from its key names and tensor shapes.

    Returns e.g. ``"SAM vit_b"``, ``"SAM2 hiera_l"``, ``"SAM (ViT width 32)"`` for non-standard sizes, or ``None``
    when the keys are neither SAM's nor SAM2's.
    """
    sam_patch = state_dict.get("image_encoder.patch_embed.proj.weight")
    if sam_patch is not None:
        width = sam_patch.shape[0]
        return describe_model("SAM", _SAM_WIDTH_TO_TYPE[width]) if width in _SAM_WIDTH_TO_TYPE \
            else f"SAM (ViT width {width}, not a released size)"
    hiera_patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if hiera_patch is not None:
        width = hiera_patch.shape[0]
        block_ids = {int(m.group(1)) for k in state_dict
                     if (m := re.match(r"image_encoder\.trunk\.blocks\.(\d+)\.", k))}
        depth = max(block_ids) + 1 if block_ids else 0
        model_type = _HIERA_TO_TYPE.get((width, depth))
        return describe_model("SAM2", model_type) if model_type \
            else f"SAM2 (Hiera width {width}, {depth} blocks, not a released size)"
    return None


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], path: Union[str, os.PathLike],
              expected: str, type_hint: str) -> None:
    """Strictly load ``state_dict`` into ``model``.

    Args:
        type_hint: how to fix a model-type mismatch, e.g. ``"set model_type to one of vit_b, vit_l, vit_h"``.

    Raises:
        CheckpointError: naming the file, the expected model, the model the file seems to hold, and example keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        found = detect_model_type(state_dict)
        found_text = f"it looks like a {found} checkpoint" if found else "its keys belong to neither SAM nor SAM2"
        details = []
        if mismatched:
            k = mismatched[0]
            details.append(f"{len(mismatched)} tensor(s) with other shapes, e.g. {k}: file "
                           f"{tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}")
        if missing:
            details.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise CheckpointError(f"checkpoint {path} does not match the configured {expected} model: {found_text} "
                              f"({'; '.join(details)}). {type_hint[0].upper() + type_hint[1:]}, or {DOWNLOAD_HINT}.")
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model: torch.nn.Module, path: Union[str, os.PathLike], expected: str, type_hint: str) -> None:
    """Read ``path`` and load it strictly into ``model`` (see :func:`read_state_dict` and :func:`load_into`)."""
    load_into(model, read_state_dict(path, expected), path, expected, type_hint)


def file_sha256(path: Union[str, os.PathLike]) -> str:
    """SHA-256 of a file's content, remembered per (path, size, modification time): checkpoints are compared by
    content (resume checks, pseudo-label manifests) and hashing a ViT-H file takes seconds."""
    stat = os.stat(path)
    return _cached_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=64)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
