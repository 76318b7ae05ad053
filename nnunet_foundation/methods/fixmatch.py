"""FixMatch (Sohn et al., NeurIPS 2020) for segmentation, with two strong views per crop as in UniMatch's
dual-stream perturbation (Yang et al., CVPR 2023): the worked example of docs/adding_a_method.md.

Per iteration: nnU-Net's loss on the labeled patches; the student predicts the weak unlabeled view (nnU-Net's
geometric transforms only) without gradient, and where its softmax exceeds ``confidence_threshold`` (0.95) the argmax
becomes a hard pseudo-label (``threshold_mode``: FreeMatch's self-adaptive thresholds instead, training/thresholds.py);
the student on each of the two strong views of that crop (training/views.py) learns it with cross-entropy + Dice
counted only at the confident voxels, at every deep-supervision scale (pseudo-label and mask downsampled) with
nnU-Net's scale weights. The term is weighted by ``unsup_weight`` = 1 without ramp-up
(FixMatch's lambda_u: the confidence threshold already keeps early, unsure pseudo-labels out).

Inference uses the student, which ``network_weights`` holds for stock ``nnUNetv2_predict``.
"""
from __future__ import annotations

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, over_scales
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised
from nnunet_foundation.training.thresholds import THRESHOLD_LOG_KEYS, THRESHOLD_SETTINGS, ThresholdedPseudoLabels


class nnUNetTrainerFixMatch(ThresholdedPseudoLabels, nnUNetTrainerSemiSupervised):
    num_strong_views = 2
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "unsup_weight": 1.0,
        "rampup_shape": "none",
        **THRESHOLD_SETTINGS,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "confident_fraction", *THRESHOLD_LOG_KEYS)

    def pseudo_label(self, x_weak: torch.Tensor):
        """(hard pseudo-label, confidence mask) from the student's own prediction of the weak view."""
        with torch.no_grad():
            probs = torch.softmax(self.as_list(self.network(x_weak))[0].float(), 1)
        return self.confident_pseudo_label(probs)

    def compute_losses(self, labeled, unlabeled):
        label, confident = self.pseudo_label(unlabeled["data"])
        strong = unlabeled["strong"]
        # labeled patches and all strong views in one student pass; every view shares the weak view's target
        out_l, out_strong = self.forward_labeled_and_unlabeled(labeled["data"], torch.cat(strong))
        per_view = (len(strong),) + (1,) * (label.ndim - 1)
        unsupervised = over_scales(ce_dice, self.deep_supervision_weights(), out_strong,
                                   label.repeat(per_view), confident.repeat(per_view))
        weight = self.unsup_weight()
        return LossParts(self.supervised_loss(out_l, labeled["target"]), weight * unsupervised, {
            "unsup_loss": unsupervised.detach(), "unsup_weight": weight,
            "confident_fraction": confident.float().mean(), **self.threshold_logs()})


__all__ = ["nnUNetTrainerFixMatch", *make_budget_variants(nnUNetTrainerFixMatch, globals())]
