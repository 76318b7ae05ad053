"""Prompts for a promptable generalist, derived from the specialist's softmax only.

The specialist (the nnU-Net being trained) is the only source of prompts: no function here takes labels, so the same
code serves labelled and unlabelled batches and cannot leak ground truth into pseudo-labels.

For every batch item, foreground class and 2D slice the specialist's confident region of that class is split into
connected components (``scipy.ndimage.label``) and turned into

* positive points: the interior-most pixel (maximum of the Euclidean distance transform) of each component, largest
  component first, cycling through components until ``num_points`` are placed (a placed point suppresses a disk
  of its own distance-to-border radius so the next point in the same component lands elsewhere);
  with ``point_selection="uncertainty"`` (SemiSAM+ style) the distance is weighted by ``1 - normalised entropy``,
  so points go where the specialist is both deep inside the object and certain;
* negative points: the same rule applied to the confident background of that class near the object;
* a box: the bounding box of the union of the components (``box_mode="union"``) or of the largest one, or one
  prompt per component (``"components"``: each with its own box and points, so that the generalist can judge each
  candidate; see ``min_prompt_score`` in the generalist config), with optional integer jitter drawn from a seeded
  ``torch.Generator`` (robustness to imperfect prompts);
* optionally a dense mask prompt: the specialist's class logit ``log(p / (1 - p))``.

Classes that the specialist does not predict confidently on a slice get no prompt on that slice.
Coordinates follow SAM: points ``(x, y)`` = (column, row), boxes ``(x0, y0, x1, y1)`` in slice pixels (inclusive).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

POINT_SELECTIONS = ("max_distance", "uncertainty")
BOX_MODES = ("union", "largest", "components")
# a probability of 1e-4 is a logit of -9.2: the scale of confident SAM low-res logits
_LOGIT_CLIP = 1e-4


@dataclass
class PromptSettings:
    """How prompts are derived from the specialist's probabilities (the prompt part of ``GeneralistConfig``)."""

    num_points: int = 1
    num_negative_points: int = 0
    use_box: bool = True
    box_mode: str = "union"
    box_jitter: int = 0
    use_mask_prompt: bool = False
    fg_threshold: float = 0.5
    bg_threshold: float = 0.9
    point_selection: str = "max_distance"
    min_component_size: int = 1

    def __post_init__(self):
        if self.point_selection not in POINT_SELECTIONS:
            raise ValueError(f"point_selection must be one of {POINT_SELECTIONS}, got {self.point_selection!r}")
        if self.box_mode not in BOX_MODES:
            raise ValueError(f"box_mode must be one of {BOX_MODES}, got {self.box_mode!r}")
        if self.num_points < 0 or self.num_negative_points < 0 or self.box_jitter < 0:
            raise ValueError("num_points, num_negative_points and box_jitter must be >= 0")
        if self.num_points == 0 and not self.use_box and not self.use_mask_prompt:
            raise ValueError("no prompt type is enabled: set num_points > 0, use_box or use_mask_prompt")
        if not (0.0 <= self.fg_threshold <= 1.0 and 0.0 <= self.bg_threshold <= 1.0):
            raise ValueError("fg_threshold and bg_threshold are probabilities in [0, 1]")


@dataclass
class SlicePrompt:
    """The prompt for one (batch item, class, slice).

    Attributes:
        points: ``(N, 2)`` float32 ``(x, y)`` slice pixel coordinates (positives first, then negatives).
        labels: ``(N,)`` int64, 1 = foreground point, 0 = background point.
        box: ``(4,)`` float32 ``(x0, y0, x1, y1)`` or ``None``.
        mask: ``(h, w)`` float32 logits of the class (dense prompt) or ``None``.
        area: number of confident foreground pixels of the class on this slice (used to pick video key slices).
    """

    batch_index: int
    class_index: int
    slice_index: int
    points: torch.Tensor
    labels: torch.Tensor
    box: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    area: int = 0

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])


@dataclass
class VolumePrompt:
    """A 3D prompt for one (batch item, class), for volumetric or propagation-based generalists.

    Attributes:
        points: ``(N, 3)`` float32 ``(x, y, s)`` (slice index last) interior points of the largest 3D components.
        box: ``(6,)`` float32 ``(x0, y0, s0, x1, y1, s1)`` of the union of the confident components.
        key_slice: slice with the largest confident area (where a 2D prompt is most informative).
    """

    batch_index: int
    class_index: int
    points: torch.Tensor
    box: torch.Tensor
    key_slice: int
    area: int = 0


