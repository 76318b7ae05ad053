"""Cross Pseudo Supervision (Chen et al., CVPR 2021).

Two networks of the same nnU-Net architecture, initialised differently, each trained with nnU-Net's loss on the
labeled batch and with cross-entropy towards the *other* network's hard prediction (argmax, no gradient) on the
unlabeled batch — and, as in the paper, on the labeled batch too (``cps_on_labeled``). The cross term is applied
at every deep-supervision scale with nnU-Net's scale weights and ramped up over training progress.

The second network has its own SGD optimiser with nnU-Net's settings and poly schedule. Inference uses the first
network (``network_weights``); the second is kept in the checkpoint for ``--c``. With ``-pretrained_weights`` only
the first network starts from them: two identical starts would make the cross supervision vanish.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.networks import unwrap_network
from nnunet_foundation.training.semi_supervised import nnUNetTrainerSemiSupervised


def cross_entropy_to_argmax(logits: torch.Tensor, other_logits: torch.Tensor) -> torch.Tensor:
    """CE of ``logits`` against the hard pseudo-label of ``other_logits`` (no gradient through the pseudo-label)."""
    return F.cross_entropy(logits.float(), other_logits.detach().argmax(1))


class nnUNetTrainerCPS(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        # SSL4MIS's CPS weight for medical segmentation (the paper's 1.5 is for Cityscapes/VOC)
        "unsup_weight": 0.1,
        "cps_on_labeled": True,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "agreement")

    def build_ssl_modules(self):
        network_b = self.build_network_architecture(
            self.plans_manager, self.configuration_manager, self.num_input_channels,
            self.label_manager.num_segmentation_heads, self.enable_deep_supervision).to(self.device)
        if self._do_i_compile():
            network_b = torch.compile(network_b)
        self.optimizer_b = torch.optim.SGD(network_b.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                                           momentum=0.99, nesterov=True)
        if self.is_ddp:
            network_b = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network_b)
            network_b = DDP(network_b, device_ids=[self.local_rank])
        self.network_b = network_b

    def extra_optimizers(self):
        return [(self.optimizer_b, self.network_b)]

    def on_train_epoch_start(self):
        self.network_b.train()
        super().on_train_epoch_start()

    def set_deep_supervision_enabled(self, enabled: bool):
        super().set_deep_supervision_enabled(enabled)
        unwrap_network(self.network_b).decoder.deep_supervision = enabled

    def compute_losses(self, labeled, unlabeled):
        x_l, x_u, target = labeled["data"], unlabeled["data"], labeled["target"]
        n_l = x_l.shape[0]
        x = torch.cat((x_l, x_u))
        out_a = self.as_list(self.network(x))
        out_b = self.as_list(self.network_b(x))

        def supervised(outputs):
            labeled_out = [o[:n_l] for o in outputs]
            return self.loss(labeled_out if self.enable_deep_supervision else labeled_out[0], target)

        start = 0 if self.ssl_settings["cps_on_labeled"] else n_l
        cross = DeepSupervisionWrapper(cross_entropy_to_argmax, self.deep_supervision_weights())
        cps = cross([o[start:] for o in out_a], [o[start:] for o in out_b]) + \
            cross([o[start:] for o in out_b], [o[start:] for o in out_a])
        weight = self.unsup_weight()
        with torch.no_grad():
            agreement = (out_a[0][n_l:].argmax(1) == out_b[0][n_l:].argmax(1)).float().mean()
        return supervised(out_a) + supervised(out_b) + weight * cps, {
            "unsup_loss": cps.detach(), "unsup_weight": weight, "agreement": agreement}

    def ssl_state_dict(self):
        return {"network_b_weights": unwrap_network(self.network_b).state_dict()}

    def load_ssl_state_dict(self, state):
        unwrap_network(self.network_b).load_state_dict(state["network_b_weights"])


__all__ = ["nnUNetTrainerCPS", *make_budget_variants(nnUNetTrainerCPS, globals())]
