"""Multi-modal semi-supervised training: nnU-Net's loss on the fused prediction of :class:`MultiModalUNet`, and on
unlabeled crops each modality's own prediction pulled towards the fused one (cross-modal consistency).

Source: a paper abstract (BraTS 2019 HGG): supervised loss + cross-modal consistency on unlabeled data, each
modality stream's prediction consistent with the fused prediction; the details are ours: softmax MSE at every
deep-supervision scale with nnU-Net's weights, the fused prediction detached (it is the better-informed teacher of
each modality, not the other way round), averaged over modalities, weight ``unsup_weight`` (1) with the base's
exponential ramp-up. Every modality stream shares the decoder with the fused path, so the consistency also teaches
the decoder to read each modality's features - what keeps a case with a weak or corrupted modality segmentable.
Inference: the fused prediction, with stock ``nnUNetv2_predict`` (the network class comes from the plans).
"""
from __future__ import annotations

import torch

from nnunet_foundation.methods.multimodal.network import MultiModalUNet
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import over_scales, softmax_mse
from nnunet_foundation.training.networks import unwrap_network
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised


class nnUNetTrainerMultiModalSSL(nnUNetTrainerSemiSupervised):
    default_settings = {**nnUNetTrainerSemiSupervised.default_settings, "unsup_weight": 1.0}
    ssl_log_keys = ("unsup_loss", "unsup_weight", "modality_agreement")

    def build_ssl_modules(self):
        if not isinstance(unwrap_network(self.network), MultiModalUNet):
            raise RuntimeError(
                f"{type(self).__name__} needs the multi-modal network, and the plans build "
                f"{type(unwrap_network(self.network)).__name__}. Write plans for it with 'nnunet-foundation "
                f"multimodal-plans -d DATASET' and train with '-p nnUNetPlansMultiModal'.")

    def compute_losses(self, labeled, unlabeled):
        n = labeled["data"].shape[0]
        # one pass over labeled and unlabeled crops, through the (possibly DDP/compiled) network itself
        fused, streams = self.network(torch.cat((labeled["data"], unlabeled["data"])), streams=True)
        fused = self.as_list(fused)
        streams = [self.as_list(s) for s in streams]
        scales = self.deep_supervision_weights()
        with torch.no_grad():
            fused_probs = [torch.softmax(o[n:].float(), 1) for o in fused]
        consistency = sum(over_scales(softmax_mse, scales, [o[n:] for o in s], fused_probs) for s in streams) / \
            len(streams)
        with torch.no_grad():
            agreement = sum((s[0][n:].argmax(1) == fused[0][n:].argmax(1)).float().mean() for s in streams) / \
                len(streams)
        weight = self.unsup_weight()
        return LossParts(self.supervised_loss([o[:n] for o in fused], labeled["target"]), weight * consistency,
                         {"unsup_loss": consistency.detach(), "unsup_weight": weight, "modality_agreement": agreement})


__all__ = ["nnUNetTrainerMultiModalSSL", *make_budget_variants(nnUNetTrainerMultiModalSSL, globals())]