@dataclass
class PromptSet:
    """All prompts of a batch; ``slices`` has one entry per prompted (batch item, class, slice)."""

    slices: List[SlicePrompt] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slices)

    def __iter__(self):
        return iter(self.slices)

    def for_class(self, batch_index: int, class_index: int) -> List[SlicePrompt]:
        return [p for p in self.slices if p.batch_index == batch_index and p.class_index == class_index]


# ---------------------------------------------------------------------------------------------------- helpers
def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """``(K, ...)`` probabilities -> entropy / log(K) in ``[0, 1]`` (0 = certain)."""
    k = probs.shape[0]
    p = np.clip(probs, 1e-12, 1.0)
    return (-(p * np.log(p)).sum(0) / np.log(max(k, 2))).clip(0.0, 1.0)


def _distance_inside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance to the nearest non-mask pixel, treating everything outside the array as non-mask (so
    points stay away from patch borders, where the specialist has the least context)."""
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded)
    return dist[(slice(1, -1),) * mask.ndim]


def _pick_points(score: np.ndarray, component_labels: np.ndarray, component_ids: Sequence[int], count: int,
                 radius_map: np.ndarray) -> List[np.ndarray]:
    """Up to ``count`` maxima of ``score``, one per component in the given order, cycling through the components.

    After a pick, a ball of radius ``max(1, radius_map[pick])`` around it is excluded, so repeated picks in one
    component spread out. Ties resolve to the first pixel in C order: fully deterministic.
    """
    if count <= 0 or not component_ids:
        return []
    available = np.zeros(score.shape, dtype=bool)
    for cid in component_ids:
        available |= component_labels == cid
    grid = np.indices(score.shape)
    picks: List[np.ndarray] = []
    while len(picks) < count:
        picked_this_round = False
        for cid in component_ids:
            if len(picks) >= count:
                break
            candidates = available & (component_labels == cid)
            if not candidates.any():
                continue
            masked = np.where(candidates, score, -np.inf)
            pick = np.array(np.unravel_index(int(np.argmax(masked)), score.shape))
            picks.append(pick)
            picked_this_round = True
            radius = max(1.0, float(radius_map[tuple(pick)]))
            dist2 = sum((g - c) ** 2 for g, c in zip(grid, pick))
            available &= dist2 > radius * radius
        if not picked_this_round:
            break
    return picks


def _components(mask: np.ndarray, min_size: int):
    """Connected components (face connectivity) of ``mask``, largest first, those below ``min_size`` dropped."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return labels, [], np.zeros(1, dtype=np.int64)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ids = [i for i in range(1, n + 1) if sizes[i] >= min_size]
    ids.sort(key=lambda i: (-sizes[i], i))
    return labels, ids, sizes


