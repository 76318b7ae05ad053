"""SynFoC's per-iteration mathematics on constructed inputs: SMC alpha (hand-computed, empty maps), every alpha
strategy, fused pseudo-label and confidence mask, copy-paste targets, CDCR terms."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_foundation.methods.synfoc.math import (ALPHA_STRATEGIES, alpha_for, cdcr_loss, copy_paste,
                                                   fused_pseudo_label, mean_foreground_dice, smc_alpha, targets_for)
from nnunet_foundation.training.views import random_boxes


def one_hot(hard: torch.Tensor, k: int = 3, confidence: float = 1.0) -> torch.Tensor:
    p = torch.nn.functional.one_hot(hard, k).movedim(-1, 1).float()
    return p * confidence + (1 - p) * (1 - confidence) / (k - 1)


def test_smc_alpha_matches_a_hand_computed_case_and_empty_maps_count_as_agreement():
    student = torch.zeros(2, 4, 4, dtype=torch.long)
    teacher = torch.zeros(2, 4, 4, dtype=torch.long)
    sam = torch.zeros(2, 4, 4, dtype=torch.long)
    # image 0: class 1 - student 4 px, teacher 6 px (overlap 4) -> Dice 8/10; class 2 absent everywhere -> 1
    student[0, 0, :4] = 1
    teacher[0, 0, :4] = 1
    teacher[0, 1, :2] = 1
    # teacher vs SAM: SAM has the same class-1 region (Dice 1) and a class-2 region the teacher lacks (Dice 0)
    sam[0] = teacher[0]
    sam[0, 3, 3] = 2
    # image 1: all background everywhere -> both factors 1
    alpha = smc_alpha(one_hot(student), one_hot(teacher), one_hot(sam))
    self_conf = (0.8 + 1.0) / 2
    mutual = (1.0 + 0.0) / 2
    assert alpha.tolist() == pytest.approx([self_conf * mutual, 1.0])
    assert mean_foreground_dice(student[1:], teacher[1:], 3).item() == 1.0


def test_every_alpha_strategy_runs_and_cps_swaps_the_targets():
    g = torch.Generator().manual_seed(0)
    s, t, m = (torch.softmax(torch.randn(2, 3, 5, 6, generator=g), 1) for _ in range(3))
    for strategy in ALPHA_STRATEGIES:
        alpha = alpha_for(strategy, s, t, m, progress=0.3)
        assert alpha.shape == (2,)
    assert alpha_for("constant", s, t, m, 0.3).tolist() == [0.5, 0.5]
    assert alpha_for("linear", s, t, m, 0.3).tolist() == pytest.approx([0.3, 0.3])
    torch.testing.assert_close(alpha_for("smc", s, t, m, 0.0),
                               alpha_for("self", s, t, m, 0.0) * alpha_for("mutual", s, t, m, 0.0))
    with pytest.raises(ValueError, match="unknown alpha strategy"):
        alpha_for("average", s, t, m, 0.0)
    targets = targets_for("cps", t, m, alpha_for("cps", s, t, m, 0.0), threshold=0.0)
    assert torch.equal(targets["unet"][0], m.argmax(1)) and torch.equal(targets["sam"][0], t.argmax(1))


def test_fused_pseudo_label_and_confidence_mask():
    unet = one_hot(torch.tensor([[0, 1, 2, 1]]), confidence=0.99)
    sam = one_hot(torch.tensor([[0, 1, 1, 2]]), confidence=0.99)
    label, confident = fused_pseudo_label(unet, sam, torch.tensor([0.7]))
    # voxel 2: 0.7 * p_U(2) + 0.3 * p_S(2) -> class 2 with 0.7*0.99 + 0.3*0.005 = 0.6945: not confident
    assert label.tolist() == [[0, 1, 2, 1]] and confident.tolist() == [[True, True, False, False]]
    label, confident = fused_pseudo_label(unet, sam, torch.tensor([1.0]))
    assert torch.equal(label, unet.argmax(1)) and bool(confident.all())


def test_copy_paste_targets_are_labels_inside_the_box_and_pseudo_labels_outside():
    g = torch.Generator().manual_seed(1)
    box = random_boxes((8, 10, 6), 3, g)
    fractions = box.flatten(1).float().mean(1)
    assert bool(((fractions > 0.005) & (fractions < 0.5)).all())
    unlabeled, labeled = torch.zeros(3, 1, 8, 10, 6), torch.ones(3, 1, 8, 10, 6)
    labels = torch.full((3, 8, 10, 6), 2)
    pseudo = torch.ones(3, 8, 10, 6, dtype=torch.long)
    confident = torch.zeros(3, 8, 10, 6, dtype=torch.bool)
    mixed, target, confidence = copy_paste(unlabeled, labeled, labels, pseudo, confident, box)
    assert torch.equal(mixed[:, 0] == 1, box)
    assert torch.equal(target == 2, box) and torch.equal(target == 1, ~box)
    assert torch.equal(confidence, box)  # confident only inside the pasted labeled box here


def test_cdcr_entropy_where_the_students_agree_mse_where_they_disagree_normalised_as_the_reference():
    a = torch.tensor([[[0.9, 0.6]], [[0.1, 0.4]]]).unsqueeze(0)  # (1, K=2, 1, 2): argmax 0, 0
    b = torch.tensor([[[0.8, 0.3]], [[0.2, 0.7]]]).unsqueeze(0)  # argmax 0, 1: voxel 0 agrees, voxel 1 differs
    loss, parts = cdcr_loss(a.flatten(2), b.flatten(2))

    def h(p):
        return -sum(x * math.log(x) for x in p)

    # the official code's .mean() over the masked (B, K, voxels) maps: S = 1 x 2 x 2 = 4 elements for every term,
    # (mean(-p_S log p_S [agree]) + mean(-p_U log p_U [agree])) / 2 and mean((p_S - p_U)^2 [disagree])
    elements = 1 * 2 * 2
    consensus = (h([0.9, 0.1]) + h([0.8, 0.2])) / (2 * elements)  # = (0.3251 + 0.5004) / 8 = 0.10319
    divergence = ((0.6 - 0.3) ** 2 + (0.4 - 0.7) ** 2) / elements  # = 0.045
    assert consensus == pytest.approx(0.10319, abs=1e-5) and divergence == pytest.approx(0.045)
    assert parts["consensus"].item() == pytest.approx(consensus, rel=1e-5)
    assert parts["divergence"].item() == pytest.approx(divergence, rel=1e-5)
    assert loss.item() == pytest.approx(consensus + divergence, rel=1e-5) and parts["agreement"].item() == 0.5
    # both terms train: gradients reach both students
    a_, b_ = a.flatten(2).clone().requires_grad_(), b.flatten(2).clone().requires_grad_()
    cdcr_loss(a_, b_)[0].backward()
    assert a_.grad.abs().sum() > 0 and b_.grad.abs().sum() > 0


def test_synfoc_strong_view_is_the_references_brightness_contrast_and_blur_without_noise():
    from nnunet_foundation.methods.synfoc.trainer import nnUNetTrainerSynFoC
    from nnunet_foundation.training.views import SYNFOC_STRENGTH, strong_view

    assert nnUNetTrainerSynFoC.strong_view_strength is SYNFOC_STRENGTH and nnUNetTrainerSynFoC.num_strong_views == 1
    torch.manual_seed(0)
    view = strong_view(torch.ones(2000, 1, 5, 5), SYNFOC_STRENGTH)
    # a constant image keeps its contrast and blur; only the brightness factor U(0.1, 2) remains, and no noise
    factors = view[:, 0, 0, 0]
    assert torch.allclose(view, factors.view(-1, 1, 1, 1).expand_as(view), atol=1e-5)
    assert 0.1 <= float(factors.min()) < 0.15 and 1.95 < float(factors.max()) <= 2.0
