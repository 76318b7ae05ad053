"""IFL's uncertainty-aware key slices: where, per class and case, to prompt the foundation model, chosen from the
history of nnU-Net's predictions over the rounds (never from labels).

IFL (Yin et al., MICCAI 2025) publishes only its abstract; this design is ours. Per class c and slice z of a case,
with ``history`` the softmax maps of the last K rounds (oldest first):

* region: the voxels the latest round labels c on that slice (a slice without them is not a candidate);
* uncertainty(c, z) = mean over the region of the binary entropy of the rounds' mean probability of c (in bits, so
  0..1), + ``disagreement_weight`` x (1 - mean Dice of c between consecutive rounds on that slice): a slice whose
  prediction the rounds keep changing is not a good place to prompt, however confident the last round is;
* key slices: among slices whose region covers at least ``min_area_fraction`` of the class's largest slice (and
  ``min_pixels``), the class's extent is cut into ``num_key_slices`` equal parts and each part gives its least
  uncertain slice, so prompts spread through the structure instead of piling up where it is easiest;
* prompts: from the latest round's prediction on a key slice: its box, its mask, and one interior point (the pixel
  deepest inside the region).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np


@dataclass(frozen=True)
class KeySliceSettings:
    num_key_slices: int = 3
    min_area_fraction: float = 0.3
    min_pixels: int = 10
    disagreement_weight: float = 1.0


@dataclass
class KeySlice:
    class_index: int
    slice_index: int
    uncertainty: float
    box: np.ndarray            # (x0, y0, x1, y1), pixel coordinates, inclusive (SAM's convention)
    mask: np.ndarray           # (h, w) bool, the latest round's region
    point: np.ndarray          # (x, y), the pixel deepest inside the region


def _binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def mask_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1 where both are empty (they agree that nothing is there)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def slice_uncertainty(history: Sequence[np.ndarray], class_index: int, disagreement_weight: float = 1.0) -> np.ndarray:
    """``(Z,)`` uncertainty of class ``class_index`` per slice (axis 1 of each ``(K, Z, Y, X)`` softmax map); inf
    where the latest round has no voxel of the class. ``history``: oldest round first."""
    if not history:
        raise ValueError("slice_uncertainty needs at least one round's prediction")
    latest = history[-1].argmax(0) == class_index
    mean_probability = np.mean([h[class_index] for h in history], axis=0)
    entropy = _binary_entropy_bits(mean_probability)
    masks = [h.argmax(0) == class_index for h in history]
    out = np.full(latest.shape[0], np.inf)
    for z in range(latest.shape[0]):
        region = latest[z]
        if not region.any():
            continue
        changes = [1 - mask_dice(a[z], b[z]) for a, b in zip(masks[:-1], masks[1:])]
        out[z] = float(entropy[z][region].mean()) + disagreement_weight * (float(np.mean(changes)) if changes else 0.0)
    return out


def _deepest_point(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(mask)
    y, x = np.unravel_index(int(depth.argmax()), mask.shape)
    return np.array([x, y], dtype=np.float32)


def key_slices(history: Sequence[np.ndarray], settings: KeySliceSettings = KeySliceSettings()
               ) -> Dict[int, List[KeySlice]]:
    """Key slices per foreground class of one case (classes the latest round does not predict are left out)."""
    latest = history[-1].argmax(0)
    chosen: Dict[int, List[KeySlice]] = {}
    for c in range(1, history[-1].shape[0]):
        areas = (latest == c).reshape(latest.shape[0], -1).sum(1)
        if areas.max() < settings.min_pixels:
            continue
        candidates = np.flatnonzero((areas >= max(settings.min_pixels, settings.min_area_fraction * areas.max())))
        uncertainty = slice_uncertainty(history, c, settings.disagreement_weight)
        parts = np.array_split(candidates, min(settings.num_key_slices, len(candidates)))
        picked = []
        for part in parts:
            z = int(part[np.argmin(uncertainty[part])])
            mask = latest[z] == c
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)
            picked.append(KeySlice(c, z, float(uncertainty[z]), box, mask, _deepest_point(mask)))
        chosen[c] = picked
    return chosen
