"""Generalist proposals, specialist (or small-head) classification: find objects the specialist's prompts miss.

With a handful of labels the specialist's weakness is *where* the object is: it misses objects and fires on
look-alikes, and a generalist prompted by its components inherits both (issue 22). Here the generalist looks
everywhere instead: every slice is prompted with a multi-scale grid of boxes, without the specialist, and each
resulting mask is a *candidate region*. Deciding which candidates are the target class is a region-level decision,
which needs far fewer labels than drawing outlines:

``agreement`` (no training)
    score = the generalist's predicted IoU x the specialist's mean probability of the class inside the mask; a
    candidate is kept when its score reaches ``min_score``. Candidates where the specialist is only lukewarm (no
    confident component, so no prompt at all) can still be found.
``head`` (trained on the labeled cases)
    a small multinomial logistic regression (:class:`RegionClassifier`) on each candidate's features: the image
    embedding averaged inside the mask minus its average over the slice (what the region looks like to the
    generalist), the predicted IoU, the mask's area fraction and the specialist's mean probability per class inside
    it. Fitted on the candidates of the labeled cases (the grid plus jittered boxes around their objects, so a
    handful of cases gives enough positive examples), whose target is the class the candidate overlaps with
    IoU >= ``match_iou`` (else background). It needs the labels of the labeled cases only; unlabeled and test
    cases are never read with labels.

Kept candidates are suppressed greedily by mask IoU (``nms_iou``) and merged per class by their maximum, like the
per-component prompts of the prompt path. Every slice that was looked at is *covered*: a slice without a kept
candidate is asserted to be background, as the generalist looked there.

Works with the SAM-family slice backends (``sam``, ``medsam``, ``litemedsam``) through their encoder and decoder;
embeddings are cached per slice under the caller's ``cache_keys`` like the prompt path's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_foundation.foundation.geometry import patch_to_slices, resize_from_model, upsample_low_res
from nnunet_foundation.foundation.prompts import SlicePrompt

SCORINGS = ("agreement", "head")


@dataclass
class ProposalSettings:
    """How candidates are proposed and decided.

    Attributes:
        scales: box sides as fractions of the slice's height and width (one grid per scale).
        overlap: fraction by which neighbouring boxes of a grid overlap (stride = side x (1 - overlap)).
        scoring: ``"agreement"`` or ``"head"`` (needs a fitted :class:`RegionClassifier`).
        min_score: keep a candidate whose score (agreement) or class probability (head) reaches this.
        nms_iou: a candidate overlapping an already kept one of the same class by more than this IoU is dropped.
        match_iou: a labeled candidate's target is the class it overlaps by at least this IoU (head training).
        decoder_batch: candidates decoded per decoder call (memory: one embedding copy each).
        min_specialist_probability: on 3D patches only slices where the specialist's foreground probability
            reaches this somewhere are looked at (every slice of a volume would cost an encoder pass each); a
            single slice (2D) is always looked at.
    """

    # 38 boxes per slice, each a decoder pass: on a CPU the grid costs about as much as the encoder pass
    scales: Tuple[float, ...] = (0.35, 0.6, 0.9)
    overlap: float = 0.5
    scoring: str = "agreement"
    min_score: float = 0.5
    nms_iou: float = 0.5
    match_iou: float = 0.5
    decoder_batch: int = 32
    min_specialist_probability: float = 0.05

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise ValueError(f"proposal scoring must be one of {SCORINGS}, got {self.scoring!r}")
        if not self.scales or not all(0.0 < s <= 1.0 for s in self.scales):
            raise ValueError(f"proposal scales are fractions of the slice in (0, 1], got {self.scales}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"proposal overlap is in [0, 1), got {self.overlap}")


def grid_boxes(hw: Sequence[int], scales: Sequence[float], overlap: float) -> torch.Tensor:
    """``(N, 4)`` inclusive ``(x0, y0, x1, y1)`` boxes tiling an ``(h, w)`` slice at each scale; the last box of a
    row/column is aligned with the border so the grid covers the whole slice."""
    h, w = int(hw[0]), int(hw[1])
    boxes = []
    for s in scales:
        bh, bw = max(2.0, s * h), max(2.0, s * w)
        ys = _starts(h, bh, overlap)
        xs = _starts(w, bw, overlap)
        for y in ys:
            for x in xs:
                boxes.append((x, y, min(w - 1.0, x + bw - 1), min(h - 1.0, y + bh - 1)))
    return torch.tensor(sorted(set(boxes)), dtype=torch.float32)


def _starts(length: int, side: float, overlap: float) -> List[float]:
    stride = max(1.0, side * (1.0 - overlap))
    last = max(0.0, length - side)
    starts = list(np.arange(0.0, last + 1e-6, stride))
    if not starts or starts[-1] < last - 1e-6:
        starts.append(last)
    return [float(round(v)) for v in starts]


@dataclass
class Candidates:
    """The candidate regions of one slice."""

    probabilities: torch.Tensor  # (P, h, w) sigmoid of the generalist's mask logits
    predicted_iou: torch.Tensor  # (P,)
    features: torch.Tensor       # (P, F), see region_features
    agreement: torch.Tensor      # (P, K) specialist's mean probability of each class inside the mask


class RegionClassifier(torch.nn.Module):
    """Multinomial logistic regression on standardised region features (class 0 = not an object of any class)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(num_features, num_classes)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear((features - self.mean) / self.std), dim=-1)

    def fit(self, features: torch.Tensor, targets: torch.Tensor, weight_decay: float = 1e-2,
            steps: int = 200) -> "RegionClassifier":
        """Class-balanced cross-entropy with L2, solved with L-BFGS (a convex problem: deterministic)."""
        features, targets = features.float(), targets.long()
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp_min(1e-6))
        x = (features - self.mean) / self.std
        counts = torch.bincount(targets, minlength=self.linear.out_features).float()
        weights = torch.where(counts > 0, counts.sum() / (counts.clamp_min(1) * (counts > 0).sum()),
                              torch.zeros_like(counts))
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        optimiser = torch.optim.LBFGS(self.linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = F.cross_entropy(self.linear(x), targets, weight=weights) \
                + weight_decay * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimiser.step(closure)
        return self.eval()

    def state(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, state: Dict[str, torch.Tensor]) -> "RegionClassifier":
        weight = state["linear.weight"]
        classifier = cls(weight.shape[1], weight.shape[0])
        classifier.load_state_dict(state)
        return classifier.eval()


class RegionProposer:
    """A SAM-family slice generalist used as a region proposer (see the module docstring).

    ``proposer(images, specialist_probs, cache_keys)`` returns a :class:`~.generalist.GeneralistOutput` like the
    generalist's own call, so it serves ``generalist-quality`` and ``pseudo-label`` unchanged.
    """

    def __init__(self, generalist, settings: ProposalSettings, classifier: Optional[RegionClassifier] = None,
                 shared_cache: Optional[dict] = None):
        if not hasattr(generalist, "cached_encode"):
            raise ValueError(f"region proposals need a SAM-family slice generalist (sam, medsam, litemedsam), got "
                             f"{type(generalist).__name__}")
        if settings.scoring == "head" and classifier is None:
            raise ValueError("proposal scoring 'head' needs a fitted RegionClassifier (fit it on the labeled cases)")
        self.generalist = generalist
        self.settings = settings
        self.classifier = classifier
        # the last slice's candidates, shared between proposers that score the same slices differently (one
        # generalist-quality run: agreement and head) so the grid is decoded once per slice
        self._last = shared_cache if shared_cache is not None else {}

    # ------------------------------------------------------------------------------------------ candidates
    @torch.no_grad()
    def candidates(self, image: torch.Tensor, specialist: torch.Tensor, cache_key: Optional[tuple] = None,
                   extra_boxes: Optional[torch.Tensor] = None) -> Tuple[Candidates, int]:
        """Candidates of one slice: ``image`` ``(h, w)`` nnU-Net intensities, ``specialist`` ``(K, h, w)``; the
        grid's boxes plus ``extra_boxes`` ``(E, 4)`` (the head's fitting adds boxes around labeled objects).
        Returns them and the number of images the encoder processed (0 on an embedding-cache hit)."""
        if extra_boxes is None and cache_key is not None and \
                self._last.get("key") == (cache_key, self.settings.scales, self.settings.overlap):
            return self._last["candidates"], 0
        g = self.generalist
        device = g.device
        h, w = image.shape[-2:]
        model_input, geometry = g._to_model_input(image[None].to(device))
        g._slice_cache_keys = None if cache_key is None else [cache_key]
        embedding, encoded = g.cached_encode(model_input)
        boxes = grid_boxes((h, w), self.settings.scales, self.settings.overlap)
        if extra_boxes is not None and len(extra_boxes):
            boxes = torch.cat([boxes, extra_boxes.float()])
        prompts = [SlicePrompt(0, 1, 0, points=torch.zeros((0, 2)), labels=torch.zeros(0, dtype=torch.int64),
                               box=b) for b in boxes]
        low_res, ious = [], []
        for start in range(0, len(prompts), self.settings.decoder_batch):
            chunk = prompts[start:start + self.settings.decoder_batch]
            points, labels, model_boxes, masks = g._prompt_tensors(chunk, geometry, None)
            lr, iou = g._decode(embedding.expand(len(chunk), -1, -1, -1), points, labels, model_boxes, masks)
            low_res.append(lr)
            ious.append(iou)
        low_res, iou = torch.cat(low_res), torch.cat(ious)
        probabilities = torch.sigmoid(resize_from_model(upsample_low_res(low_res, g.img_size), geometry)[:, 0])
        specialist = specialist.to(device).float()
        inside = (probabilities > 0.5).float()
        area = inside.flatten(1).sum(1)
        agreement = torch.einsum("phw,khw->pk", inside, specialist) / area.clamp_min(1)[:, None]
        features = region_features(embedding[0], torch.sigmoid(low_res[:, 0]), iou, area / (h * w), agreement)
        candidates = Candidates(probabilities, iou, features, agreement)
        if cache_key is not None and extra_boxes is None:
            self._last.clear()
            self._last.update(key=(cache_key, self.settings.scales, self.settings.overlap), candidates=candidates)
        return candidates, encoded

    # ------------------------------------------------------------------------------------------ decisions
    def class_scores(self, c: Candidates) -> torch.Tensor:
        """``(P, K)`` how much each candidate looks like each class (column 0: nothing)."""
        if self.settings.scoring == "head":
            return self.classifier.to(c.features.device)(c.features)
        scores = c.agreement * c.predicted_iou.clamp(0, 1)[:, None]
        scores[:, 0] = 0.0
        return scores

    def select(self, c: Candidates) -> List[Tuple[int, int, float]]:
        """Kept ``(candidate, class, score)``: best class per candidate, ``min_score``, greedy mask-IoU NMS."""
        with torch.no_grad():
            scores = self.class_scores(c)
        best, cls = scores[:, 1:].max(1)
        cls = cls + 1
        inside = c.probabilities > 0.5
        kept: List[Tuple[int, int, float]] = []
        # among overlapping candidates of a class the one with the best-formed mask wins (the generalist's own
        # predicted IoU), so a confident part of an object does not suppress the whole object
        order = torch.argsort(best * c.predicted_iou.clamp(0, 1), descending=True).tolist()
        for i in order:
            score = float(best[i])
            if score < self.settings.min_score:
                continue
            if not inside[i].any():
                continue
            k = int(cls[i])
            if any(kk == k and _mask_iou(inside[i], inside[j]) > self.settings.nms_iou for j, kk, _ in kept):
                continue
            kept.append((i, k, score))
        return kept

    def __call__(self, images: torch.Tensor, specialist_probs: torch.Tensor,
                 cache_keys: Optional[Sequence[str]] = None):
        from nnunet_foundation.foundation.generalist import assemble_output, check_inputs

        g = self.generalist
        check_inputs(images, specialist_probs, g.config.image_channel)
        is_2d = images.ndim == 4
        axis = 0 if is_2d else g.slice_axis()
        t0 = time.perf_counter()
        image_slices = images[:, g.config.image_channel]
        image_slices = image_slices.unsqueeze(1) if is_2d else patch_to_slices(image_slices[:, None], axis)[:, 0]
        prob_slices = specialist_probs.unsqueeze(2) if is_2d else patch_to_slices(specialist_probs, axis)
        b_count, k_count, s_count, h, w = prob_slices.shape
        device = g.device
        foreground = torch.zeros((b_count, k_count, s_count, h, w), device=device)
        confidence = torch.zeros_like(foreground)
        prompted = torch.zeros((b_count, k_count), dtype=torch.bool, device=device)
        prompted[:, 0] = True
        covered = torch.zeros((b_count, s_count), dtype=torch.bool)
        encoded = 0
        for b in range(b_count):
            for s in range(s_count):
                # a single slice (2D) is always looked at: finding what the specialist missed is the point
                if s_count > 1 and float(prob_slices[b, 1:, s].max()) < self.settings.min_specialist_probability:
                    continue
                key = None if cache_keys is None else (str(cache_keys[b]), axis, s)
                c, n = self.candidates(image_slices[b, s], prob_slices[b, :, s], key)
                encoded += n
                covered[b, s] = True
                for i, k, score in self.select(c):
                    foreground[b, k, s] = torch.maximum(foreground[b, k, s], c.probabilities[i])
                    confidence[b, k, s] = torch.where(c.probabilities[i] > 0.5, torch.clamp(
                        confidence[b, k, s], min=score), confidence[b, k, s])
                    prompted[b, k] = True
        return assemble_output(foreground, confidence, prompted, True, g.config.background, is_2d, axis, device,
                               t0, encoded, covered)

    # ------------------------------------------------------------------------------------------ training the head
    def fit(self, cases: Iterable[Tuple[str, np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
            progress=print) -> RegionClassifier:
        """Fit :attr:`classifier` on labeled cases ``(identifier, data (C, [D,] H, W), seg ([D,] H, W),
        specialist probabilities (K, [D,] H, W))``: every candidate of every slice where a class or the specialist's
        foreground is present, target = the class it matches (IoU >= ``match_iou``) or 0."""
        features, targets = [], []
        g = self.generalist
        self._fit_generator = np.random.default_rng(0)
        for identifier, data, seg, probs in cases:
            images = torch.from_numpy(np.asarray(data, dtype=np.float32))
            seg = torch.from_numpy(np.asarray(seg).astype(np.int64))
            probs = torch.from_numpy(np.asarray(probs, dtype=np.float32))
            if seg.ndim == 2:
                images, seg, probs = images[:, None], seg[None], probs[:, None]
            axis = 0 if seg.shape[0] == 1 else g.slice_axis()
            image_slices = patch_to_slices(images[None, g.config.image_channel:g.config.image_channel + 1], axis)[0, 0]
            seg_slices = patch_to_slices(seg[None, None], axis)[0, 0]
            prob_slices = patch_to_slices(probs[None], axis)[0]
            for s in range(image_slices.shape[0]):
                if image_slices.shape[0] > 1 and not (seg_slices[s] > 0).any() and \
                        float(prob_slices[1:, s].max()) < self.settings.min_specialist_probability:
                    continue
                # a grid hits each labeled object with one or two boxes: boxes around the objects themselves,
                # loose and tight, give the head the positive examples that a handful of cases cannot
                c, _ = self.candidates(image_slices[s], prob_slices[:, s], (identifier, axis, s),
                                       extra_boxes=object_boxes(seg_slices[s].numpy(), self._fit_generator))
                features.append(c.features.cpu())
                targets.append(match_targets(c.probabilities.cpu() > 0.5, seg_slices[s], num_classes,
                                             self.settings.match_iou))
            progress(f"  region head: {identifier}: {sum(len(t) for t in targets)} candidates so far, "
                     f"{int(sum((t > 0).sum() for t in targets))} matching an object")
        if not features:
            raise ValueError("no candidates to fit the region head on: the labeled cases hold no object")
        features, targets = torch.cat(features), torch.cat(targets)
        if not (targets > 0).any():
            raise ValueError(f"none of the {len(targets)} candidates of the labeled cases matches an object with "
                             f"IoU >= {self.settings.match_iou}: add smaller/larger scales or lower match_iou")
        self.classifier = RegionClassifier(features.shape[1], num_classes).fit(features, targets)
        return self.classifier


def region_features(embedding: torch.Tensor, low_res_probs: torch.Tensor, predicted_iou: torch.Tensor,
                    area_fraction: torch.Tensor, agreement: torch.Tensor) -> torch.Tensor:
    """``(P, C + 2 + K)`` per candidate: the embedding ``(C, e, e)`` averaged with the candidate's soft mask (its
    low-resolution probabilities, pooled to the embedding grid) minus the slice's average embedding, the predicted
    IoU, log area fraction, and the specialist's mean class probabilities inside the mask."""
    weights = F.adaptive_avg_pool2d(low_res_probs[:, None].float(), embedding.shape[-2:])[:, 0]  # (P, e, e)
    emb = embedding.float()
    pooled = torch.einsum("pij,cij->pc", weights, emb) / weights.flatten(1).sum(1).clamp_min(1e-6)[:, None]
    pooled = pooled - emb.mean((1, 2))[None]
    return torch.cat([pooled, predicted_iou[:, None].float(), torch.log(area_fraction.clamp_min(1e-4))[:, None],
                      agreement.float()], dim=1)


def object_boxes(seg: np.ndarray, rng: np.random.Generator, per_object: int = 8, jitter: float = 0.15
                 ) -> torch.Tensor:
    """``(E, 4)`` boxes around each connected object of a labeled slice: its tight box, then ``per_object - 1``
    boxes with each side moved by up to ``jitter`` x the object's size (some looser, some cutting in)."""
    from scipy import ndimage

    boxes = []
    h, w = seg.shape
    for k in np.unique(seg[seg > 0]):
        labels, n = ndimage.label(seg == k)
        for region in ndimage.find_objects(labels):
            y0, y1, x0, x1 = region[0].start, region[0].stop - 1, region[1].start, region[1].stop - 1
            size = np.array([x1 - x0 + 1, y1 - y0 + 1, x1 - x0 + 1, y1 - y0 + 1], dtype=np.float64)
            tight = np.array([x0, y0, x1, y1], dtype=np.float64)
            for i in range(per_object):
                box = tight if i == 0 else tight + rng.uniform(-jitter, jitter, 4) * size
                box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
                if box[2] > box[0] and box[3] > box[1]:
                    boxes.append(box)
    return torch.tensor(np.array(boxes, dtype=np.float32).reshape(-1, 4))


def match_targets(inside: torch.Tensor, seg: torch.Tensor, num_classes: int, match_iou: float) -> torch.Tensor:
    """The class each candidate mask ``(P, h, w)`` overlaps by IoU >= ``match_iou`` in ``seg`` (0 if none)."""
    targets = torch.zeros(inside.shape[0], dtype=torch.long)
    best = torch.zeros(inside.shape[0])
    for k in range(1, num_classes):
        truth = seg == k
        if not truth.any():
            continue
        intersection = (inside & truth).flatten(1).sum(1).float()
        union = (inside | truth).flatten(1).sum(1).float().clamp_min(1)
        iou = intersection / union
        better = (iou >= match_iou) & (iou > best)
        targets[better] = k
        best = torch.where(better, iou, best)
    return targets


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum()) / float(union) if union else 0.0


def build_proposer(generalist, scoring: str, overrides: Optional[dict], preprocessed_folder: str,
                   labeled_cases: Sequence[str], specialist, num_classes: int, head_file: Optional[str] = None,
                   shared_cache: Optional[dict] = None, progress=print) -> RegionProposer:
    """A ready :class:`RegionProposer` for the commands (``generalist-quality``, ``pseudo-label``).

    ``head`` scoring fits the region head on ``labeled_cases`` (their nnU-Net-preprocessed data and labels, and the
    specialist's prediction of them), or loads it from ``head_file`` when that exists (and saves it there after
    fitting), so every part of a split run uses the same head.
    """
    import os

    from nnunet_foundation.atomic_files import write_atomically
    from nnunet_foundation.foundation.quality import load_preprocessed_cases

    settings = ProposalSettings(**{**(overrides or {}), "scoring": "agreement"})
    proposer = RegionProposer(generalist, settings, shared_cache=shared_cache)
    if scoring == "head":
        if head_file and os.path.isfile(head_file):
            proposer.classifier = RegionClassifier.from_state(torch.load(head_file, weights_only=True))
            progress(f"region head loaded from {head_file}")
        else:
            if not labeled_cases:
                raise ValueError("the region head needs labeled cases to fit on")
            progress(f"fitting the region head on {len(labeled_cases)} labeled case(s)")
            proposer.fit(((i, d, s, specialist(d).numpy()) for i, d, s in
                          load_preprocessed_cases(preprocessed_folder, labeled_cases)), num_classes, progress)
            if head_file:
                write_atomically(head_file, lambda tmp: torch.save(proposer.classifier.state(), tmp))
        proposer.settings = ProposalSettings(**{**(overrides or {}), "scoring": "head"})
    elif scoring != "agreement":
        raise ValueError(f"proposal scoring must be one of {SCORINGS}, got {scoring!r}")
    return proposer
