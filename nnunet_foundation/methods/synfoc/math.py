"""SynFoC's per-iteration mathematics as pure tensor functions, each checked on constructed inputs
(tests/test_synfoc_math.py): the SMC weight, the weighting strategies of the paper's ablation, the fused pseudo-label
with its confidence mask, copy-paste of a labeled box into the strong unlabeled view, and the consensus-divergence
consistency (CDCR). ``trainer.py`` combines them.

Shapes: probabilities ``(B, K, *spatial)`` (softmax over K classes, channel 0 background), hard maps ``(B, *spatial)``.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from nnunet_foundation.training.losses import entropy
from nnunet_foundation.training.views import paste_boxes

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


def copy_paste(unlabeled: torch.Tensor, labeled: torch.Tensor, labels: torch.Tensor, pseudo: torch.Tensor,
               confident: torch.Tensor, box: torch.Tensor
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paste the labeled image's ``box`` into the (strong) unlabeled view.

    Args: images ``(B, C, *spatial)``, ``labels``/``pseudo`` ``(B, *spatial)`` int, ``confident``/``box``
    ``(B, *spatial)`` bool. Returns the mixed image, its target (ground truth inside the box, pseudo-label outside)
    and its confidence mask (always confident inside the box, where the target is a real label).
    """
    return paste_boxes(box, unlabeled, labeled), paste_boxes(box, pseudo.long(), labels.long()), confident | box


def cdcr_loss(probs_unet: torch.Tensor, probs_sam: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Consensus-Divergence Consistency Regularisation on the two students' predictions of the mixed image.

    Where their argmaxes agree (consensus), both are made confident: the mean of their entropies; where they
    disagree, their probability maps are pulled together: the squared difference (a positive term: the paper prints a
    minus sign in front, a typo, since maximising the difference would push the models apart).

    Normalised as the official code (MQinghe/SynFoC, ``train.py``) does: each masked elementwise map is averaged over
    *all* B x K x voxels, not over the voxels of its own mask, so with S = B K N::

        consensus  = (sum_v [agree] H(p_U) + sum_v [agree] H(p_S)) / (2 S)
        divergence = sum_v [disagree] sum_k (p_U,k - p_S,k)^2 / S

    Each term therefore shrinks with the fraction of voxels it covers (a few disagreeing voxels pull weakly), where
    normalising by the mask's own voxel count would give them the weight of the whole patch.
    Returns (loss, {"consensus", "divergence", "agreement"}).
    """
    agree = probs_unet.argmax(1) == probs_sam.argmax(1)
    agree_f = agree.float()
    elements = probs_unet.numel()  # B x K x voxels: the reference's .mean() over the masked (B, K, *spatial) maps
    entropies = (entropy(probs_unet) + entropy(probs_sam))[:, 0]
    consensus = (entropies * agree_f).sum() / (2 * elements)
    squared = ((probs_unet - probs_sam) ** 2).sum(1)
    divergence = (squared * (1 - agree_f)).sum() / elements
    return consensus + divergence, {"consensus": consensus.detach(), "divergence": divergence.detach(),
                                    "agreement": agree_f.mean().detach()}
