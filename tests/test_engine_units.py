"""Unit tests of the semi-supervised engine: schedules, EMA, settings, gradients, checkpoint state, wrappers."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import preprocess_unlabeled_cli
from nnunet_foundation.training.networks import (ema_decay_with_warmup, ema_update, load_state_dict_flexible,
                                                 make_teacher, unwrap_network)
from nnunet_foundation.training.semi_supervised import rampup
from nnunet_foundation.training.settings import SettingsError, record_or_check_settings, resolve_settings


# ---------------------------------------------------------------------------------------------- schedules
def test_rampup_values():
    assert rampup(0.0) == pytest.approx(math.exp(-5))
    assert rampup(0.5) == pytest.approx(math.exp(-1.25))
    assert rampup(1.0) == pytest.approx(1.0)
    assert rampup(2.0) == pytest.approx(1.0)  # clamped
    assert rampup(0.25, length=0.5) == pytest.approx(math.exp(-1.25))
    assert rampup(0.3, shape="linear") == pytest.approx(0.3)
    assert rampup(0.0, shape="none") == 1.0
    with pytest.raises(SettingsError):
        rampup(0.5, shape="cosine")


def test_ema_decay_warmup_and_formula():
    assert ema_decay_with_warmup(0, 0.99) == 0.0  # first update copies the student
    assert ema_decay_with_warmup(9, 0.99) == pytest.approx(0.9)
    assert ema_decay_with_warmup(10_000, 0.99) == 0.99
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.add_(1.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for name, p in student.named_parameters():
        expected = 0.9 * before[name] + 0.1 * p.detach()
        assert torch.allclose(dict(teacher.named_parameters())[name], expected)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)  # buffers are copied
    assert all(not p.requires_grad for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------- settings
def test_settings_layers_and_errors(tmp_path):
    defaults = {"unlabeled_batch_size": 0, "unsup_weight": 0.1, "flag": True, "mode": "exp"}
    names = ["nnUNetTrainerX_smoke", "nnUNetTrainerX", "nnUNetTrainer"]
    cfg = tmp_path / "ssl.json"
    cfg.write_text(json.dumps({"unsup_weight": 0.5, "nnUNetTrainerX": {"mode": "linear"},
                               "nnUNetTrainerCPS": {"mode": "none"}}))
    env = {"nnUNet_ssl_config": str(cfg), "nnUNet_ssl_unlabeled_batch_size": "4", "nnUNet_ssl_flag": "false"}
    s = resolve_settings(defaults, names, env)
    assert s == {"unlabeled_batch_size": 4, "unsup_weight": 0.5, "flag": False, "mode": "linear"}
    with pytest.raises(SettingsError, match="unknown setting 'ema'"):
        resolve_settings(defaults, names, {"nnUNet_ssl_ema": "0.9"})
    with pytest.raises(SettingsError, match="unsup_weight"):
        resolve_settings(defaults, names, {"nnUNet_ssl_unsup_weight": "high"})
    cfg.write_text(json.dumps({"unsup_wieght": 1}))
    with pytest.raises(SettingsError, match="unknown setting 'unsup_wieght'"):
        resolve_settings(defaults, names, {"nnUNet_ssl_config": str(cfg)})
    with pytest.raises(SettingsError, match="file not found"):
        resolve_settings(defaults, names, {"nnUNet_ssl_config": str(tmp_path / "missing.json")})


def test_settings_of_other_trainers_are_reported_not_used_and_typos_still_fail(tmp_path):
    from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher

    defaults = nnUNetTrainerMeanTeacher.default_settings
    names = ["nnUNetTrainerMeanTeacher", "nnUNetTrainer"]
    not_used = {}
    # one shell configures SemiSAM's generalists and CPS's settings beside Mean Teacher's
    env = {"nnUNet_ssl_generalists": '{"backend": "litemedsam"}', "nnUNet_ssl_ema_decay": "0.9"}
    s = resolve_settings(defaults, names, env, not_used=not_used)
    assert s["ema_decay"] == 0.9 and "generalists" not in s
    assert not_used == {"generalists": "environment variable nnUNet_ssl_generalists"}
    with pytest.raises(SettingsError, match="unknown setting 'generalist'.*Valid settings: .*ema_decay"):
        resolve_settings(defaults, names, {"nnUNet_ssl_generalist": "{}"})


def test_setting_mistakes_that_used_to_pass_are_refused(tmp_path):
    from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher

    defaults = nnUNetTrainerMeanTeacher.default_settings
    names = ["nnUNetTrainerMeanTeacher", "nnUNetTrainer"]
    with pytest.raises(SettingsError, match="case matters.*nnUNet_ssl_unsup_weight"):
        resolve_settings(defaults, names, {"nnUNet_SSL_unsup_weight": "1"})
    for name, value in (("unsup_weight", "-1"), ("ema_decay", "1.5"), ("ema_decay", "1.0"),
                        ("rampup_shape", "cosine"), ("rampup_length", "2")):
        with pytest.raises(SettingsError, match=f"environment variable nnUNet_ssl_{name}: setting '{name}'"):
            resolve_settings(defaults, names, {f"nnUNet_ssl_{name}": value})
    cfg = tmp_path / "ssl.json"
    cfg.write_text(json.dumps({"nnUNetTrainerMeanTeachr": {"ema_decay": 0.5}}))
    with pytest.raises(SettingsError, match="nnUNetTrainerMeanTeachr.*names no trainer"):
        resolve_settings(defaults, names, {"nnUNet_ssl_config": str(cfg)})
    cfg.write_text(json.dumps({"nnUNetTrainerNoMirroring": {"ema_decay": 0.5},  # an nnU-Net trainer: fine
                               "nnUNetTrainerMeanTeacher_cpu2d": {"ema_decay": 0.7}}))
    assert resolve_settings(defaults, names, {"nnUNet_ssl_config": str(cfg)})["ema_decay"] == defaults["ema_decay"]


def test_resume_with_changed_settings_is_refused(tmp_path):
    record_or_check_settings(str(tmp_path), {"a": 1}, "T", resuming=False)
    record_or_check_settings(str(tmp_path), {"a": 1}, "T", resuming=True)  # same: fine
    with pytest.raises(SettingsError, match="recorded 1, now 2"):
        record_or_check_settings(str(tmp_path), {"a": 2}, "T", resuming=True)
    assert json.loads((tmp_path / "ssl_settings.json").read_text())["settings"] == {"a": 1}  # record untouched


def test_resume_of_a_run_recorded_before_a_setting_existed(tmp_path):
    """A setting added to a trainer later (its default keeping the old behaviour) counts as that default for a record
    that lacks it: --c of the old run goes on; a non-default value is still a change."""
    record_or_check_settings(str(tmp_path), {"a": 1}, "T", resuming=False)
    defaults = {"a": 1, "threshold_mode": "fixed"}
    record_or_check_settings(str(tmp_path), {"a": 1, "threshold_mode": "fixed"}, "T", resuming=True,
                             defaults=defaults)
    with pytest.raises(SettingsError, match="threshold_mode: recorded 'fixed', now 'self_adaptive'"):
        record_or_check_settings(str(tmp_path), {"a": 1, "threshold_mode": "self_adaptive"}, "T", resuming=True,
                                 defaults=defaults)
    with pytest.raises(SettingsError, match="threshold_mode: recorded '<missing>'"):  # without defaults: a change
        record_or_check_settings(str(tmp_path), {"a": 1, "threshold_mode": "fixed"}, "T", resuming=True)


# ------------------------------------------------------------------------------------ wrappers: DDP, compile
@pytest.fixture
def gloo_group():
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_teacher_and_checkpoint_keys_through_ddp_and_compile(gloo_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.InstanceNorm2d(4, affine=True))
    for wrapped in (DDP(net), torch.compile(net), DDP(torch.compile(net))):
        assert unwrap_network(wrapped) is net
        teacher = make_teacher(wrapped)
        assert set(teacher.state_dict()) == set(net.state_dict())  # no 'module.' / '_orig_mod.' prefixes
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema_update(teacher, wrapped, 0.5)
        assert not torch.equal(teacher[0].weight, net[0].weight)
        # a state dict saved from a wrapper loads into the plain network and vice versa
        load_state_dict_flexible(wrapped, wrapped.state_dict())
        load_state_dict_flexible(net, {"module." + k: v for k, v in net.state_dict().items()})


# ------------------------------------------------------------------------------------- trainer internals
@pytest.fixture
def started_trainer(trainer_factory):
    """A Mean Teacher trainer (smoke budget) with its data streams running."""
    preprocess_unlabeled_cli(trainer_factory.env)
    trainer = trainer_factory("nnUNetTrainerMeanTeacher_smoke")
    trainer.on_train_start()
    yield trainer
    trainer.dataloader_unlabeled = None


def _grads(net):
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_mean_teacher_step_unsup_term_reaches_student_and_teacher_gets_none(started_trainer):
    t = started_trainer
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": next(t.dataloader_unlabeled)["data"]}

    def grads_with_weight(w):
        t.unsup_weight = lambda: w
        t.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same teacher noise
        parts = t.compute_losses(labeled, unlabeled)
        parts.total.backward()
        return _grads(t.network), parts.logs

    g0, logs0 = grads_with_weight(0.0)
    g1, logs1 = grads_with_weight(100.0)
    assert logs1["unsup_loss"] > 0
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1)), "consistency term does not reach the student"
    assert all(p.grad is None for p in t.teacher.parameters())
    assert all(not p.requires_grad for p in t.teacher.parameters())


def test_gradient_norm_ratio_equals_separate_backward_passes_and_leaves_grads_alone(started_trainer):
    t = started_trainer
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": next(t.dataloader_unlabeled)["data"]}
    t.unsup_weight = lambda: 100.0
    t.optimizer.zero_grad(set_to_none=True)
    parts = t.compute_losses(labeled, unlabeled)
    ratio = t.gradient_norm_ratio(parts)
    assert all(p.grad is None for p in t.network.parameters()), "the measurement must not touch .grad"

    def norm_of_backward(term, **kwargs):
        t.optimizer.zero_grad(set_to_none=True)
        term.backward(**kwargs)
        return torch.sqrt(sum((g ** 2).sum() for g in _grads(t.network))).item()

    expected = norm_of_backward(parts.unsupervised, retain_graph=True) / norm_of_backward(parts.supervised)
    assert ratio > 0 and math.isfinite(ratio) and ratio == pytest.approx(expected, rel=1e-4)


def test_train_step_updates_teacher_by_ema_only(started_trainer):
    t = started_trainer
    # SSL4MIS warm-up: decay = min(1 - 1/(t+1), 0.99); at t = 50 the warm-up still rules (0.9804 < 0.99)
    t.ssl_iteration = 50
    decay = min(1 - 1 / 51, 0.99)
    assert decay < 0.99
    teacher_before = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    out = t.train_step(next(t.dataloader_train))
    assert t.ssl_iteration == 51
    assert {"loss", "unsup_loss", "unsup_weight", "teacher_confidence"} <= set(out)
    student = dict(unwrap_network(t.network).named_parameters())
    changed = 0
    for name, p in t.teacher.named_parameters():
        expected = decay * teacher_before[name] + (1 - decay) * student[name].detach()
        assert torch.allclose(p, expected, atol=1e-5), name
        changed += not torch.equal(p, teacher_before[name])
    assert changed > 0


def test_cps_cross_term_reaches_both_networks(trainer_factory):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    t = trainer_factory("nnUNetTrainerCPS_smoke", configuration="2d")
    t.on_train_start()
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": next(t.dataloader_unlabeled)["data"]}

    def grads_with_weight(w):
        t.unsup_weight = lambda: w
        for opt in (t.optimizer, t.optimizer_b):
            opt.zero_grad(set_to_none=True)
        parts = t.compute_losses(labeled, unlabeled)
        parts.total.backward()
        return _grads(t.network), _grads(t.network_b), parts.logs

    a0, b0, _ = grads_with_weight(0.0)
    a1, b1, logs = grads_with_weight(10.0)
    assert logs["unsup_loss"] > 0 and 0.0 <= float(logs["agreement"]) <= 1.0
    assert any(not torch.allclose(x, y) for x, y in zip(a0, a1))
    assert any(not torch.allclose(x, y) for x, y in zip(b0, b1))
    # the two networks start from different weights
    wa = unwrap_network(t.network).state_dict()
    wb = unwrap_network(t.network_b).state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())


def test_checkpoint_round_trip_restores_everything(started_trainer, trainer_factory, tmp_path):
    t = started_trainer
    for _ in range(2):
        t.train_step(next(t.dataloader_train))
    path = str(tmp_path / "ckpt.pth")
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    # network_weights holds the inference model (the EMA teacher), the student is kept for --c
    for k, v in t.teacher.state_dict().items():
        assert torch.equal(ckpt["network_weights"][k], v)
    assert ckpt["ssl_state"]["iteration"] == 2

    fresh = trainer_factory("nnUNetTrainerMeanTeacher_smoke", continue_training=True)
    fresh.load_checkpoint(path)
    for k, v in unwrap_network(t.network).state_dict().items():
        assert torch.equal(unwrap_network(fresh.network).state_dict()[k], v)
    for k, v in t.teacher.state_dict().items():
        assert torch.equal(fresh.teacher.state_dict()[k], v)
    assert fresh.ssl_iteration == 2
    sa, sb = t.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)

    # the same checkpoint refuses a run whose settings changed
    os.environ["nnUNet_ssl_ema_decay"] = "0.5"
    try:
        changed = trainer_factory("nnUNetTrainerMeanTeacher_smoke", continue_training=True)
        with pytest.raises(SettingsError, match="ema_decay"):
            changed.load_checkpoint(path)
    finally:
        del os.environ["nnUNet_ssl_ema_decay"]


# ---------------------------------------------------------------------------------------------- UA-MT
def test_ua_mt_masked_consistency_and_threshold_schedule():
    from nnunet_foundation.training.losses import entropy, softmax_mse

    teacher = torch.tensor([[0.98, 0.01, 0.01], [1 / 3, 1 / 3, 1 / 3]]).T.reshape(1, 3, 2)  # certain, uniform
    assert entropy(teacher)[0, 0, 0] < 0.2 and entropy(teacher)[0, 0, 1] == pytest.approx(math.log(3), abs=1e-4)
    student_logits = torch.zeros(1, 3, 2, requires_grad=True)  # uniform everywhere
    mask = (entropy(teacher) < 0.75 * math.log(3)).float()
    assert mask.flatten().tolist() == [1.0, 0.0]
    loss = softmax_mse(student_logits, teacher, mask)
    # only the certain voxel counts: mean over its three classes of (1/3 - p)^2
    expected = sum((1 / 3 - p) ** 2 for p in (0.98, 0.01, 0.01)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student_logits.grad[..., 1].abs().sum() == 0 and student_logits.grad[..., 0].abs().sum() > 0


def test_ua_mt_step_uses_uncertainty_mask_and_reaches_student(trainer_factory):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    t = trainer_factory("nnUNetTrainerUAMT_smoke", configuration="2d")
    t.on_train_start()
    num_classes = t.label_manager.num_segmentation_heads
    t.ssl_iteration = 0
    assert t.uncertainty_threshold() == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(num_classes))
    t.ssl_iteration = t.total_iterations
    assert t.uncertainty_threshold() == pytest.approx(math.log(num_classes))

    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": next(t.dataloader_unlabeled)["data"]}
    first, mean = t.teacher_passes(unlabeled["data"])
    assert len(first) == len(mean) == len(t.deep_supervision_weights())
    assert torch.allclose(mean[0].sum(1), torch.ones_like(mean[0][:, 0]), atol=1e-5)
    # the mean of 8 noisy passes differs from a single pass, so the noise really perturbs the teacher
    assert not torch.allclose(first[0], mean[0])

    def grads_with_weight(w):
        t.unsup_weight = lambda: w
        t.optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        parts = t.compute_losses(labeled, unlabeled)
        parts.total.backward()
        return _grads(t.network), parts.logs

    g0, _ = grads_with_weight(0.0)
    g1, logs = grads_with_weight(100.0)
    assert logs["unsup_loss"] > 0 and 0.0 < float(logs["certain_fraction"]) <= 1.0
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1))
    assert all(p.grad is None for p in t.teacher.parameters())
    t.dataloader_unlabeled = None


# ------------------------------------------------------------------------------- shared losses and views
def test_over_scales_downsamples_a_full_resolution_pseudo_label_and_skips_zero_weights():
    from nnunet_foundation.training.losses import ce_dice, cross_entropy, over_scales, resize_to

    torch.manual_seed(0)
    outputs = [torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    label = torch.randint(0, 3, (2, 8, 8))
    mask = torch.rand(2, 8, 8) > 0.3
    total = over_scales(ce_dice, (1.0, 0.5, 0.0), outputs, label, mask)
    half_label, half_mask = label[:, ::2, ::2], mask[:, ::2, ::2]  # nearest neighbour at half resolution
    assert torch.equal(resize_to(label, (4, 4)), half_label) and resize_to(mask, (4, 4)).dtype == torch.bool
    expected = ce_dice(outputs[0], label, mask) + 0.5 * ce_dice(outputs[1], half_label, half_mask)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # masked cross-entropy counts the confident voxels only
    per_voxel = torch.nn.functional.cross_entropy(outputs[0], label, reduction="none")
    assert cross_entropy(outputs[0], label, mask).item() == pytest.approx(per_voxel[mask].mean().item(), rel=1e-5)
    # a probability target is area-averaged: it still sums to one at every scale
    probs = torch.softmax(torch.randn(2, 3, 8, 8), 1)
    assert torch.allclose(resize_to(probs, (4, 4)).sum(1), torch.ones(2, 4, 4))


def test_strong_views_perturb_each_sample_differently_and_keep_geometry():
    from nnunet_foundation.training.views import gaussian_blur, paste_boxes, random_boxes, strong_views

    torch.manual_seed(0)
    weak = torch.zeros(3, 1, 16, 16)
    weak[:, :, 4:12, 4:12] = 2.0  # a bright square on a dark background, z-score-like values
    weak = weak - weak.mean()
    views = strong_views(weak, 2)
    assert len(views) == 2 and all(v.shape == weak.shape and v.dtype == torch.float32 for v in views)
    assert not torch.allclose(views[0], views[1]) and not torch.allclose(views[0], weak)
    # new factors per sample, not one for the batch
    assert not torch.allclose(views[0][0], views[0][1], atol=1e-3)
    # photometric only: the square stays where it is (brighter inside than outside in every view)
    for v in views:
        assert bool((v[:, :, 6:10, 6:10].mean((1, 2, 3)) > v[:, :, :2, :2].mean((1, 2, 3))).all())
    # the blur keeps a constant image constant and smooths an edge, in 2D and 3D
    assert torch.allclose(gaussian_blur(torch.ones(2, 1, 5, 6, 7), torch.tensor([0.5, 1.5])), torch.ones(2, 1, 5, 6, 7))
    edge = gaussian_blur(weak[:1], torch.tensor([1.0]))
    assert edge[0, 0, 8, 3] > weak[0, 0, 8, 3] and edge[0, 0, 8, 4] < weak[0, 0, 8, 4]
    # CutMix: images and per-voxel maps are mixed with the same box
    box = random_boxes((16, 16), 3, torch.Generator().manual_seed(0))
    mixed = paste_boxes(box, torch.zeros(3, 1, 16, 16), torch.ones(3, 1, 16, 16))
    labels = paste_boxes(box, torch.zeros(3, 16, 16, dtype=torch.long), torch.full((3, 16, 16), 2))
    assert torch.equal(mixed[:, 0] == 1, box) and torch.equal(labels == 2, box)


def test_ema_teacher_of_trainable_parameters_only():
    from nnunet_foundation.training.networks import EMATeacher

    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    student[0].requires_grad_(False)  # a frozen backbone
    ema = EMATeacher(student, decay=0.99, trainable_only=True)
    assert set(ema.state_dict()) == {"1.weight", "1.bias"}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(step=3)  # warm-up decay min(1 - 1/4, 0.99) = 0.75
    torch.testing.assert_close(ema.module[1].weight, 0.75 * before["1.weight"] + 0.25 * student[1].weight)
    assert torch.equal(ema.module[0].weight, before["0.weight"])  # frozen part: neither averaged nor stored
    restored = EMATeacher(student, decay=0.99, trainable_only=True)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.module[1].weight, ema.module[1].weight)


def test_extra_network_gets_the_variants_optimiser_and_follows_deep_supervision(trainer_factory):
    t = trainer_factory("nnUNetTrainerCPS_smoke", configuration="2d")
    # a trainer variant that overrides configure_optimizers (here on the instance) changes it for every network
    t.configure_optimizers = lambda: (torch.optim.Adam(t.network.parameters(), 3e-4), None)
    t.initialize()
    assert isinstance(t.optimizer, torch.optim.Adam) and isinstance(t.optimizer_b, torch.optim.Adam)
    params_b = {id(p) for p in t.network_b.parameters()}
    assert {id(p) for g in t.optimizer_b.param_groups for p in g["params"]} == params_b
    assert not params_b & {id(p) for p in t.network.parameters()}
    assert t.extra_optimizers() == [(t.optimizer_b, t.network_b)]
    t.set_deep_supervision_enabled(False)
    assert not unwrap_network(t.network_b).decoder.deep_supervision and not t.network.decoder.deep_supervision
    t.set_deep_supervision_enabled(True)
    assert unwrap_network(t.network_b).decoder.deep_supervision


# ------------------------------------------------------------------------------------------ EMA baseline
def test_ema_baseline_exports_the_ema_not_the_last_weights_and_resume_restores_it(trainer_factory, tmp_path):
    t = trainer_factory("nnUNetTrainerEMA_smoke", configuration="2d")
    assert not os.path.exists(os.path.join(t.output_folder, "ssl_settings.json"))
    t.on_train_start()
    # its EMA decay is recorded like the semi-supervised trainers' settings (the benchmark report reads the file)
    with open(os.path.join(t.output_folder, "ssl_settings.json")) as f:
        assert json.load(f) == {"trainer": "nnUNetTrainerEMA_smoke", "settings": {"ema_decay": 0.99}}
    for _ in range(3):
        t.train_step(next(t.dataloader_train))
    assert t.ema_steps == 3
    path = str(tmp_path / "ema.pth")
    t.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    ema, student = t.ema.module.state_dict(), unwrap_network(t.network).state_dict()
    assert ckpt["network_weights"].keys() == ema.keys()
    assert all(torch.equal(ckpt["network_weights"][k], ema[k]) for k in ema)
    # after 3 steps (decays 0, 1/2, 2/3 with the warm-up) the average differs from the last weights
    assert any(not torch.equal(ema[k], student[k]) for k in ema if ema[k].is_floating_point())
    assert all(torch.equal(ckpt["ema_state"]["student_weights"][k], student[k]) for k in student)

    fresh = trainer_factory("nnUNetTrainerEMA_smoke", configuration="2d", continue_training=True)
    fresh.load_checkpoint(path)
    assert fresh.ema_steps == 3 and fresh.current_epoch == t.current_epoch + 1
    assert all(torch.equal(fresh.ema.module.state_dict()[k], v) for k, v in ema.items())
    assert all(torch.equal(unwrap_network(fresh.network).state_dict()[k], v) for k, v in student.items())
    sa, sb = t.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)
    # the restored EMA is not replaced by a copy of the weights when training continues
    fresh.on_train_start()
    assert all(torch.equal(fresh.ema.module.state_dict()[k], v) for k, v in ema.items())
