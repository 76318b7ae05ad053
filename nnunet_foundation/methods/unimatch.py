"""UniMatch (Yang, Qi, Feng, Zhang, Shi, CVPR 2023: "Revisiting Weak-to-Strong Consistency in Semi-Supervised
Semantic Segmentation"), on nnU-Net.

Per iteration, one student pass over [labeled, weak unlabeled] whose encoder features are also decoded once more
with channel dropout p = 0.5 for the unlabeled samples (training/views.py ``feature_dropout_stream``, a forward hook
on nnU-Net's encoder): nnU-Net's loss on the labeled outputs; the clean weak outputs (no gradient) give a hard
pseudo-label where the softmax exceeds ``confidence_threshold`` (0.95); then

* image-level perturbation, two streams: two strong views of the crop (training/views.py), each with a CutMix box
  (probability ``cutmix_probability`` per image, as the official code's ``obtain_cutmix_box(p=0.5)``) taken from the
  strong view of another unlabeled crop of the batch, whose weak-view pseudo-label and confidence fill the box;
* feature-level perturbation, one stream: the feature-dropped-out decoding of the weak view, towards the weak view's
  own pseudo-label;

each a cross-entropy + Dice at the confident voxels, at every deep-supervision scale with nnU-Net's scale weights.
The paper's weights: L_u = 0.5 * (L_s1 + L_s2) / 2 + 0.5 * L_fp, i.e. 0.25 per image-level view and 0.5 for the
feature stream, and the total (L_x + L_u) / 2, so L_u enters with the weight of the supervised loss:
``unsup_weight`` = 1 without ramp-up (the constant 1/2 is left to nnU-Net's learning rate).

Differences from the official code, and why: the CutMix partner is another crop of the same unlabeled batch (rolled
by one) instead of a second unlabeled batch, which saves a batch and a forward pass; its pseudo-label comes from the
same student pass in training mode rather than a separate pass in eval mode, which is the same prediction for
nnU-Net's networks (instance normalisation, no dropout); the unsupervised terms are CE + Dice, nnU-Net's supervised
loss and this package's FixMatch term (the official medical scenario uses Dice alone, its natural-image code CE).

Inference uses the student, which ``network_weights`` holds for stock ``nnUNetv2_predict``.
"""
from __future__ import annotations

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice, over_scales
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised
from nnunet_foundation.training.thresholds import THRESHOLD_LOG_KEYS, THRESHOLD_SETTINGS, ThresholdedPseudoLabels
from nnunet_foundation.training.views import paste_boxes, random_boxes


class nnUNetTrainerUniMatch(ThresholdedPseudoLabels, nnUNetTrainerSemiSupervised):
    num_strong_views = 2
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "unsup_weight": 1.0,
        "rampup_shape": "none",
        **THRESHOLD_SETTINGS,
        # channel dropout on the encoder's features for the feature-perturbation stream (UniMatch: Dropout2d(0.5))
        "feature_dropout": 0.5,
        # weights inside L_u: each image-level strong view, and the feature stream (UniMatch: 0.25, 0.25, 0.5)
        "strong_view_weight": 0.25,
        "feature_stream_weight": 0.5,
        # chance that a strong view gets a CutMix box, and the box's share of the patch (UniMatch: 0.5, 0.02-0.4)
        "cutmix_probability": 0.5,
        "cutmix_min_area": 0.02,
        "cutmix_max_area": 0.4,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "strong_view_loss", "feature_stream_loss", "confident_fraction",
                     *THRESHOLD_LOG_KEYS)

    def cutmix_boxes(self, x: torch.Tensor) -> torch.Tensor:
        """One box per image, kept with probability ``cutmix_probability`` (an empty box leaves the view as it is)."""
        s = self.ssl_settings
        boxes = random_boxes(tuple(x.shape[2:]), x.shape[0], min_area=s["cutmix_min_area"],
                             max_area=s["cutmix_max_area"], device=x.device)
        kept = torch.rand(x.shape[0], device=x.device) < s["cutmix_probability"]
        return boxes & kept.view(-1, *[1] * (boxes.ndim - 1))

    def unsupervised_terms(self, out_weak, out_feature, strong_views):
        """UniMatch's three unweighted terms ``{"strong_1", "strong_2", "feature"}`` (the student passes the CutMixed
        strong views here) and the confidence mask of the weak view's pseudo-label."""
        s = self.ssl_settings
        with torch.no_grad():
            label, confident = self.confident_pseudo_label(torch.softmax(out_weak[0].detach().float(), 1))
            # CutMix partner: the next crop of the batch; its strong view, pseudo-label and confidence fill the box
            partner = torch.roll(torch.arange(label.shape[0], device=label.device), -1)
            mixed, labels, masks = [], [], []
            for view in strong_views:
                box = self.cutmix_boxes(view)
                mixed.append(paste_boxes(box, view, view[partner]))
                labels.append(paste_boxes(box, label, label[partner]))
                masks.append(paste_boxes(box, confident, confident[partner]))
        n = label.shape[0]
        out_strong = self.as_list(self.network(torch.cat(mixed)))  # both strong views in one pass
        scales = self.deep_supervision_weights()
        terms = {f"strong_{i + 1}": over_scales(ce_dice, scales, [o[i * n:(i + 1) * n] for o in out_strong],
                                                labels[i], masks[i]) for i in range(len(mixed))}
        terms["feature"] = over_scales(ce_dice, scales, out_feature, label, confident)
        return terms, confident

    def compute_losses(self, labeled, unlabeled):
        s = self.ssl_settings
        out_l, out_weak, out_feature = self.forward_with_feature_dropout(labeled["data"], unlabeled["data"],
                                                                         s["feature_dropout"])
        terms, confident = self.unsupervised_terms(out_weak, out_feature, unlabeled["strong"])
        strong = [terms[f"strong_{i + 1}"] for i in range(len(unlabeled["strong"]))]
        unsupervised = s["strong_view_weight"] * sum(strong) + s["feature_stream_weight"] * terms["feature"]
        weight = self.unsup_weight()
        return LossParts(self.supervised_loss(out_l, labeled["target"]), weight * unsupervised, {
            "unsup_loss": unsupervised.detach(), "unsup_weight": weight,
            "strong_view_loss": (sum(strong) / len(strong)).detach(), "feature_stream_loss": terms["feature"].detach(),
            "confident_fraction": confident.float().mean(), **self.threshold_logs()})

__all__ = ["nnUNetTrainerUniMatch", *make_budget_variants(nnUNetTrainerUniMatch, globals())]
