"""A Mean Teacher step (fixed seed, fixed batch) against numbers recorded with the code before the engine refactor of
issue 11, and against an independent re-implementation of the loss and the EMA formula.

The recorded numbers pin the whole step (loss, logged scalars, the SGD step of the student and the EMA update of the
teacher) on this code base; the re-implementation says what those numbers are, so the test stays meaningful if a
library update moves the last digits.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_foundation.training.networks import unwrap_network

from conftest import FULL_WIDTH_PLANS

# recorded with commit 13cf667 (before the refactor) on CPU, float32, with nnU-Net's planned network widths (the
# other tests train narrowed networks: conftest.narrow_planned_networks)
REFERENCE = {
    "loss": 1.0392998456954956,
    "unsup_loss": 0.057077884674072266,
    "teacher_confidence": 0.6046382188796997,
    "teacher_sum": 1490.6549128740498,
    "teacher_abs_sum": 87924.22824079149,
    "student_sum": 1496.722426116953,
}
STEP = 3  # ssl_iteration of the step: EMA decay min(1 - 1/4, 0.99) = 0.75, ramp-up at t/T = 3/8


def _deterministic_trainer(trainer_factory):
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    t = trainer_factory("nnUNetTrainerMeanTeacher_smoke", configuration="2d", plans=FULL_WIDTH_PLANS)
    t.initialize()
    torch.manual_seed(0)
    unwrap_network(t.network).apply(InitWeights_He(1e-2))
    t.teacher.load_state_dict(unwrap_network(t.network).state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a teacher that differs from the student, so both the loss and the EMA mix matter
        for p in t.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    t.ssl_iteration = STEP
    return t


def _fixed_batch(t):
    g = torch.Generator().manual_seed(2)
    patch = list(t.configuration_manager.patch_size)
    x_l = torch.randn(2, t.num_input_channels, *patch, generator=g)
    x_u = torch.randn(2, t.num_input_channels, *patch, generator=g)
    seg = torch.randint(0, t.label_manager.num_segmentation_heads, (2, 1, *patch), generator=g).float()
    with torch.no_grad():
        shapes = [o.shape[2:] for o in unwrap_network(t.network)(x_l)]
    targets = [F.interpolate(seg, size=s, mode="nearest") for s in shapes]
    return x_l, x_u, targets


def _sums(module):
    params = [p.detach().double() for p in unwrap_network(module).parameters()]
    return sum(p.sum() for p in params).item(), sum(p.abs().sum() for p in params).item()


def test_mean_teacher_step_matches_recorded_values_and_the_formula(trainer_factory):
    t = _deterministic_trainer(trainer_factory)
    x_l, x_u, targets = _fixed_batch(t)
    student = unwrap_network(t.network)
    teacher_before = {k: v.clone() for k, v in t.teacher.state_dict().items()}

    # the formula, computed independently of the trainer's code: nnU-Net's loss on the labeled patches plus
    # w(t) * sum_k w_k * mean((softmax(student_k(x_u)) - softmax(teacher_k(x_u + clipped noise)))^2)
    s = t.ssl_settings
    torch.manual_seed(3)
    noise = torch.clamp(torch.randn_like(x_u) * s["teacher_noise_std"], -s["teacher_noise_clip"],
                        s["teacher_noise_clip"])
    with torch.no_grad():
        student_l, student_u = student(x_l), student(x_u)
        teacher_u = t.teacher(x_u + noise)
        supervised = t.loss(student_l, targets)
        scale_weights = t.loss.weight_factors
        consistency = sum(w * torch.mean((torch.softmax(a, 1) - torch.softmax(b, 1)) ** 2)
                          for w, a, b in zip(scale_weights, student_u, teacher_u) if w != 0)
        weight = s["unsup_weight"] * math.exp(-5 * (1 - STEP / t.total_iterations) ** 2)
        confidence = torch.softmax(teacher_u[0], 1).max(1)[0].mean()

    t.dataloader_unlabeled = iter([{"data": x_u, "keys": ["u0", "u1"]}])
    torch.manual_seed(3)  # the same teacher noise inside the step
    out = t.train_step({"data": x_l, "target": targets})

    assert out["loss"] == pytest.approx((supervised + weight * consistency).item(), rel=1e-5)
    assert out["unsup_loss"] == pytest.approx(consistency.item(), rel=1e-5)
    assert out["unsup_weight"] == pytest.approx(weight, rel=1e-9)
    assert out["teacher_confidence"] == pytest.approx(confidence.item(), rel=1e-5)
    decay = min(1 - 1 / (STEP + 1), s["ema_decay"])
    for name, p in t.teacher.named_parameters():
        expected = decay * teacher_before[name] + (1 - decay) * dict(student.named_parameters())[name]
        torch.testing.assert_close(p, expected)
    assert t.ssl_iteration == STEP + 1

    teacher_sum, teacher_abs_sum = _sums(t.teacher)
    student_sum, _ = _sums(t.network)
    measured = {"loss": float(out["loss"]), "unsup_loss": out["unsup_loss"],
                "teacher_confidence": out["teacher_confidence"], "teacher_sum": teacher_sum,
                "teacher_abs_sum": teacher_abs_sum, "student_sum": student_sum}
    for key, value in REFERENCE.items():
        assert measured[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
