"""SynFoC (Ma et al., CVPR 2025): Self-Mutual-Confidence co-training of nnU-Net and a LoRA-tuned SAM.

The trainer combines the mathematics of ``math.py`` on the shared semi-supervised base and
:mod:`nnunet_foundation.foundation.lora`; ``sam_student.py`` predicts with the SAM student it trains.
"""
from __future__ import annotations

import math

import torch

from nnunet_foundation.methods.synfoc.math import ALPHA_STRATEGIES, alpha_for, cdcr_loss, copy_paste, targets_for
from nnunet_foundation.foundation.cotrained_sam import resolve_cotrained_generalist
from nnunet_foundation.methods.synfoc.sam_student import SAM_CONFIG_KEY, SAM_STUDENT_KEY, SAM_TEACHER_KEY
from nnunet_foundation.training.budgets import make_budget_variants
from nnunet_foundation.training.losses import ce_dice
from nnunet_foundation.training.semi_supervised import LossParts, nnUNetTrainerSemiSupervised
from nnunet_foundation.training.views import SYNFOC_STRENGTH, random_boxes



class nnUNetTrainerSynFoC(nnUNetTrainerSemiSupervised):
    """SynFoC: nnU-Net (student + EMA teacher) co-trained with a LoRA-tuned SAM (student + EMA teacher of its
    trainable parts) whose prompt-free multi-class head segments the patch slice-wise.

    Per iteration: the teachers predict the weak unlabeled view; alpha (``alpha_strategy``, default SMC) fuses their
    probabilities into one pseudo-label with a confidence mask (> ``confidence_threshold``); a random box of a labeled
    image is pasted into the strong view (training/views.py ``SYNFOC_STRENGTH``, the reference's: brightness and
    contrast U(0.1, 2) and a blur, always on; ground truth inside the box, confident everywhere inside); both students
    learn the labeled batch (nnU-Net's loss; CE + Dice for SAM) and the mixed image (masked CE + Dice), plus CDCR
    between them (averaged over all B x K x voxels, as the reference); the unlabeled terms are weighted by
    ``unsup_weight * exp(-5 (1 - t/T)^2)``. SAM's trainable parts use AdamW
    (``sam_lr``, ``sam_weight_decay``) following nnU-Net's poly schedule. ``network_weights`` holds the nnU-Net
    student (what ``nnUNetv2_predict`` runs); the SAM student/teacher (trainable parts), the nnU-Net teacher and the
    AdamW state are kept in the checkpoint for ``--c``.
    """

    num_strong_views = 1
    cotrained_sam = True
    # the reference's strong view: brightness and contrast U(0.1, 2) and a blur, always on (training/views.py)
    strong_view_strength = SYNFOC_STRENGTH
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "unsup_weight": 1.0,
        "ema_decay": 0.99,
        # one SAM-family configuration (JSON, dict or file; exactly one), as for SemiSAM; default LiteMedSAM
        "generalists": None,
        "lora_rank": 4,
        "sam_lr": 1e-4,
        "sam_weight_decay": 0.1,
        "alpha_strategy": "smc",
        "confidence_threshold": 0.95,
        "paste_min_area": 0.02,
        "paste_max_area": 0.4,
    }
    ssl_log_keys = ("unsup_loss", "unsup_weight", "alpha", "confident_fraction", "agreement")

    # nnU-Net's __init__ records its caller's arguments by name (locals()[name] for every parameter of
    # type(self).__init__), so a trainer's __init__ must keep exactly nnU-Net's signature: no *args/**kwargs.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        s = self.ssl_settings
        if s["alpha_strategy"] not in ALPHA_STRATEGIES:
            raise ValueError(f"{type(self).__name__}: alpha_strategy must be one of {ALPHA_STRATEGIES}, got "
                             f"{s['alpha_strategy']!r}")
        self.sam_config = self._sam_config()

    def _sam_config(self) -> dict:
        # LoRA scaling alpha / rank = 1 as in the reference (its LoRA_Sam adds B(A(x)) unscaled)
        rank = self.ssl_settings["lora_rank"]
        adapted = {"lora_rank": rank, "lora_alpha": float(rank), "train_decoder": True, "multiclass_head": True,
                   "num_classes": self.label_manager.num_segmentation_heads}
        from nnunet_foundation.foundation.config import colour_defaults

        # an R, G, B dataset (fundus, endoscopy) is shown to SAM in colour unless the setting names a channel
        config = resolve_cotrained_generalist(self.ssl_settings["generalists"], type(self).__name__,
                                              self.configuration_manager, implied=colour_defaults(self.dataset_json))
        return {**config, **adapted}

    # --------------------------------------------------------------------------------------------- modules
    def build_ssl_modules(self):
        from nnunet_foundation.foundation.config import build_generalist, describe_generalist
        from nnunet_foundation.foundation.lora import trainable_parameter_groups

        decay = self.ssl_settings["ema_decay"]
        self.teacher = self.add_ema_teacher("teacher_weights", self.network, decay)
        self.sam_student = build_generalist(self.sam_config).to(self.device)
        # the frozen SAM backbone is the same in student and teacher: only the adapted tensors are averaged
        self.sam_teacher = self.add_ema_teacher(SAM_TEACHER_KEY, self.sam_student, decay, trainable_only=True)
        groups = trainable_parameter_groups(self.sam_student, self.ssl_settings["sam_lr"],
                                            self.ssl_settings["sam_weight_decay"])
        for g in groups:  # the base class rescales these by nnU-Net's poly learning rate every epoch
            g["lr_scale"] = self.ssl_settings["sam_lr"] / self.initial_lr
        self.optimizer_sam = torch.optim.AdamW(groups)
        self.add_trained_module(self.sam_student, self.optimizer_sam)
        self.print_to_log_file(f"SynFoC SAM student (LoRA rank {self.ssl_settings['lora_rank']} on the image encoder, "
                               f"decoder and multi-class head trained): {describe_generalist(self.sam_config)}")

    def sam_logits(self, generalist, x: torch.Tensor) -> torch.Tensor:
        return generalist.multiclass_head.segment_patches(generalist, x)

    # ------------------------------------------------------------------------------------------- the step
    def compute_losses(self, labeled, unlabeled):
        s = self.ssl_settings
        x_l, target = labeled["data"], labeled["target"]
        y_l = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        x_w, x_s = unlabeled["data"], unlabeled["strong"][0]
        n_l, n_u = x_l.shape[0], x_w.shape[0]
        with torch.no_grad():
            p_teacher_u = torch.softmax(self.as_list(self.teacher(x_w))[0].float(), 1)
            p_student_u = torch.softmax(self.as_list(self.network(x_w))[0].float(), 1)
            p_teacher_s = torch.softmax(self.sam_logits(self.sam_teacher, x_w).float(), 1)
            alpha = alpha_for(s["alpha_strategy"], p_student_u, p_teacher_u, p_teacher_s, self.progress)
            targets = targets_for(s["alpha_strategy"], p_teacher_u, p_teacher_s,
                                  torch.nan_to_num(alpha, nan=1.0), s["confidence_threshold"])
            box = random_boxes(tuple(x_w.shape[2:]), n_u, min_area=s["paste_min_area"],
                               max_area=s["paste_max_area"], device=x_w.device)
            source = torch.arange(n_u, device=x_w.device) % n_l
            mixed = {}
            for name, (pseudo, confident) in targets.items():
                mixed[name] = copy_paste(x_s, x_l[source], y_l[source], pseudo, confident, box)
        x_mix, target_unet, conf_unet = mixed["unet"]
        _, target_sam, conf_sam = mixed["sam"]

        out_l, out_mix = self.forward_labeled_and_unlabeled(x_l, x_mix)
        supervised_unet = self.supervised_loss(out_l, target)
        logits_mix_unet = out_mix[0]
        sam_out = self.sam_logits(self.sam_student, torch.cat((x_l, x_mix)))
        supervised_sam = ce_dice(sam_out[:n_l], y_l)
        logits_mix_sam = sam_out[n_l:]

        pseudo_terms = ce_dice(logits_mix_unet, target_unet, conf_unet) + \
            ce_dice(logits_mix_sam, target_sam, conf_sam)
        cdcr, parts = cdcr_loss(torch.softmax(logits_mix_unet.float(), 1), torch.softmax(logits_mix_sam.float(), 1))
        unsupervised = pseudo_terms + cdcr
        weight = self.unsup_weight()
        alpha_log = float(alpha.nanmean()) if not torch.isnan(alpha).all() else math.nan
        return LossParts(supervised_unet + supervised_sam, weight * unsupervised, {
            "unsup_loss": unsupervised.detach(), "unsup_weight": weight, "alpha": alpha_log,
            "confident_fraction": conf_unet.float().mean(), "agreement": parts["agreement"]})

    # -------------------------------------------------------------------------------------------- checkpoint
    def ssl_state_dict(self):  # the base adds both EMA teachers
        from nnunet_foundation.foundation.lora import adaptable_state_dict

        return {**super().ssl_state_dict(), SAM_STUDENT_KEY: adaptable_state_dict(self.sam_student),
                SAM_CONFIG_KEY: self.sam_config}

    def load_ssl_state_dict(self, state):
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        super().load_ssl_state_dict(state)
        load_adaptable_state_dict(self.sam_student, state[SAM_STUDENT_KEY])


__all__ = ["nnUNetTrainerSynFoC", *make_budget_variants(nnUNetTrainerSynFoC, globals())]
