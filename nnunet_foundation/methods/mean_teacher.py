"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), with the SSL4MIS defaults for medical segmentation.

Per iteration: nnU-Net's loss on the labeled batch; on the unlabeled batch, the student's softmax is pulled towards
the softmax of an EMA teacher that sees the same crop with Gaussian noise added (MSE, at every deep-supervision
scale with nnU-Net's scale weights), weighted by ``unsup_weight * exp(-5 (1 - t/T)^2)``.

Inference uses the EMA teacher: it is a temporal ensemble of the student and is at least as accurate in Tarvainen &
Valpola's experiments (and USB evaluates the EMA model the same way). It is what ``network_weights`` holds, what
nnU-Net's validation scores, and what ``nnUNetv2_predict`` loads; the student is kept in the checkpoint for ``--c``.
"""
from __future__ import annotations

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import over_scales, softmax_mse
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "ema_decay": 0.99,
        # noise on the teacher's input: N(0, std) clipped to +-clip (SSL4MIS: 0.1 and 0.2)
        "teacher_noise_std": 0.1,
        "teacher_noise_clip": 0.2,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "teacher_confidence")
    exported_model = "EMA teacher"

    def build_ssl_modules(self):
        self.teacher = self.add_ema_teacher("teacher_weights", self.network, self.ssl_settings["ema_decay"])

    def inference_network(self):
        return self.teacher

    def add_teacher_noise(self, x: torch.Tensor) -> torch.Tensor:
        s = self.ssl_settings
        return x + torch.clamp(torch.randn_like(x) * s["teacher_noise_std"], -s["teacher_noise_clip"],
                               s["teacher_noise_clip"])

    def teacher_predict(self, x: torch.Tensor):
        """Teacher logits per deep-supervision scale for the noise-perturbed input (no gradient)."""
        with torch.no_grad():
            self.teacher.eval()
            return self.as_list(self.teacher(self.add_teacher_noise(x)))

    def compute_losses(self, labeled, unlabeled):
        out_l, out_u = self.forward_labeled_and_unlabeled(labeled["data"], unlabeled["data"])
        unsupervised, logs = self.unsupervised_loss(out_u, unlabeled)
        return LossParts(self.supervised_loss(out_l, labeled["target"]), unsupervised, logs)

    def unsupervised_loss(self, student_out_u, unlabeled):
        """The weighted unsupervised term and its log values; variants (UA-MT, SemiSAM) override this."""
        teacher_probs = [torch.softmax(o.float(), 1) for o in self.teacher_predict(unlabeled["data"])]
        consistency = over_scales(softmax_mse, self.deep_supervision_weights(), student_out_u, teacher_probs)
        weight = self.unsup_weight()
        return weight * consistency, {"unsup_loss": consistency.detach(), "unsup_weight": weight,
                                      "teacher_confidence": teacher_probs[0].max(1)[0].mean()}


__all__ = ["nnUNetTrainerMeanTeacher", *make_budget_variants(nnUNetTrainerMeanTeacher, globals())]
