"""Confidence rules for hard pseudo-labels (training/thresholds.py): FreeMatch's self-adaptive thresholds against a
hand computation, and in a trainer (UniMatch): the rule is built from the settings, moves with training, lets the
unsupervised terms reach the student where the fixed 0.95 lets little through, and is checkpointed for --c."""
from __future__ import annotations

import pytest
import torch

from conftest import preprocess_unlabeled_cli
from nnunet_foundation.training.settings import SettingsError
from nnunet_foundation.training.thresholds import (THRESHOLD_SETTINGS, FixedThreshold, SelfAdaptiveThreshold,
                                                   build_confidence_threshold)
from nnunet_foundation.training.views import strong_views

UNIMATCH = "nnUNetTrainerUniMatch_smoke"


def probabilities(rows):
    """(1, K, N) softmax of N voxels from a list of per-voxel probability rows."""
    return torch.tensor(rows, dtype=torch.float32).T.unsqueeze(0)


def test_self_adaptive_threshold_follows_freematch_by_hand():
    rule = SelfAdaptiveThreshold(num_classes=3, ema_decay=0.9)
    assert torch.allclose(rule.class_thresholds(), torch.full((3,), 1 / 3))
    # four voxels: three confident background, one foreground voxel predicted class 1 with probability 0.5
    probs = probabilities([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.3, 0.5, 0.2]])
    label, mask = rule.pseudo_label(probs)
    mean_max = (0.9 * 3 + 0.5) / 4
    mean_class = torch.tensor([(0.9 * 3 + 0.3) / 4, (0.05 * 3 + 0.5) / 4, (0.05 * 3 + 0.2) / 4])
    tau = 0.9 / 3 + 0.1 * mean_max
    levels = 0.9 / 3 + 0.1 * mean_class
    expected = tau * levels / levels.max()
    assert torch.allclose(rule.class_thresholds(), expected.float(), atol=1e-6)
    assert label.tolist() == [[0, 0, 0, 1]] and mask.tolist() == [[True, True, True, True]]

    # after many such batches the background threshold follows the model's mean confidence (0.8) and the rarer
    # foreground class gets a lower one: a 0.5-sure foreground voxel counts, a 0.5-sure background voxel does not
    for _ in range(200):
        rule.pseudo_label(probs)
    thresholds = rule.class_thresholds()
    assert thresholds[0] == pytest.approx(mean_max, rel=1e-3) and thresholds[1] < 0.5 < thresholds[0]
    _, mask = rule.pseudo_label(probabilities([[0.5, 0.3, 0.2], [0.3, 0.5, 0.2]]))
    assert mask.tolist() == [[False, True]]

    restored = SelfAdaptiveThreshold(num_classes=3, ema_decay=0.9)
    restored.load_state_dict(rule.state_dict())
    assert torch.equal(restored.class_thresholds(), rule.class_thresholds())

    # the global variant: every class at tau, so the 0.5-sure foreground voxel does not count either
    global_rule = SelfAdaptiveThreshold(num_classes=3, ema_decay=0.9, class_wise=False)
    global_rule.load_state_dict(rule.state_dict())
    assert torch.allclose(global_rule.class_thresholds(), rule.class_thresholds()[:1].expand(3))
    _, mask = global_rule.pseudo_label(probabilities([[0.5, 0.3, 0.2], [0.3, 0.5, 0.2]]))
    assert mask.tolist() == [[False, False]]


def test_each_threshold_mode_builds_its_rule():
    def build(**changed):
        return build_confidence_threshold({**THRESHOLD_SETTINGS, **changed}, num_classes=3)

    fixed = build(confidence_threshold=0.9)
    assert type(fixed) is FixedThreshold and fixed.value == 0.9
    class_wise, global_only = build(threshold_mode="self_adaptive"), build(threshold_mode="self_adaptive_global",
                                                                          threshold_ema_decay=0.99)
    assert isinstance(class_wise, SelfAdaptiveThreshold) and class_wise.class_wise and class_wise.ema_decay == 0.999
    assert isinstance(global_only, SelfAdaptiveThreshold) and not global_only.class_wise
    assert global_only.ema_decay == 0.99


def test_fixed_threshold_is_fixmatchs_rule_and_has_no_state():
    rule = FixedThreshold(0.95, num_classes=3)
    label, mask = rule.pseudo_label(probabilities([[0.96, 0.02, 0.02], [0.02, 0.95, 0.03], [0.01, 0.01, 0.98]]))
    assert label.tolist() == [[0, 1, 2]] and mask.tolist() == [[True, False, True]]  # strictly above, as before
    assert rule.state_dict() == {} and torch.equal(rule.class_thresholds(), torch.full((3,), 0.95))


def test_self_adaptive_unimatch_learns_where_the_fixed_threshold_lets_little_through(trainer_factory, monkeypatch):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    monkeypatch.setenv("nnUNet_ssl_threshold_mode", "self_adaptive")
    t = trainer_factory(UNIMATCH, configuration="2d")
    t.on_train_start()
    assert isinstance(t.confidence_rule, SelfAdaptiveThreshold) and t.confidence_rule.ema_decay == 0.999
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    weak = next(t.dataloader_unlabeled)["data"]
    torch.manual_seed(0)
    unlabeled = {"data": weak, "strong": strong_views(weak, t.num_strong_views)}

    before = t.confidence_rule.class_thresholds()
    parts = t.compute_losses(labeled, unlabeled)
    after = t.confidence_rule.class_thresholds()
    assert not torch.equal(before, after), "the thresholds did not move with the batch"
    # an untrained network is rarely 95% sure, but often as sure as it is on average (a threshold near 1/K at first)
    adaptive_fraction = float(parts.logs["confident_fraction"])
    assert adaptive_fraction > 0.5 and parts.unsupervised.item() > 0
    assert parts.logs["threshold_background"] == pytest.approx(float(after[0]))
    params = [p for p in t.network.parameters() if p.requires_grad]
    grads = torch.autograd.grad(parts.unsupervised, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0, "the term does not reach the student"

    state = t.ssl_state_dict()["confidence_rule"]
    other = SelfAdaptiveThreshold(3)
    t.load_ssl_state_dict({**t.ssl_state_dict(), "confidence_rule": other.state_dict()})
    assert torch.equal(t.confidence_rule.class_thresholds(), other.class_thresholds())
    t.load_ssl_state_dict({**t.ssl_state_dict(), "confidence_rule": state})
    assert torch.equal(t.confidence_rule.class_thresholds(), after)

    # the same batch under the fixed 0.95 lets through a small fraction of that
    t.confidence_rule = FixedThreshold(0.95, 3)
    parts = t.compute_losses(labeled, unlabeled)
    assert float(parts.logs["confident_fraction"]) < adaptive_fraction / 10
    t.dataloader_unlabeled = None


def test_an_unknown_threshold_mode_is_refused_before_training(trainer_factory, monkeypatch):
    monkeypatch.setenv("nnUNet_ssl_threshold_mode", "adaptive")
    with pytest.raises(SettingsError, match="threshold_mode.*must be one of \\['fixed', "
                       "'self_adaptive', 'self_adaptive_global'\\]"):
        trainer_factory(UNIMATCH, configuration="2d")
