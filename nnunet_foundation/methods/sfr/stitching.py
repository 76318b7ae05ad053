"""The generalist on SFR mosaics: slices of a patch at their native in-plane size, tiled row-major into the
generalist's square input (``foundation/geometry.py``: :class:`MosaicLayout`), one prompt-free multi-class forward
per mosaic, the per-class logits cut back out per slice.

A patch with more slices than one mosaic holds is tiled into consecutive sub-volumes (several mosaics); the released
code drops the extra slices instead. A 2d configuration's patches are single slices: the batch's slices share the
mosaics. Colour images (``image_channel: "rgb"``, e.g. endoscopy) are stitched as colour slices. Intensities are
mapped per slice as the backend expects (LiteMedSAM/MedSAM: min-max to [0, 1]; SAM: to
0-255 and its pixel mean/std) before stitching, so the padding is 0 in model units, as the backends pad.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_foundation.foundation.config import RGB
from nnunet_foundation.foundation.geometry import (MosaicLayout, mosaic_layout, patch_to_slices, slices_to_patch,
                                                   stitch_native, unstitch_native, upsample_low_res)

#: label value of mosaic pixels that are padding (or unlabeled voxels): no loss there
IGNORE = 255


def mosaic_logits(generalist, slices: torch.Tensor) -> Tuple[torch.Tensor, MosaicLayout]:
    """``(N, h, w)`` nnU-Net intensities (or colour slices ``(N, 3, h, w)``, ``image_channel: "rgb"``) ->
    ``(M, K, T, T)`` per-class logits of the mosaics and their layout.

    Gradients flow to the generalist's trainable parts (LoRA, decoder, head) unless the caller runs under
    ``no_grad``."""
    if not (slices.ndim == 3 or (slices.ndim == 4 and slices.shape[1] == 3)):
        raise ValueError(f"expected slices (N, h, w) or colour slices (N, 3, h, w), got shape {tuple(slices.shape)}")
    layout = mosaic_layout(slices.shape[0], slices.shape[-2:], generalist.img_size)
    inputs = generalist.to_model_intensities(slices.to(generalist.device).float())
    mosaics = stitch_native(inputs, layout, pad_value=0.0)
    embeddings = generalist.encode(mosaics)
    with generalist._autocast():
        low_res = generalist.multiclass_head(embeddings, generalist.sam.prompt_encoder)
    return upsample_low_res(low_res.float(), generalist.img_size), layout


def stitched_slice_logits(generalist, slices: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` (or ``(N, 3, h, w)``) -> ``(N, K, h, w)`` logits, through mosaics (stitch -> forward ->
    un-stitch)."""
    logits, layout = mosaic_logits(generalist, slices)
    return unstitch_native(logits, layout)


def mosaic_loss(generalist, slices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SFR's fine-tuning loss on one batch of labeled slices ``(N, h, w)`` / ``(N, h, w)`` (values ``IGNORE`` or
    < 0 are not counted): 0.5 (cross-entropy + Dice) over the mosaic pixels that hold a labeled voxel, padding
    ignored."""
    from nnunet_foundation.training.losses import ce_dice

    logits, layout = mosaic_logits(generalist, slices)
    target = stitch_native(labels.to(logits.device).long()[:, None], layout, pad_value=IGNORE, labels=True)[:, 0]
    known = (target >= 0) & (target != IGNORE)
    return 0.5 * ce_dice(logits, torch.where(known, target, torch.zeros_like(target)), known)


# ------------------------------------------------------------------------------------------------ patches
def patch_slices(images: torch.Tensor, axis: int, channel=0) -> torch.Tensor:
    """``(B, C, [D,] H, W)`` patches -> ``(B * S, h, w)`` slices of input ``channel`` along ``axis`` (2D: S = 1);
    ``channel="rgb"``: ``(B * S, 3, h, w)`` colour slices of channels 0-2."""
    colour = channel == RGB
    x = images[:, :3] if colour else images[:, int(channel):int(channel) + 1]
    if images.ndim == 4:
        return x if colour else x[:, 0]
    x = patch_to_slices(x, axis).transpose(1, 2)  # (B, S, C', h, w)
    return x.reshape(-1, *x.shape[2:]) if colour else x.reshape(-1, *x.shape[-2:])


def slices_to_patches(slices: torch.Tensor, batch: int, axis: int, is_2d: bool) -> torch.Tensor:
    """Inverse of :func:`patch_slices` for ``(B * S, K, h, w)`` maps -> ``(B, K, [D,] H, W)``."""
    if is_2d:
        return slices
    s = slices.shape[0] // batch
    x = slices.reshape(batch, s, *slices.shape[1:]).transpose(1, 2)  # (B, K, S, h, w)
    return slices_to_patch(x, axis)


def stitched_patch_logits(generalist, images: torch.Tensor, axis: int, channel=0) -> torch.Tensor:
    """``(B, C, [D,] H, W)`` patches -> ``(B, K, [D,] H, W)`` logits of the SFR generalist, every slice along
    ``axis`` (2D patches: the batch's images share the mosaics)."""
    logits = stitched_slice_logits(generalist, patch_slices(images, axis, channel))
    return slices_to_patches(logits, images.shape[0], axis, images.ndim == 4)


def tiled_slice_logits(generalist, slices: torch.Tensor, tile_hw: Sequence[int], chunk: int = 64) -> torch.Tensor:
    """Whole slices ``(N, h, w)`` (or colour ``(N, 3, h, w)``) of any size -> ``(N, K, h, w)`` logits: slices
    larger than ``tile_hw`` (the training patch's in-plane size) are cut into non-overlapping tiles of that size (the
    last ones padded), so the generalist sees them at the native scale it was fine-tuned at; ``chunk`` tiles per
    forward bound the memory."""
    colour = slices.ndim == 4
    x = slices.float() if colour else slices.float()[:, None]  # (N, C', h, w)
    n, c, h, w = x.shape
    th, tw = min(int(tile_hw[0]), h), min(int(tile_hw[1]), w)
    ny, nx = -(-h // th), -(-w // tw)
    padded = F.pad(x, (0, nx * tw - w, 0, ny * th - h), mode="replicate")
    tiles = padded.reshape(n, c, ny, th, nx, tw).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, th, tw)
    tiles = tiles if colour else tiles[:, 0]
    out = torch.cat([stitched_slice_logits(generalist, tiles[i:i + chunk]).cpu()
                     for i in range(0, tiles.shape[0], chunk)])
    k = out.shape[1]
    out = out.reshape(n, ny, nx, k, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, k, ny * th, nx * tw)
    return out[..., :h, :w]
