"""SynFoC (Ma et al., CVPR 2025): Self-Mutual-Confidence co-training of nnU-Net and a LoRA-tuned SAM.

The first half holds the per-iteration mathematics as pure tensor functions, each checked on constructed inputs
(tests/test_synfoc_math.py): the SMC weight, the weighting strategies of the paper's ablation, the fused pseudo-label
with its confidence mask, copy-paste mixing of a labeled box into the strong unlabeled view, and the
consensus-divergence consistency (CDCR). The second half is ``nnUNetTrainerSynFoC``, which combines them on top of
the shared semi-supervised trainer and :mod:`nnunet_foundation.foundation.lora`.

Shapes: probabilities ``(B, K, *spatial)`` (softmax over K classes, channel 0 background), hard maps ``(B, *spatial)``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

ALPHA_STRATEGIES = ("smc", "constant", "linear", "self", "mutual", "cps")


def mean_foreground_dice(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-image Dice of two hard maps ``(B, *spatial)``, averaged over the foreground classes; a class absent from
    both maps counts as perfect agreement (1), so two empty maps have Dice 1."""
    dims = tuple(range(1, a.ndim))
    scores = []
    for k in range(1, num_classes):
        x, y = (a == k).float(), (b == k).float()
        total = x.sum(dims) + y.sum(dims)
        overlap = 2 * (x * y).sum(dims)
        scores.append(torch.where(total > 0, overlap / total.clamp_min(1e-8), torch.ones_like(total)))
    return torch.stack(scores, 1).mean(1) if scores else torch.ones(a.shape[0], device=a.device)


def smc_alpha(student_unet: torch.Tensor, teacher_unet: torch.Tensor, teacher_sam: torch.Tensor) -> torch.Tensor:
    """Self-Mutual Confidence per image: ``Dice(student U, teacher U) * Dice(teacher U, teacher SAM)`` on argmaxes.

    Self confidence (is the conventional model stable under its own EMA?) times mutual confidence (do the two
    teachers agree?): alpha is high when nnU-Net's teacher is both steady and confirmed by SAM.
    """
    k = teacher_unet.shape[1]
    hard_s, hard_t, hard_sam = student_unet.argmax(1), teacher_unet.argmax(1), teacher_sam.argmax(1)
    return mean_foreground_dice(hard_s, hard_t, k) * mean_foreground_dice(hard_t, hard_sam, k)


def alpha_for(strategy: str, student_unet: torch.Tensor, teacher_unet: torch.Tensor, teacher_sam: torch.Tensor,
              progress: float) -> torch.Tensor:
    """The weight of nnU-Net's teacher in the fused target, per image, for each strategy of the paper's ablation:

    ``smc`` (default) as :func:`smc_alpha`; ``constant`` 0.5; ``linear`` t/T (trust shifts from SAM to nnU-Net);
    ``self`` only the self-confidence factor; ``mutual`` only the mutual factor; ``cps``: not a fusion (each student is
    supervised by the *other* model's teacher, see :func:`targets_for`), alpha returned as NaN.
    """
    b, k, device = teacher_unet.shape[0], teacher_unet.shape[1], teacher_unet.device
    if strategy == "smc":
        return smc_alpha(student_unet, teacher_unet, teacher_sam)
    if strategy == "constant":
        return torch.full((b,), 0.5, device=device)
    if strategy == "linear":
        return torch.full((b,), float(progress), device=device)
    if strategy == "self":
        return mean_foreground_dice(student_unet.argmax(1), teacher_unet.argmax(1), k)
    if strategy == "mutual":
        return mean_foreground_dice(teacher_unet.argmax(1), teacher_sam.argmax(1), k)
    if strategy == "cps":
        return torch.full((b,), float("nan"), device=device)
    raise ValueError(f"unknown alpha strategy {strategy!r}; choose one of {ALPHA_STRATEGIES}")


def fused_pseudo_label(teacher_unet: torch.Tensor, teacher_sam: torch.Tensor, alpha: torch.Tensor,
                       threshold: float = 0.95) -> Tuple[torch.Tensor, torch.Tensor]:
    """``P = alpha p_U + (1 - alpha) p_S`` per image; returns (argmax P, mask of voxels with max P > threshold)."""
    a = alpha.view(-1, *[1] * (teacher_unet.ndim - 1)).to(teacher_unet.dtype)
    fused = a * teacher_unet + (1 - a) * teacher_sam
    confidence, label = fused.max(1)
    return label, confidence > threshold


