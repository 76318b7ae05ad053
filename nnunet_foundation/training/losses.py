"""Unsupervised loss terms shared by the methods, on softmax outputs.

Shapes: logits and probabilities ``(B, K, *spatial)``; hard (pseudo-)labels and boolean confidence masks
``(B, *spatial)``; soft per-voxel weights ``(B, 1, *spatial)``. Every loss computes in float32 (under AMP too) and
carries gradient only through ``logits``: targets are detached by the caller's ``no_grad`` or here.

:func:`over_scales` applies any of them at every deep-supervision scale with nnU-Net's scale weights, taking a
per-scale list (a teacher's outputs) or one full-resolution target that it downsamples to each scale.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F


def softmax_mse(logits: torch.Tensor, target_probs: torch.Tensor,
                voxel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean squared difference of class probabilities (SSL4MIS ``softmax_mse_loss``); with ``voxel_weight`` the
    weighted mean, sum(w (p - q)^2) / (K sum(w)) (UA-MT's certainty mask, SemiSAM's agreement weight)."""
    squared = (torch.softmax(logits.float(), 1) - target_probs.detach().float()) ** 2
    if voxel_weight is None:
        return squared.mean()
    return (voxel_weight * squared).sum() / (squared.shape[1] * voxel_weight.sum()).clamp_min(1e-6)


def soft_cross_entropy(logits: torch.Tensor, target_probs: torch.Tensor,
                       voxel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy towards class probabilities, -sum_k q_k log p_k per voxel, (weighted) mean over voxels."""
    per_voxel = -(target_probs.detach().float() * torch.log_softmax(logits.float(), 1)).sum(1, keepdim=True)
    if voxel_weight is None:
        return per_voxel.mean()
    return (voxel_weight * per_voxel).sum() / voxel_weight.sum().clamp_min(1e-6)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy towards hard labels, averaged over all voxels or over the ``mask`` (confident) ones only."""
    if mask is None:
        return F.cross_entropy(logits.float(), labels.long())
    mask_f = mask.float()
    per_voxel = F.cross_entropy(logits.float(), labels.long(), reduction="none")
    return (per_voxel * mask_f).sum() / mask_f.sum().clamp_min(1.0)


def dice_loss(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - soft Dice of the softmax towards hard labels, over the batch and the foreground classes, counting only the
    ``mask`` voxels (a pseudo-label is not a target where it is not confident)."""
    probs = torch.softmax(logits.float(), 1)
    one_hot = F.one_hot(labels.long(), probs.shape[1]).movedim(-1, 1).float()
    m = torch.ones_like(probs[:, :1]) if mask is None else mask.float().unsqueeze(1)
    dims = (0,) + tuple(range(2, probs.ndim))
    intersection = (probs * one_hot * m).sum(dims)
    denominator = (probs * m).sum(dims) + (one_hot * m).sum(dims)
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    return 1 - dice[1:].mean()


def ce_dice(logits: torch.Tensor, labels: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`cross_entropy` + :func:`dice_loss`, both restricted to ``mask``: the usual pseudo-label loss."""
    return cross_entropy(logits, labels, mask) + dice_loss(logits, labels, mask)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy ``(B, 1, *spatial)`` of class probabilities, natural log (maximum ln K)."""
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(1, keepdim=True)


def resize_to(target: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """A full-resolution target at a deep-supervision scale: probabilities and soft weights (floating point, with a
    channel axis) by area averaging, hard labels and masks (integer/bool, no channel axis) by nearest neighbour."""
    spatial_shape = tuple(spatial_shape)
    if target.is_floating_point():
        return target if tuple(target.shape[2:]) == spatial_shape else \
            F.interpolate(target, size=spatial_shape, mode="area")
    if tuple(target.shape[1:]) == spatial_shape:
        return target
    return F.interpolate(target.unsqueeze(1).float(), size=spatial_shape, mode="nearest")[:, 0].to(target.dtype)


Target = Union[None, torch.Tensor, Sequence[torch.Tensor]]


def over_scales(loss: Callable[..., torch.Tensor], scale_weights: Sequence[float], outputs: Sequence[torch.Tensor],
                *targets: Target) -> torch.Tensor:
    """sum_k w_k loss(outputs[k], *targets at scale k), skipping scales of weight 0 (nnU-Net's
    ``DeepSupervisionWrapper``). Each target is a list with one entry per scale, one full-resolution tensor that
    :func:`resize_to` brings to each scale, or None. ``scale_weights=(1.0,)`` uses the full resolution only."""
    def at_scale(target: Target, k: int, shape):
        if target is None or isinstance(target, torch.Tensor):
            return None if target is None else resize_to(target, shape)
        return target[k]

    return sum([w * loss(out, *[at_scale(t, k, out.shape[2:]) for t in targets])
                for k, (w, out) in enumerate(zip(scale_weights, outputs)) if w != 0])


__all__ = ["softmax_mse", "soft_cross_entropy", "cross_entropy", "dice_loss", "ce_dice", "entropy", "resize_to",
           "over_scales"]
