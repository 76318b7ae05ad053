"""Cross Pseudo Supervision (Chen et al., CVPR 2021).

Two networks of the same nnU-Net architecture, initialised differently, each trained with nnU-Net's loss on the
labeled batch and with cross-entropy towards the *other* network's hard prediction (argmax, no gradient) on the
unlabeled batch — and, as in the paper, on the labeled batch too (``cps_on_labeled``). The cross term is applied
at every deep-supervision scale with nnU-Net's scale weights and ramped up over training progress.

The second network is set up like nnU-Net's own (its optimiser from ``configure_optimizers``, nnU-Net's schedule).
Inference uses the first network (``network_weights``); the second is kept in the checkpoint for ``--c``. With
``-pretrained_weights`` only the first network starts from them: two identical starts would make the cross
supervision vanish.
"""
from __future__ import annotations

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import cross_entropy, over_scales
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised


class nnUNetTrainerCPS(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        # SSL4MIS's CPS weight for medical segmentation (the paper's 1.5 is for Cityscapes/VOC)
        "unsup_weight": 0.1,
        "cps_on_labeled": True,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "agreement")

    def build_ssl_modules(self):
        self.network_b, self.optimizer_b = self.build_extra_network("network_b_weights")

    def compute_losses(self, labeled, unlabeled):
        x_l, x_u, target = labeled["data"], unlabeled["data"], labeled["target"]
        l_a, u_a = self.forward_labeled_and_unlabeled(x_l, x_u)
        l_b, u_b = self.forward_labeled_and_unlabeled(x_l, x_u, self.network_b)
        # each network learns the other's argmax (no gradient through it), on labeled patches too if asked
        with_labeled = self.ssl_settings["cps_on_labeled"]
        out_a = [torch.cat((l, u)) for l, u in zip(l_a, u_a)] if with_labeled else u_a
        out_b = [torch.cat((l, u)) for l, u in zip(l_b, u_b)] if with_labeled else u_b
        scales = self.deep_supervision_weights()
        cps = over_scales(cross_entropy, scales, out_a, [o.detach().argmax(1) for o in out_b]) + \
            over_scales(cross_entropy, scales, out_b, [o.detach().argmax(1) for o in out_a])
        weight = self.unsup_weight()
        with torch.no_grad():
            agreement = (u_a[0].argmax(1) == u_b[0].argmax(1)).float().mean()
        supervised = self.supervised_loss(l_a, target) + self.supervised_loss(l_b, target)
        return LossParts(supervised, weight * cps, {"unsup_loss": cps.detach(), "unsup_weight": weight,
                                                    "agreement": agreement})


__all__ = ["nnUNetTrainerCPS", *make_budget_variants(nnUNetTrainerCPS, globals())]