def targets_for(strategy: str, teacher_unet: torch.Tensor, teacher_sam: torch.Tensor, alpha: torch.Tensor,
                threshold: float = 0.95) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """(pseudo-label, confidence mask) for each student: the fused target for both, except with ``cps``, where the
    nnU-Net student learns from SAM's teacher and the SAM student from nnU-Net's teacher."""
    if strategy == "cps":
        from_sam = fused_pseudo_label(teacher_sam, teacher_sam, torch.ones_like(alpha), threshold)
        from_unet = fused_pseudo_label(teacher_unet, teacher_unet, torch.ones_like(alpha), threshold)
        return {"unet": from_sam, "sam": from_unet}
    fused = fused_pseudo_label(teacher_unet, teacher_sam, alpha, threshold)
    return {"unet": fused, "sam": fused}


def random_boxes(shape: Tuple[int, ...], batch: int, generator: Optional[torch.Generator] = None,
                 min_area: float = 0.02, max_area: float = 0.4, device=None) -> torch.Tensor:
    """One random axis-aligned box per image covering ``min_area``..``max_area`` of the patch (by volume), as a
    boolean mask ``(B, *shape)``: the region of the labeled image pasted into the unlabeled one."""
    masks = torch.zeros((batch, *shape), dtype=torch.bool, device=device)
    ndim = len(shape)
    for i in range(batch):
        area = float(torch.empty(1).uniform_(min_area, max_area, generator=generator))
        # equal relative side lengths give the requested volume fraction
        fraction = area ** (1.0 / ndim)
        index = []
        for size in shape:
            side = max(1, min(size, int(round(size * fraction))))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            index.append(slice(start, start + side))
        masks[(i, *index)] = True
    return masks


