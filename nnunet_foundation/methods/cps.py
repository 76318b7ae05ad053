"""Cross Pseudo Supervision (Chen et al., CVPR 2021).

Two networks of the same nnU-Net architecture, initialised differently, each trained with nnU-Net's loss on the
labeled batch and with cross-entropy towards the *other* network's hard prediction (argmax, no gradient) on the
unlabeled batch — and, as in the paper, on the labeled batch too (``cps_on_labeled``). The cross term is applied
at every deep-supervision scale with nnU-Net's scale weights and ramped up over training progress.

The second network is set up like nnU-Net's own (its optimiser from ``configure_optimizers``, nnU-Net's schedule).
Inference uses the first network (``network_weights``); the second is kept in the checkpoint for ``--c``.

Starting from pretrained weights (``nnUNetv2_train ... -pretrained_weights FILE``, e.g. from nnU-Net's
self-supervised pretraining or a bigger model; nnU-Net loads them into the first network after ``initialize()``):
with ``pretrained_start`` = ``perturbed_copy`` (default) the second network starts from the same weights plus
Gaussian noise of ``pretrained_perturbation`` x each tensor's standard deviation. The two must differ: CPS learns from
where the networks disagree, and two identical networks agree everywhere, so each would only be told its own argmax
(self-training with hard labels, which confirms its mistakes). A fresh second network (``fresh``, the behaviour
without pretrained weights) would differ but throw away the pretraining for half of the pair. Whether weights were
loaded is seen, not configured: the first network's weights at train start are compared with those ``initialize()``
built.
"""
from __future__ import annotations

import hashlib

import torch

from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import cross_entropy, over_scales
from nnunet_foundation.training.networks import unwrap_network
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised


def weights_digest(state_dict) -> str:
    """SHA-256 of a state dict's names and values (read through the CPU one tensor at a time)."""
    digest = hashlib.sha256()
    for name, value in state_dict.items():
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


class nnUNetTrainerCPS(nnUNetTrainerSemiSupervised):
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        # SSL4MIS's CPS weight for medical segmentation (the paper's 1.5 is for Cityscapes/VOC)
        "unsup_weight": 0.1,
        "cps_on_labeled": True,
        # after -pretrained_weights: network B = those weights + noise ('perturbed_copy') or a fresh init ('fresh')
        "pretrained_start": "perturbed_copy",
        "pretrained_perturbation": 0.05,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "agreement")

    def build_ssl_modules(self):
        if self.ssl_settings["pretrained_start"] not in ("perturbed_copy", "fresh"):
            raise ValueError(f"{type(self).__name__}: setting 'pretrained_start' must be 'perturbed_copy' or 'fresh', "
                             f"got {self.ssl_settings['pretrained_start']!r}")
        self.network_b, self.optimizer_b = self.build_extra_network("network_b_weights")
        # what initialize() built, to see at train start whether nnU-Net loaded -pretrained_weights over it (a
        # digest, not a second copy of the weights on the device)
        self._initial_digest_a = weights_digest(unwrap_network(self.network).state_dict())

    def sync_ssl_modules_with_network(self):
        super().sync_ssl_modules_with_network()
        net_a = unwrap_network(self.network)
        pretrained = weights_digest(net_a.state_dict()) != self._initial_digest_a
        if not pretrained or self.ssl_settings["pretrained_start"] != "perturbed_copy":
            return
        scale = self.ssl_settings["pretrained_perturbation"]
        net_b = unwrap_network(self.network_b)
        net_b.load_state_dict(net_a.state_dict())
        # the same seeded noise on every DDP rank, so that the ranks' copies of network B stay identical
        generator = torch.Generator().manual_seed(20210301)
        with torch.no_grad():
            for p in net_b.parameters():
                if p.numel() > 1:  # a tensor's spread sets its noise; scalars and norms' single values are kept
                    noise = torch.randn(p.shape, generator=generator).to(device=p.device, dtype=p.dtype)
                    p.add_(noise * p.std() * scale)
        self.print_to_log_file(f"CPS: network A starts from the pretrained weights, network B from the same weights "
                               f"+ Gaussian noise of {scale} x each tensor's std (pretrained_start='perturbed_copy')")

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
