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
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.networks import ema_decay_with_warmup, ema_update, make_teacher, unwrap_network
from nnunet_foundation.training.semi_supervised import nnUNetTrainerSemiSupervised


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of class probabilities (SSL4MIS ``softmax_mse_loss``, averaged over voxels)."""
    return torch.mean((torch.softmax(student_logits.float(), 1) - torch.softmax(teacher_logits.float(), 1)) ** 2)


class nnUNetTrainerMeanTeacher(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "ema_decay": 0.99,
        # noise on the teacher's input: N(0, std) clipped to +-clip (SSL4MIS: 0.1 and 0.2)
        "teacher_noise_std": 0.1,
        "teacher_noise_clip": 0.2,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "teacher_confidence")

    def build_ssl_modules(self):
        self.teacher = make_teacher(self.network).to(self.device)
        self.teacher.eval()

    def sync_ssl_modules_with_network(self):
        # the network may hold -pretrained_weights now, loaded after initialize()
        self.teacher.load_state_dict(unwrap_network(self.network).state_dict())

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
        x_l, x_u = labeled["data"], unlabeled["data"]
        n_l = x_l.shape[0]
        # one student pass over labeled and unlabeled patches: nnU-Net's InstanceNorm is per sample, so this
        # equals two passes and is cheaper
        outputs = self.as_list(self.network(torch.cat((x_l, x_u))))
        out_l = [o[:n_l] for o in outputs]
        out_u = [o[n_l:] for o in outputs]
        supervised = self.loss(out_l if self.enable_deep_supervision else out_l[0], labeled["target"])
        unsupervised, logs = self.unsupervised_loss(out_u, unlabeled)
        return supervised + unsupervised, logs

    def unsupervised_loss(self, student_out_u, unlabeled):
        """The weighted unsupervised term and its log values; variants (UA-MT, SemiSAM) override this."""
        teacher_out = self.teacher_predict(unlabeled["data"])
        consistency = DeepSupervisionWrapper(softmax_mse, self.deep_supervision_weights())(student_out_u,
                                                                                           teacher_out)
        weight = self.unsup_weight()
        with torch.no_grad():
            confidence = torch.softmax(teacher_out[0].float(), 1).max(1)[0].mean()
        return weight * consistency, {
            "unsup_loss": consistency.detach(), "unsup_weight": weight, "teacher_confidence": confidence}

    def after_optimizer_step(self):
        decay = ema_decay_with_warmup(self.ssl_iteration, self.ssl_settings["ema_decay"])
        ema_update(self.teacher, self.network, decay)

    def ssl_state_dict(self):
        return {"teacher_weights": self.teacher.state_dict()}

    def load_ssl_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher_weights"])


__all__ = ["nnUNetTrainerMeanTeacher", *make_budget_variants(nnUNetTrainerMeanTeacher, globals())]
