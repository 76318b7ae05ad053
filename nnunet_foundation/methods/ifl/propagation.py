"""IFL's slice-to-slice propagation with a box-prompted 2D generalist (LiteMedSAM by default: it runs with real
weights everywhere), one class at a time.

From each key slice (keyframes.py) the generalist segments the slice with the box of nnU-Net's region there, then
walks away from it in both directions: the next slice gets the box of the mask just made, grown by ``margin_pixels``.
The walk stops when the mask vanishes (fewer than ``min_pixels``), when it disagrees with nnU-Net where nnU-Net sees
the class (Dice below ``min_agreement``), when it balloons where nnU-Net sees nothing (area above ``max_growth`` x the
previous slice's: a leak into a neighbour), or at a slice an earlier walk of the same class already reached. Where
nnU-Net misses the class but the structure continues, the walk goes on: that is what a generalist can add.

Semantic-aware memory (the LiteMedSAM path of IFL's per-class memory groups; ours): each class has its own walks and
state, never seeded by another class's masks; classes meet only in :func:`combine_classes`, which resolves a voxel
claimed by several classes by the highest probability.

With SAM2's video predictor (``backend: sam2_video``; :func:`propagate_class_video`) the slices are the frames of a
video: all frames are encoded once per case, and each class is one tracked object with its own memory (the state is
reset between classes, so no class's memory conditions another's), conditioned on that class's key-slice boxes and
propagated both ways by SAM2 itself. The same stopping rules then cut each track where, walking away from a key
slice, a frame's mask vanishes, SAM2 judges the object absent, or the mask disagrees with nnU-Net or balloons.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
import torch

from nnunet_foundation.methods.ifl.keyframes import KeySlice, mask_dice


@dataclass(frozen=True)
class PropagationSettings:
    margin_pixels: int = 3
    min_pixels: int = 10
    min_agreement: float = 0.5
    max_growth: float = 1.6


def _box_of(mask: np.ndarray, margin: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([max(xs.min() - margin, 0), max(ys.min() - margin, 0), min(xs.max() + margin, w - 1),
                     min(ys.max() + margin, h - 1)], dtype=np.float32)  # inclusive, as SAM's boxes


def segment_with_box(generalist, image_slice: np.ndarray, box: np.ndarray, class_index: int,
                     cache_key=None) -> np.ndarray:
    """The generalist's foreground probability ``(h, w)`` for one slice (nnU-Net intensities, ``(h, w)`` or colour
    ``(3, h, w)``) and one box. ``cache_key`` names the slice for the backend's embedding cache (SAM/MedSAM/
    LiteMedSAM with ``cache_embeddings``): a slice that several classes' walks visit is encoded once, the costly part
    (LiteMedSAM: about 2.5 s per slice on two CPU cores, against 75 ms per decoder call)."""
    from nnunet_foundation.foundation.prompts import SlicePrompt

    prompt = SlicePrompt(batch_index=0, class_index=class_index, slice_index=0,
                         points=torch.zeros((0, 2), dtype=torch.float32), labels=torch.zeros((0,), dtype=torch.long),
                         box=torch.from_numpy(box.astype(np.float32)))
    keyed = cache_key is not None and hasattr(generalist, "_slice_cache_keys")
    if keyed:
        generalist._slice_cache_keys = [cache_key]
    try:
        with torch.no_grad():
            logits, _, _ = generalist.segment_slices(torch.from_numpy(np.ascontiguousarray(image_slice))[None]
                                                     .float().to(generalist.device), [prompt], [0])
    finally:
        if keyed:
            generalist._slice_cache_keys = None
    return torch.sigmoid(logits[0].float()).cpu().numpy()


def _keeps_going(mask: np.ndarray, previous: np.ndarray, specialist: np.ndarray, settings: PropagationSettings) -> bool:
    """Whether a walk accepts the next slice's mask (see the module docstring for the rules)."""
    if mask.sum() < settings.min_pixels:
        return False
    if specialist.any() and mask_dice(mask, specialist) < settings.min_agreement:
        return False
    return specialist.any() or mask.sum() <= settings.max_growth * previous.sum()