def copy_paste(unlabeled: torch.Tensor, labeled: torch.Tensor, labels: torch.Tensor, pseudo: torch.Tensor,
               confident: torch.Tensor, box: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the labeled image's ``box`` into the (strong) unlabeled view.

    Args: images ``(B, C, *spatial)``, ``labels``/``pseudo`` ``(B, *spatial)`` int, ``confident``/``box``
    ``(B, *spatial)`` bool. Returns the mixed image, its target (ground truth inside the box, pseudo-label outside)
    and its confidence mask (always confident inside the box, where the target is a real label).
    """
    inside = box.unsqueeze(1)
    mixed = torch.where(inside, labeled, unlabeled)
    target = torch.where(box, labels.long(), pseudo.long())
    confidence = confident | box
    return mixed, target, confidence


def entropy_map(probs: torch.Tensor) -> torch.Tensor:
    """Per-voxel entropy ``(B, *spatial)`` of class probabilities."""
    return -(probs * torch.log(probs.clamp_min(1e-8))).sum(1)


def cdcr_loss(probs_unet: torch.Tensor, probs_sam: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Consensus-Divergence Consistency Regularisation on the two students' predictions of the mixed image.

    Where their argmaxes agree (consensus), both are made confident: the sum of their entropies; where they disagree,
    their probability maps are pulled together: the mean over classes of the squared difference (a positive term: the
    paper prints a minus sign in front, a typo, since maximising the difference would push the models apart).
    Each term is averaged over its own voxels; returns (loss, {"consensus", "divergence", "agreement"}).
    """
    agree = probs_unet.argmax(1) == probs_sam.argmax(1)
    agree_f = agree.float()
    n_agree, n_disagree = agree_f.sum(), (1 - agree_f).sum()
    entropy = entropy_map(probs_unet) + entropy_map(probs_sam)
    consensus = (entropy * agree_f).sum() / n_agree.clamp_min(1)
    squared = ((probs_unet - probs_sam) ** 2).mean(1)
    divergence = (squared * (1 - agree_f)).sum() / n_disagree.clamp_min(1)
    return consensus + divergence, {"consensus": consensus.detach(), "divergence": divergence.detach(),
                                    "agreement": agree_f.mean().detach()}



# =============================================================================================== the trainer
import copy  # noqa: E402
import math  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from nnunet_foundation.training.budgets import make_budget_variants  # noqa: E402
from nnunet_foundation.training.networks import ema_decay_with_warmup, ema_update, make_teacher  # noqa: E402
from nnunet_foundation.training.semi_supervised import nnUNetTrainerSemiSupervised  # noqa: E402


def masked_ce_dice(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes) of ``logits (B, K, ...)`` against ``target (B, ...)``, counted
    only where ``mask (B, ...)`` is True (confident pseudo-labels and pasted ground truth)."""
    mask_f = mask.float()
    n = mask_f.sum().clamp_min(1.0)
    ce = (F.cross_entropy(logits.float(), target, reduction="none") * mask_f).sum() / n
    probs = torch.softmax(logits.float(), 1)
    one_hot = F.one_hot(target, probs.shape[1]).movedim(-1, 1).float()
    m = mask_f.unsqueeze(1)
    dims = (0,) + tuple(range(2, probs.ndim))
    intersection = (probs * one_hot * m).sum(dims)
    denominator = (probs * m).sum(dims) + (one_hot * m).sum(dims)
    dice = (2 * intersection + 1e-5) / (denominator + 1e-5)
    return ce + (1 - dice[1:].mean())


class nnUNetTrainerSynFoC(nnUNetTrainerSemiSupervised):
    """SynFoC: nnU-Net (student + EMA teacher) co-trained with a LoRA-tuned SAM (student + EMA teacher of its
    trainable parts) whose prompt-free multi-class head segments the patch slice-wise.

    Per iteration: the teachers predict the weak unlabeled view; alpha (``alpha_strategy``, default SMC) fuses their
    probabilities into one pseudo-label with a confidence mask (> ``confidence_threshold``); a random box of a labeled
    image is pasted into the strong view (ground truth inside, confident everywhere inside); both students learn the
    labeled batch (nnU-Net's loss; CE + Dice for SAM) and the mixed image (masked CE + Dice), plus CDCR between them;
    the unlabeled terms are weighted by ``unsup_weight * exp(-5 (1 - t/T)^2)``. SAM's trainable parts use AdamW
    (``sam_lr``, ``sam_weight_decay``) following nnU-Net's poly schedule. ``network_weights`` holds the nnU-Net
    student (what ``nnUNetv2_predict`` runs); the SAM student/teacher (trainable parts), the nnU-Net teacher and the
    AdamW state are kept in the checkpoint for ``--c``.
    """

    needs_strong_view = True
    default_settings = {
        **nnUNetTrainerSemiSupervised.default_settings,
        "unsup_weight": 1.0,
        "ema_decay": 0.99,
        "generalist": None,  # one SAM/MedSAM configuration (JSON, dict or file), as for SemiSAM
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
        from nnunet_foundation.foundation.config import (GeneralistConfig, parse_generalist_setting,
                                                         require_checkpoint_file)
        from nnunet_foundation.methods.semisam import CONFIGURE_HINT

        raw = self.ssl_settings["generalist"]
        if raw in (None, ""):
            raise ValueError(f"{type(self).__name__} fine-tunes a SAM/MedSAM model and none is configured.\n"
                             + CONFIGURE_HINT.replace("nnUNet_ssl_generalists", "nnUNet_ssl_generalist"))
        parsed = parse_generalist_setting(raw) if isinstance(raw, str) else GeneralistConfig.from_dict(raw)
        if isinstance(parsed, list):
            raise ValueError(f"{type(self).__name__} co-trains exactly one SAM model; 'generalist' holds a list")
        config = {**parsed.to_dict(), "lora_rank": self.ssl_settings["lora_rank"], "train_decoder": True,
                  "multiclass_head": True, "num_classes": self.label_manager.num_segmentation_heads}
        if parsed.backend not in ("sam", "medsam"):
            raise ValueError(f"{type(self).__name__}: LoRA fine-tuning is implemented for the 'sam' and 'medsam' "
                             f"backends, not {parsed.backend!r}")
        if len(self.configuration_manager.patch_size) == 3:
            config["spacing"] = [float(x) for x in self.configuration_manager.spacing]
        require_checkpoint_file(GeneralistConfig.from_dict(config), "nnUNet_ssl_generalist")  # validate now
        return config

    # --------------------------------------------------------------------------------------------- modules
    def build_ssl_modules(self):
        from nnunet_foundation.foundation.config import build_generalist
        from nnunet_foundation.foundation.lora import trainable_parameter_groups

        self.teacher = make_teacher(self.network).to(self.device)
        self.teacher.eval()
        self.sam_student = build_generalist(self.sam_config).to(self.device)
        self.sam_teacher = copy.deepcopy(self.sam_student)
        for p in self.sam_teacher.parameters():
            p.requires_grad_(False)
        self.sam_teacher.train(False)
        groups = trainable_parameter_groups(self.sam_student, self.ssl_settings["sam_lr"],
                                            self.ssl_settings["sam_weight_decay"])
        for g in groups:  # the base class rescales these by nnU-Net's poly learning rate every epoch
            g["lr_scale"] = self.ssl_settings["sam_lr"] / self.initial_lr
        self.optimizer_sam = torch.optim.AdamW(groups)

    def sync_ssl_modules_with_network(self):
        from nnunet_foundation.training.networks import unwrap_network

        self.teacher.load_state_dict(unwrap_network(self.network).state_dict())

    def extra_optimizers(self):
        return [(self.optimizer_sam, self.sam_student)]

    def on_train_epoch_start(self):
        self.sam_student.train()
        super().on_train_epoch_start()

    def sam_logits(self, generalist, x: torch.Tensor) -> torch.Tensor:
        return generalist.multiclass_head.segment_patches(generalist, x)

    # ------------------------------------------------------------------------------------------- the step
    def compute_losses(self, labeled, unlabeled):
        s = self.ssl_settings
        x_l, target = labeled["data"], labeled["target"]
        y_l = (target[0] if isinstance(target, (list, tuple)) else target)[:, 0].long()
        x_w, x_s = unlabeled["data"], unlabeled["data_strong"]
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

        # nnU-Net student: labeled + mixed in one pass (InstanceNorm is per sample)
        outputs = self.as_list(self.network(torch.cat((x_l, x_mix))))
        out_l = [o[:n_l] for o in outputs]
        supervised_unet = self.loss(out_l if self.enable_deep_supervision else out_l[0], target)
        logits_mix_unet = outputs[0][n_l:]
        # SAM student: labeled + mixed
        sam_out = self.sam_logits(self.sam_student, torch.cat((x_l, x_mix)))
        supervised_sam = masked_ce_dice(sam_out[:n_l], y_l, torch.ones_like(y_l, dtype=torch.bool))
        logits_mix_sam = sam_out[n_l:]

        pseudo_terms = masked_ce_dice(logits_mix_unet, target_unet, conf_unet) + \
            masked_ce_dice(logits_mix_sam, target_sam, conf_sam)
        cdcr, parts = cdcr_loss(torch.softmax(logits_mix_unet.float(), 1), torch.softmax(logits_mix_sam.float(), 1))
        unsupervised = pseudo_terms + cdcr
        weight = self.unsup_weight()
        alpha_log = float(alpha.nanmean()) if not torch.isnan(alpha).all() else math.nan
        return supervised_unet + supervised_sam + weight * unsupervised, {
            "unsup_loss": unsupervised.detach(), "unsup_weight": weight, "alpha": alpha_log,
            "confident_fraction": conf_unet.float().mean(), "agreement": parts["agreement"]}

    def after_optimizer_step(self):
        decay = ema_decay_with_warmup(self.ssl_iteration, self.ssl_settings["ema_decay"])
        ema_update(self.teacher, self.network, decay)
        teacher_params = dict(self.sam_teacher.named_parameters())
        with torch.no_grad():
            for name, p in self.sam_student.named_parameters():
                if p.requires_grad:
                    teacher_params[name].mul_(decay).add_(p.detach(), alpha=1 - decay)

    # -------------------------------------------------------------------------------------------- checkpoint
    def ssl_state_dict(self):
        from nnunet_foundation.foundation.lora import adaptable_state_dict

        return {"teacher_weights": self.teacher.state_dict(),
                "sam_student": adaptable_state_dict(self.sam_student),
                "sam_teacher": {n: p.detach().clone() for n, p in self.sam_teacher.named_parameters()
                                if self.sam_student.is_trainable_parameter(n)},
                "sam_config": self.sam_config}

    def load_ssl_state_dict(self, state):
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        self.teacher.load_state_dict(state["teacher_weights"])
        load_adaptable_state_dict(self.sam_student, state["sam_student"])
        teacher_params = dict(self.sam_teacher.named_parameters())
        with torch.no_grad():
            for name, value in state["sam_teacher"].items():
                teacher_params[name].copy_(value)


__all__ = ["nnUNetTrainerSynFoC", *make_budget_variants(nnUNetTrainerSynFoC, globals())]
