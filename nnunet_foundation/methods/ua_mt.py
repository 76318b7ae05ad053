"""Uncertainty-aware Mean Teacher (Yu et al., MICCAI 2019), with the SSL4MIS reference's defaults.

The teacher predicts each unlabeled patch T = 8 times under input noise; the entropy of the mean prediction is its
uncertainty. The Mean Teacher consistency is applied only where that uncertainty is below a threshold which rises
from 0.75 ln C to ln C over training (the reference uses ln 2 for its two classes; ln C is the maximum entropy for
C classes, so the same fractions carry over to nnU-Net's multi-class datasets).

Differences from the reference, and why:
- the consistency target is the first of the T noisy teacher passes rather than a ninth pass: it has the same
  distribution and saves a teacher forward;
- uncertainty and mask are computed at every deep-supervision scale from the teacher's output at that scale, and
  the masked losses are combined with nnU-Net's scale weights, as the Mean Teacher term is.
"""
from __future__ import annotations

import math
from typing import List

import torch

from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import entropy, over_scales, softmax_mse
from nnunet_foundation.training.semi_supervised import rampup


class nnUNetTrainerUAMT(nnUNetTrainerMeanTeacher):
    default_settings = {
        **nnUNetTrainerMeanTeacher.default_settings,
        # stochastic teacher passes for the uncertainty estimate, and how many run in one batched forward
        "uncertainty_passes": 8,
        "uncertainty_chunk": 2,
        # threshold = (start + (end - start) * ramp(t/T)) * ln(C)
        "uncertainty_threshold_start": 0.75,
        "uncertainty_threshold_end": 1.0,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "teacher_confidence", "certain_fraction")

    def teacher_passes(self, x: torch.Tensor):
        """(first pass probabilities, mean probabilities) per deep-supervision scale over T noisy teacher passes."""
        s = self.ssl_settings
        passes, chunk = s["uncertainty_passes"], max(1, s["uncertainty_chunk"])
        batch = x.shape[0]
        first: List[torch.Tensor] = []
        sums: List[torch.Tensor] = []
        with torch.no_grad():
            self.teacher.eval()
            done = 0
            while done < passes:
                k = min(chunk, passes - done)
                outputs = self.as_list(self.teacher(self.add_teacher_noise(x.repeat(k, *[1] * (x.dim() - 1)))))
                for scale, logits in enumerate(outputs):
                    probs = torch.softmax(logits.float(), 1).view(k, batch, *logits.shape[1:])
                    if done == 0:
                        first.append(probs[0])
                        sums.append(probs.sum(0))
                    else:
                        sums[scale] += probs.sum(0)
                done += k
        return first, [s_ / passes for s_ in sums]

    def uncertainty_threshold(self) -> float:
        s = self.ssl_settings
        ramp = rampup(self.progress, s["rampup_length"], s["rampup_shape"])
        fraction = s["uncertainty_threshold_start"] + (s["uncertainty_threshold_end"] -
                                                       s["uncertainty_threshold_start"]) * ramp
        return fraction * math.log(self.label_manager.num_segmentation_heads)

    def unsupervised_loss(self, student_out_u, unlabeled):
        target, mean = self.teacher_passes(unlabeled["data"])
        threshold = self.uncertainty_threshold()
        # the mean over the certain voxels only
        masks = [(entropy(m) < threshold).float() for m in mean]
        consistency = over_scales(softmax_mse, self.deep_supervision_weights(), student_out_u, target, masks)
        weight = self.unsup_weight()
        return weight * consistency, {
            "unsup_loss": consistency.detach(), "unsup_weight": weight,
            "teacher_confidence": mean[0].max(1)[0].mean(), "certain_fraction": masks[0].mean()}


__all__ = ["nnUNetTrainerUAMT", *make_budget_variants(nnUNetTrainerUAMT, globals())]