def propagate_class(generalist, volume: np.ndarray, specialist_mask: np.ndarray, starts: Sequence[KeySlice],
                    settings: PropagationSettings = PropagationSettings(), case_key=None
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """(probability ``(Z, H, W)`` of the class, slices reached ``(Z,)`` bool) for one class of one case.

    ``volume``: ``(Z, H, W)`` image (nnU-Net intensities) with slices along the propagation axis, or ``(Z, 3, H, W)``
    colour slices; ``specialist_mask``: nnU-Net's region of the class ``(Z, H, W)``; ``starts``: that class's key
    slices; ``case_key``: names this volume so that slice ``z`` is cached as ``(case_key, z)`` (see
    :func:`segment_with_box`), None: no caching."""
    def key(z: int):
        return None if case_key is None else (case_key, z)

    probability = np.zeros(specialist_mask.shape, np.float32)
    reached = np.zeros(volume.shape[0], bool)
    for start in starts:
        z = start.slice_index
        if reached[z]:
            continue
        p = segment_with_box(generalist, volume[z], start.box, start.class_index, key(z))
        if (p > 0.5).sum() < settings.min_pixels:
            continue
        probability[z], reached[z] = p, True
        for step in (-1, 1):
            previous, k = p > 0.5, z + step
            while 0 <= k < volume.shape[0] and not reached[k]:
                q = segment_with_box(generalist, volume[k], _box_of(previous, settings.margin_pixels),
                                     start.class_index, key(k))
                mask = q > 0.5
                if not _keeps_going(mask, previous, specialist_mask[k], settings):
                    break
                probability[k], reached[k] = q, True
                previous, k = mask, k + step
    return probability, reached


def video_state(generalist, volume: np.ndarray):
    """SAM2's inference state of one case: the slices of ``volume`` ``(Z, H, W)`` as frames, encoded once."""
    from nnunet_foundation.foundation.sam2_backend import _autocast, to_sam2_frames

    generalist.configure_hole_filling()
    with torch.no_grad(), _autocast(generalist.device):
        frames, _ = to_sam2_frames(torch.from_numpy(np.ascontiguousarray(volume)).float().to(generalist.device),
                                   generalist.image_size)
        return generalist.init_state(frames, tuple(volume.shape[1:]))


def propagate_class_video(generalist, state, specialist_mask: np.ndarray, starts: Sequence[KeySlice],
                          settings: PropagationSettings = PropagationSettings()) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`propagate_class` with SAM2's video predictor: one tracked object (this class) conditioned on the box of
    each key slice, propagated both ways by SAM2, then cut by the walk's stopping rules from each key slice."""
    from nnunet_foundation.foundation.prompts import SlicePrompt
    from nnunet_foundation.foundation.sam2_backend import _autocast

    prompts = [SlicePrompt(batch_index=0, class_index=k.class_index, slice_index=k.slice_index,
                           points=torch.zeros((0, 2), dtype=torch.float32), labels=torch.zeros((0,), dtype=torch.long),
                           box=torch.from_numpy(k.box.astype(np.float32))) for k in starts]
    with torch.no_grad(), _autocast(generalist.device):
        logits, scores = generalist.track(state, prompts)
    tracked = torch.sigmoid(logits.float()).cpu().numpy()
    present = np.ones(len(tracked), bool) if scores is None else scores.float().cpu().numpy() > 0.5
    probability = np.zeros(tracked.shape, np.float32)
    reached = np.zeros(len(tracked), bool)
    for start in starts:
        z = start.slice_index
        if reached[z] or not present[z] or (tracked[z] > 0.5).sum() < settings.min_pixels:
            continue
        probability[z], reached[z] = tracked[z], True
        for step in (-1, 1):
            previous, k = tracked[z] > 0.5, z + step
            while 0 <= k < len(tracked) and not reached[k] and present[k]:
                mask = tracked[k] > 0.5
                if not _keeps_going(mask, previous, specialist_mask[k], settings):
                    break
                probability[k], reached[k] = tracked[k], True
                previous, k = mask, k + step
    return probability, reached


def combine_classes(probabilities: List[np.ndarray], threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray]:
    """(label map, confidence) from per-class probabilities (class 1 first): each voxel takes the most probable class
    above ``threshold``, background elsewhere; confidence = that probability (1 - the largest one for background)."""
    stacked = np.stack(probabilities)
    best = stacked.argmax(0)
    top = stacked.max(0)
    label = np.where(top > threshold, best + 1, 0).astype(np.uint8)
    confidence = np.where(top > threshold, top, 1 - top).astype(np.float32)
    return label, confidence