def _bbox(mask: np.ndarray) -> np.ndarray:
    """Inclusive ``(x0, y0, x1, y1)`` of a 2D boolean mask."""
    rows = np.flatnonzero(mask.any(1))
    cols = np.flatnonzero(mask.any(0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def _jitter_box(box: np.ndarray, jitter: int, hw: Sequence[int], generator: Optional[torch.Generator]) -> np.ndarray:
    noise = torch.randint(-jitter, jitter + 1, (4,), generator=generator).numpy().astype(np.float32)
    out = box + noise
    out[[0, 2]] = out[[0, 2]].clip(0, hw[1] - 1)
    out[[1, 3]] = out[[1, 3]].clip(0, hw[0] - 1)
    x0, x1 = sorted(out[[0, 2]])
    y0, y1 = sorted(out[[1, 3]])
    return np.array([x0, y0, x1, y1], dtype=np.float32)


def class_logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(probs, _LOGIT_CLIP, 1.0 - _LOGIT_CLIP)
    return np.log(p / (1.0 - p)).astype(np.float32)


# ----------------------------------------------------------------------------------------------- 2D prompts
def prompts_for_slice(probs: np.ndarray, settings: PromptSettings, generator: Optional[torch.Generator] = None,
                      batch_index: int = 0, slice_index: int = 0) -> List[SlicePrompt]:
    """Prompts for every foreground class present on one slice.

    Args:
        probs: ``(K, h, w)`` specialist softmax of one slice (class 0 = background).
        settings: prompt rules.
        generator: random source for box jitter (only used when ``settings.box_jitter > 0``).

    Returns:
        One :class:`SlicePrompt` per foreground class with at least one confident component, in class order.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"expected (K, h, w) probabilities, got shape {probs.shape}")
    hard = probs.argmax(0)
    if not (hard > 0).any():
        return []
    entropy = normalised_entropy(probs) if settings.point_selection == "uncertainty" else None
    out: List[SlicePrompt] = []
    for k in range(1, probs.shape[0]):
        foreground = (hard == k) & (probs[k] >= settings.fg_threshold)
        if not foreground.any():
            continue
        labels, ids, sizes = _components(foreground, settings.min_component_size)
        if not ids:
            continue
        # one prompt for the class (its components' union, or the largest one), or one per component, which lets
        # the generalist's own score reject a component that is a false positive of the specialist
        groups = [[i] for i in ids] if settings.box_mode == "components" else \
            [ids if settings.box_mode == "union" else ids[:1]]
        for group in groups:
            out.append(_region_prompt(probs, hard, k, labels, group, ids if settings.box_mode != "components" else
                                      group, entropy, settings, generator, batch_index, slice_index))
    return out


def _region_prompt(probs: np.ndarray, hard: np.ndarray, k: int, labels: np.ndarray, box_ids: Sequence[int],
                   point_ids: Sequence[int], entropy: Optional[np.ndarray], settings: PromptSettings,
                   generator: Optional[torch.Generator], batch_index: int, slice_index: int) -> SlicePrompt:
    """The prompt of class ``k`` for the components ``box_ids`` (box) and ``point_ids`` (positive points)."""
    kept = np.isin(labels, point_ids)
    depth = _distance_inside(kept)
    score = depth if entropy is None else depth * (1.0 - entropy)
    positives = _pick_points(score, labels, list(point_ids), settings.num_points, depth)
    box = _bbox(np.isin(labels, box_ids))

    negatives: List[np.ndarray] = []
    if settings.num_negative_points > 0:
        background = (hard != k) & (1.0 - probs[k] >= settings.bg_threshold)
        # prefer background close to the object (informative for the decoder): inside the box grown by half
        # its size; fall back to all confident background of the slice
        margin = max(2.0, 0.5 * max(box[2] - box[0], box[3] - box[1]))
        near = np.zeros_like(background)
        y0, y1 = int(max(0, box[1] - margin)), int(min(probs.shape[1], box[3] + margin + 1))
        x0, x1 = int(max(0, box[0] - margin)), int(min(probs.shape[2], box[2] + margin + 1))
        near[y0:y1, x0:x1] = True
        region = background & near if (background & near).any() else background
        if region.any():
            bg_depth = _distance_inside(region)
            bg_score = bg_depth if entropy is None else bg_depth * (1.0 - entropy)
            negatives = _pick_points(bg_score, region.astype(np.int32), [1], settings.num_negative_points,
                                     bg_depth)

    rc = positives + negatives
    points = torch.tensor(np.array([[c, r] for r, c in rc], dtype=np.float32).reshape(-1, 2))
    point_labels = torch.tensor([1] * len(positives) + [0] * len(negatives), dtype=torch.int64)
    if settings.use_box and settings.box_jitter > 0:
        box = _jitter_box(box, settings.box_jitter, probs.shape[1:], generator)
    return SlicePrompt(
        batch_index=batch_index, class_index=k, slice_index=slice_index,
        points=points,
        labels=point_labels,
        box=torch.from_numpy(box) if settings.use_box else None,
        mask=torch.from_numpy(class_logit(probs[k])) if settings.use_mask_prompt else None,
        area=int(kept.sum()),
    )


def generate_prompts(specialist_probs: torch.Tensor, settings: PromptSettings,
                     generator: Optional[torch.Generator] = None,
                     slice_indices: Optional[Sequence[int]] = None) -> PromptSet:
    """Prompts for a batch of sliced specialist predictions.

    Args:
        specialist_probs: ``(B, K, S, h, w)`` softmax (use :func:`geometry.patch_to_slices` on 3D patches; a 2D
            batch is ``(B, K, 1, h, w)``). There is deliberately no label argument.
        settings: prompt rules.
        generator: seeded random source for box jitter.
        slice_indices: restrict to these slice indices (default: all).

    Returns:
        A :class:`PromptSet`, ordered by batch item, slice, class.
    """
    if specialist_probs.ndim != 5:
        raise ValueError(f"expected (B, K, S, h, w) probabilities, got shape {tuple(specialist_probs.shape)}")
    probs = specialist_probs.detach().float().cpu().numpy()
    b_count, _, s_count = probs.shape[:3]
    slices = range(s_count) if slice_indices is None else slice_indices
    prompt_set = PromptSet()
    for b in range(b_count):
        for s in slices:
            prompt_set.slices.extend(prompts_for_slice(probs[b, :, s], settings, generator, b, s))
    return prompt_set


# ----------------------------------------------------------------------------------------------- 3D prompts
def volume_prompts(specialist_probs: torch.Tensor, settings: PromptSettings) -> List[VolumePrompt]:
    """3D prompts per (batch item, foreground class) from ``(B, K, S, h, w)`` probabilities.

    The extension point for volumetric generalists (e.g. SAM-Med3D-like models): 3D connected components, interior
    points by 3D distance transform, a 3D box, and the key slice with the largest confident area.
    """
    probs = specialist_probs.detach().float().cpu().numpy()
    out: List[VolumePrompt] = []
    for b in range(probs.shape[0]):
        hard = probs[b].argmax(0)
        entropy = normalised_entropy(probs[b]) if settings.point_selection == "uncertainty" else None
        for k in range(1, probs.shape[1]):
            foreground = (hard == k) & (probs[b, k] >= settings.fg_threshold)
            labels, ids, _ = _components(foreground, settings.min_component_size)
            if not ids:
                continue
            kept = np.isin(labels, ids)
            depth = _distance_inside(kept)
            score = depth if entropy is None else depth * (1.0 - entropy)
            picks = _pick_points(score, labels, ids, max(settings.num_points, 1), depth)
            s_idx, r_idx, c_idx = np.nonzero(kept)
            box = np.array([c_idx.min(), r_idx.min(), s_idx.min(), c_idx.max(), r_idx.max(), s_idx.max()],
                           dtype=np.float32)
            areas = kept.reshape(kept.shape[0], -1).sum(1)
            out.append(VolumePrompt(
                batch_index=b, class_index=k,
                points=torch.tensor(np.array([[c, r, s] for s, r, c in picks], dtype=np.float32).reshape(-1, 3)),
                box=torch.from_numpy(box), key_slice=int(areas.argmax()), area=int(kept.sum())))
    return out


# ------------------------------------------------------------------------------------- iterative clicks
def add_disagreement_clicks(prompts: PromptSet, generalist_probs: torch.Tensor, specialist_probs: torch.Tensor,
                            threshold: float = 0.5) -> PromptSet:
    """One more click per prompt, where the generalist's current mask and the specialist's disagree (SemiSAM+
    ``point`` mode; the interactive-segmentation click simulation, with the specialist in the place of the user).

    For each (batch item, class, slice) prompt: the error region is ``(generalist p >= threshold) XOR (specialist
    argmax == class)``; the click goes to the most interior pixel of its largest connected component and is labelled
    by the specialist there (positive if the specialist says "class", else negative). Prompts whose masks agree are
    returned unchanged. Both inputs are ``(B, K, S, h, w)``; labels are never involved.
    """
    gen = generalist_probs.detach().float().cpu().numpy()
    spec = specialist_probs.detach().float().cpu().numpy().argmax(1)  # (B, S, h, w)
    out = PromptSet()
    for p in prompts:
        spec_mask = spec[p.batch_index, p.slice_index] == p.class_index
        error = (gen[p.batch_index, p.class_index, p.slice_index] >= threshold) ^ spec_mask
        labels, ids, _ = _components(error, 1)
        if not ids:
            out.slices.append(p)
            continue
        largest = labels == ids[0]
        depth = _distance_inside(largest)
        r, c = np.unravel_index(int(np.argmax(np.where(largest, depth, -1.0))), depth.shape)
        click = torch.tensor([[float(c), float(r)]], dtype=p.points.dtype if p.points.numel() else torch.float32)
        label = torch.tensor([1 if spec_mask[r, c] else 0], dtype=torch.int64)
        out.slices.append(SlicePrompt(batch_index=p.batch_index, class_index=p.class_index,
                                      slice_index=p.slice_index, points=torch.cat([p.points.reshape(-1, 2), click]),
                                      labels=torch.cat([p.labels.reshape(-1), label]), box=p.box, mask=p.mask,
                                      area=p.area))
    return out
