"""Which voxels of a pseudo-label count: confidence thresholds for the hard pseudo-labels of FixMatch and UniMatch.

``fixed`` is FixMatch's rule: a voxel counts where the weak view's softmax exceeds ``confidence_threshold`` (0.95).
On a small structure learned from two or three labeled cases that rule can keep the foreground out for half of
training: on Hippocampus (2 labeled cases, seed 0) no foreground voxel of UniMatch's weak view passed 0.95 before
t/T = 0.55, so the unsupervised term taught background only until then (docs/benchmarks/hippocampus_cpu2d_ssl).

``self_adaptive`` is FreeMatch's self-adaptive thresholding (Wang et al., ICLR 2023, "FreeMatch: Self-adaptive
Thresholding for Semi-supervised Learning"), with voxels in place of images:

* a global threshold tau, an EMA of the mean maximum softmax over the unlabeled voxels of each batch, starting at 1/K
  (K classes): low while the model is unsure, so pseudo-labels are many early, rising with its confidence;
* a class-wise level p~(c), an EMA of the mean softmax of class c over the same voxels, starting at 1/K;
* the threshold of class c is tau * p~(c) / max_c' p~(c'), and a voxel counts where its maximum softmax reaches the
  threshold of its predicted class (FreeMatch's ``max p >= tau_c``).

``self_adaptive_global`` is the global threshold tau alone for every class (FreeMatch's ablation without the
class-wise levels). Both EMAs use ``threshold_ema_decay`` (FreeMatch: 0.999 per iteration).

In segmentation the class levels follow the class frequencies, so a small foreground gets a threshold far below the
background's (Hippocampus: foreground about 2% of the voxels of a patch, so about 0.02 tau): in effect every voxel
the model predicts as foreground counts, and background counts where it is about as confident as the model is on
average. That is FreeMatch's rule carried over unchanged, not tuned here. Measured on Hippocampus (2 labeled cases):
the admission is lopsided - a background voxel must be as sure as the model is on average, a foreground voxel
nothing - so each step's pseudo-label keeps the model's uncertain foreground and drops its uncertain background, and
UniMatch grew its predictions to 1.4x the true volume. ``self_adaptive_global`` treats the classes alike; on the
same cell it kept the volume right and gave the best test Dice of the three rules (one run each; at 4 labeled cases
level with the fixed rule). ``fixed`` stays the default until repeated runs decide on validation data
(docs/benchmarks/hippocampus_cpu2d_ssl says what each rule measured).

Every process of a DDP run updates the EMAs with the mean over all processes' batches (one all-reduce of K + 1
numbers), so the thresholds stay identical across GPUs, as FreeMatch's all-gather does; the state is checkpointed
with the trainer's ``ssl_state`` so ``--c`` continues with the same thresholds.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import distributed as dist

#: the settings of a trainer that thresholds hard pseudo-labels (:class:`ThresholdedPseudoLabels`)
THRESHOLD_SETTINGS = {
    "confidence_threshold": 0.95,  # FixMatch / UniMatch, used by threshold_mode "fixed"
    "threshold_mode": "fixed",
    "threshold_ema_decay": 0.999,  # FreeMatch's EMA momentum, used by the self_adaptive modes
}
#: the per-epoch log keys of that trainer's thresholds (mean over the foreground classes, and background)
THRESHOLD_LOG_KEYS = ("threshold_foreground", "threshold_background")


class FixedThreshold:
    """FixMatch's rule: a voxel counts where its maximum softmax exceeds ``value``."""

    def __init__(self, value: float, num_classes: int):
        self.value = float(value)
        self.num_classes = num_classes

    def class_thresholds(self) -> torch.Tensor:
        """The threshold of each class, ``(K,)`` on the CPU (for the log)."""
        return torch.full((self.num_classes,), self.value)

    def pseudo_label(self, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hard label ``(B, *spatial)``, boolean mask of the voxels that count) from softmax ``(B, K, *spatial)``."""
        confidence, label = probs.max(1)
        return label, confidence > self.value

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SelfAdaptiveThreshold(FixedThreshold):
    """FreeMatch's self-adaptive threshold (module docstring). Call :meth:`pseudo_label` once per training step with
    the weak view's softmax: it updates the EMAs with that batch, then thresholds it."""

    def __init__(self, num_classes: int, ema_decay: float = 0.999, class_wise: bool = True):
        super().__init__(1.0 / num_classes, num_classes)
        self.ema_decay = float(ema_decay)
        self.class_wise = class_wise
        self.global_level = torch.tensor(1.0 / num_classes, dtype=torch.float64)
        self.class_levels = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)

    def class_thresholds(self) -> torch.Tensor:
        if not self.class_wise:
            return self.global_level.expand(self.num_classes).float()
        return (self.global_level * self.class_levels / self.class_levels.max()).float()

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> None:
        """One EMA step with the batch's mean maximum softmax and mean softmax per class (mean over processes)."""
        spatial = tuple(range(2, probs.ndim))
        batch = torch.cat([probs.max(1)[0].mean().view(1), probs.mean((0,) + spatial)]).double()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
            batch /= dist.get_world_size()
        batch = batch.cpu()
        m = self.ema_decay
        self.global_level = m * self.global_level + (1 - m) * batch[0]
        self.class_levels = m * self.class_levels + (1 - m) * batch[1:]

    def pseudo_label(self, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        self.update(probs)
        confidence, label = probs.max(1)
        thresholds = self.class_thresholds().to(probs.device, probs.dtype)
        return label, confidence >= thresholds[label]

    def state_dict(self) -> dict:
        return {"global_level": float(self.global_level), "class_levels": self.class_levels.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.global_level = torch.tensor(state["global_level"], dtype=torch.float64)
        self.class_levels = torch.tensor(state["class_levels"], dtype=torch.float64)


def build_confidence_threshold(settings: dict, num_classes: int) -> FixedThreshold:
    """The rule named by the setting ``threshold_mode``: ``fixed`` (``confidence_threshold``), ``self_adaptive`` or
    ``self_adaptive_global`` (both with ``threshold_ema_decay``)."""
    if settings["threshold_mode"] in ("self_adaptive", "self_adaptive_global"):
        return SelfAdaptiveThreshold(num_classes, settings["threshold_ema_decay"],
                                     class_wise=settings["threshold_mode"] == "self_adaptive")
    return FixedThreshold(settings["confidence_threshold"], num_classes)


class ThresholdedPseudoLabels:
    """Mixin for a method of ``nnUNetTrainerSemiSupervised`` that learns hard pseudo-labels at confident voxels: it
    builds the rule of :data:`THRESHOLD_SETTINGS` (``self.confidence_rule``), checkpoints its state for ``--c`` and
    logs the foreground and background thresholds per epoch. Put it before the trainer base in the class bases and
    add :data:`THRESHOLD_SETTINGS` and :data:`THRESHOLD_LOG_KEYS` to the method's settings and log keys."""

    def build_ssl_modules(self):
        super().build_ssl_modules()
        self.confidence_rule = build_confidence_threshold(self.ssl_settings,
                                                          self.label_manager.num_segmentation_heads)

    def confident_pseudo_label(self, probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(hard label, mask of the voxels that count) of the weak view's softmax; call once per training step."""
        return self.confidence_rule.pseudo_label(probs)

    def threshold_logs(self) -> dict:
        thresholds = self.confidence_rule.class_thresholds()
        return {"threshold_background": float(thresholds[0]), "threshold_foreground": float(thresholds[1:].mean())}

    def ssl_state_dict(self) -> dict:
        return {**super().ssl_state_dict(), "confidence_rule": self.confidence_rule.state_dict()}

    def load_ssl_state_dict(self, state: dict) -> None:
        super().load_ssl_state_dict(state)
        # checkpoints from before this state existed were all "fixed" (the settings check refuses another mode)
        if "confidence_rule" in state:
            self.confidence_rule.load_state_dict(state["confidence_rule"])


__all__ = ["THRESHOLD_SETTINGS", "THRESHOLD_LOG_KEYS", "ThresholdedPseudoLabels", "FixedThreshold",
           "SelfAdaptiveThreshold", "build_confidence_threshold"]
