"""End to end through the real command-line tools: unlabeled preprocessing, nnUNetv2_train for Mean Teacher, CPS and
UniMatch (3d_fullres and 2d, CPU), nnUNetv2_predict with the stock predictor, and --c resume.

The trainings are shared by module-scoped fixtures: a smoke run costs ~30 s on two cores.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import (SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli, tree_digest,
                      write_split)

pytestmark = pytest.mark.e2e

MT = "nnUNetTrainerMeanTeacher_smoke"
CPS = "nnUNetTrainerCPS_smoke"
UNIMATCH = "nnUNetTrainerUniMatch_smoke"
SMOKE_ITERATIONS = 2 * 4  # epochs x iterations of the smoke budget


def output_folder(env: dict, trainer: str, configuration: str, fold: int = 0) -> Path:
    return (Path(env["nnUNet_results"]) / SYNTHETIC_NAME / f"{trainer}__nnUNetPlans__{configuration}"
            / f"fold_{fold}")


# UniMatch's 0.95 confidence threshold leaves an untrained smoke model's pseudo-labels empty (unsupervised term 0,
# nothing to assert on); a threshold of 0 keeps every voxel, so its terms must reach the gradient in every epoch
SETTINGS = {UNIMATCH: {"nnUNet_ssl_confidence_threshold": "0"}}


def train(env: dict, trainer: str, configuration: str, *extra, check: bool = True):
    return run_cli(["nnUNetv2_train", SYNTHETIC_ID, configuration, 0, "-tr", trainer, "-device", "cpu", *extra],
                   {**env, **SETTINGS.get(trainer, {})}, check=check)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_state_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def assert_optimizer_state_equal(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for idx in a["state"]:
        for k, v in a["state"][idx].items():
            w = b["state"][idx][k]
            assert torch.equal(v.cpu(), w.cpu()) if torch.is_tensor(v) else v == w, (idx, k)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    """Mean Teacher (3d_fullres), CPS and UniMatch (2d) trained with the smoke budget on fold 0, unlabeled scans
    included."""
    root = tmp_path_factory.mktemp("trained")
    env = copy_nnunet_tree(synthetic_dataset, root)
    preprocess_unlabeled_cli(env, ("3d_fullres", "2d"))
    logs = {MT: train(env, MT, "3d_fullres").stdout, CPS: train(env, CPS, "2d").stdout,
            UNIMATCH: train(env, UNIMATCH, "2d").stdout}
    return root, env, logs


# ------------------------------------------------------------------------------------------------ unlabeled data
def test_preprocess_unlabeled_leaves_labeled_data_untouched(nnunet_tree):
    root, env = nnunet_tree
    pre = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    raw = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME
    before_pre, before_raw = tree_digest(pre), tree_digest(raw)

    proc = run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", "3d_fullres", "2d"], env)
    assert "4 to do" in proc.stdout

    after_pre = tree_digest(pre)
    # every labeled file, the plans and the fingerprint are byte-identical; only the *_unlabeled folders are new
    assert {k: v for k, v in after_pre.items() if k in before_pre} == before_pre
    new = set(after_pre) - set(before_pre)
    assert new and all(k.split("/")[0].endswith("_unlabeled") for k in new)
    assert tree_digest(raw) == before_raw
    for identifier in ("nnUNetPlans_3d_fullres_unlabeled", "nnUNetPlans_2d_unlabeled"):
        folder = pre / identifier
        cases = [f"synthetic_u{i:03d}" for i in range(4)]
        assert sorted(p.name for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")) == \
            [c + ".b2nd" for c in cases]
        # nnU-Net's layout is kept, but nothing label-like exists: no class locations, and the 'seg' array is
        # only the preprocessor's nonzero mask (values -1/0), derived from the image
        for case in cases:
            properties = pickle.loads((folder / f"{case}.pkl").read_bytes())
            assert "class_locations" not in properties
            assert set(np.unique(blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:])) <= {-1, 0}

    # the same plans again: nothing to do, nothing rewritten
    proc = run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", "3d_fullres"], env)
    assert "4 already preprocessed, 0 to do" in proc.stdout
    assert tree_digest(pre) == after_pre


def test_unlabeled_case_matches_nnunet_preprocessing_of_the_same_scan(nnunet_tree):
    """Copy a labeled scan into imagesUnlabeled: its preprocessed array must equal nnU-Net's own preprocessing."""
    root, env = nnunet_tree
    raw = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME
    shutil.rmtree(raw / "imagesUnlabeled")
    (raw / "imagesUnlabeled").mkdir()
    shutil.copy(raw / "imagesTr" / "synthetic_003_0000.nii.gz", raw / "imagesUnlabeled" / "copy_003_0000.nii.gz")
    preprocess_unlabeled_cli(env, ("3d_fullres",))
    pre = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    ours = blosc2.open(str(pre / "nnUNetPlans_3d_fullres_unlabeled" / "copy_003.b2nd"), mode="r")[:]
    theirs = blosc2.open(str(pre / "nnUNetPlans_3d_fullres" / "synthetic_003.b2nd"), mode="r")[:]
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ training outputs
def test_mean_teacher_3d_fullres_training_outputs(trained):
    root, env, logs = trained
    out = output_folder(env, MT, "3d_fullres")
    ckpt = load_checkpoint(out / "checkpoint_final.pth")
    ssl = ckpt["ssl_state"]
    assert ssl["trainer"] == MT and ssl["iteration"] == SMOKE_ITERATIONS
    # network_weights is the EMA teacher (the model nnUNetv2_predict uses); the student is kept beside it
    assert_state_equal(ckpt["network_weights"], ssl["teacher_weights"])
    student = ssl["student_weights"]
    assert any(not torch.equal(student[k], ckpt["network_weights"][k]) for k in student
               if student[k].is_floating_point())
    # the SSL terms were logged every epoch and plotted
    log = ckpt["logging"]
    assert len(log["unsup_loss"]) == 2 and all(np.isfinite(log["unsup_loss"]))
    assert all(0 < w < 0.1 for w in log["unsup_weight"])
    # the gradient-norm ratio of the (weighted) unsupervised to the supervised term, once per epoch
    ratios = log["grad_ratio_unsup_sup"]
    assert len(ratios) == 2 and all(np.isfinite(ratios)) and all(r > 0 for r in ratios)
    assert logs[MT].count("grad_ratio_unsup_sup") == 2
    assert (out / "progress.png").stat().st_size > 10_000
    assert json.loads((out / "ssl_settings.json").read_text())["settings"]["ema_decay"] == 0.99
    assert (out / "validation" / "summary.json").is_file()
    assert "Unlabeled stream: 4 case(s)" in logs[MT]


def test_cps_2d_training_outputs(trained):
    root, env, logs = trained
    out = output_folder(env, CPS, "2d")
    ckpt = load_checkpoint(out / "checkpoint_final.pth")
    ssl = ckpt["ssl_state"]
    assert ssl["iteration"] == SMOKE_ITERATIONS
    a, b = ckpt["network_weights"], ssl["network_b_weights"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    assert len(ssl["extra_optimizer_states"]) == 1  # network B's optimiser
    assert all(0.0 <= x <= 1.0 for x in ckpt["logging"]["agreement"])
    assert (out / "validation" / "summary.json").is_file()


def test_unimatch_2d_training_outputs(trained):
    root, env, logs = trained
    ckpt = load_checkpoint(output_folder(env, UNIMATCH, "2d") / "checkpoint_final.pth")
    assert ckpt["ssl_state"]["iteration"] == SMOKE_ITERATIONS and ckpt["ssl_state"]["student_weights"] is None
    log = ckpt["logging"]
    for key in ("strong_view_loss", "feature_stream_loss", "grad_ratio_unsup_sup"):
        assert len(log[key]) == 2 and all(np.isfinite(log[key])), key
    assert log["unsup_weight"] == [1.0, 1.0] and log["confident_fraction"] == [1.0, 1.0]
    assert all(r > 0 for r in log["grad_ratio_unsup_sup"])
    assert "2 strong view(s) made on the device" in logs[UNIMATCH]


@pytest.mark.parametrize("trainer,configuration", [(MT, "3d_fullres"), (CPS, "2d"), (UNIMATCH, "2d")])
def test_stock_predictor_uses_the_trained_model(trained, tmp_path, trainer, configuration):
    root, env, _ = trained
    images = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesTs"
    out = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", images, "-o", out, "-d", SYNTHETIC_ID, "-c", configuration, "-tr", trainer,
             "-f", 0, "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_progress_bar", "-npp", 0,
             "-nps", 0], env)
    for case in ("synthetic_t000", "synthetic_t001"):
        pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        ref = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
        assert pred.GetSize() == ref.GetSize() and np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred))) <= {0, 1, 2}


# ------------------------------------------------------------------------------------------------ resume
def _trainer_in_process(env: dict, monkeypatch, name: str, configuration: str):
    for k, v in env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    from nnunetv2.run.run_training import get_trainer_from_args
    return get_trainer_from_args(str(SYNTHETIC_ID), configuration, 0, name, continue_training=True,
                                 device=torch.device("cpu"))


def test_resume_restores_teacher_and_optimiser_exactly(trained, monkeypatch):
    root, env, _ = trained
    ckpt_file = output_folder(env, MT, "3d_fullres") / "checkpoint_final.pth"
    ckpt = load_checkpoint(ckpt_file)
    trainer = _trainer_in_process(env, monkeypatch, MT, "3d_fullres")
    trainer.load_checkpoint(str(ckpt_file))
    assert trainer.ssl_iteration == SMOKE_ITERATIONS and trainer.current_epoch == 2
    assert_state_equal(trainer.teacher.state_dict(), ckpt["ssl_state"]["teacher_weights"])
    assert_state_equal(trainer.network.state_dict(), ckpt["ssl_state"]["student_weights"])
    assert_optimizer_state_equal(trainer.optimizer.state_dict(), ckpt["optimizer_state"])


def test_resume_restores_second_cps_network_and_its_optimiser_exactly(trained, monkeypatch):
    root, env, _ = trained
    ckpt_file = output_folder(env, CPS, "2d") / "checkpoint_final.pth"
    ckpt = load_checkpoint(ckpt_file)
    trainer = _trainer_in_process(env, monkeypatch, CPS, "2d")
    trainer.load_checkpoint(str(ckpt_file))
    assert_state_equal(trainer.network.state_dict(), ckpt["network_weights"])
    assert_state_equal(trainer.network_b.state_dict(), ckpt["ssl_state"]["network_b_weights"])
    assert_optimizer_state_equal(trainer.optimizer_b.state_dict(), ckpt["ssl_state"]["extra_optimizer_states"][0])


@pytest.mark.parametrize("trainer,configuration", [(MT, "3d_fullres"), (UNIMATCH, "2d")])
def test_cli_resume_of_an_interrupted_run_continues_counters(trained, tmp_path, trainer, configuration):
    """Turn the finished run into one interrupted after epoch 1, resume it with --c, and check that the SSL counter
    continued (a reset counter would end at 4 instead of 8 iterations and restart the ramp-up)."""
    root, env, _ = trained
    env = copy_nnunet_tree(root, tmp_path / "tree")
    out = output_folder(env, trainer, configuration)
    ckpt = load_checkpoint(out / "checkpoint_final.pth")
    ckpt["current_epoch"] = 1
    ckpt["ssl_state"]["iteration"] = SMOKE_ITERATIONS // 2
    for key, values in ckpt["logging"].items():
        ckpt["logging"][key] = values[:1]
    torch.save(ckpt, out / "checkpoint_latest.pth")
    (out / "checkpoint_final.pth").unlink()

    train(env, trainer, configuration, "--c")
    final = load_checkpoint(out / "checkpoint_final.pth")
    assert final["current_epoch"] == 2 and final["ssl_state"]["iteration"] == SMOKE_ITERATIONS
    assert len(final["logging"]["unsup_loss"]) == 2
    # the epoch after the resumption measured its gradient ratio again
    assert len(final["logging"]["grad_ratio_unsup_sup"]) == 2 and final["logging"]["grad_ratio_unsup_sup"][1] > 0


def test_resume_with_changed_settings_is_refused_and_changes_nothing(trained, tmp_path):
    root, env, _ = trained
    env = copy_nnunet_tree(root, tmp_path / "tree")
    out = output_folder(env, MT, "3d_fullres")
    before = tree_digest(out)
    env["nnUNet_ssl_ema_decay"] = "0.9"
    proc = train(env, MT, "3d_fullres", "--c", check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "Refusing to resume" in message and "ema_decay" in message and "0.99" in message
    after = tree_digest(out)
    # nnU-Net opens a new training_log_*.txt at every start (it records the refusal); nothing else changed
    assert {k: v for k, v in after.items() if k in before} == before
    assert all(k.startswith("training_log_") for k in set(after) - set(before))


# ------------------------------------------------------------------------------------------------ labels never read
def test_labels_of_split_unlabeled_cases_are_never_read(nnunet_tree):
    """A label-scarcity split lists labeled cases as 'unlabeled'. Delete everything label-derived for them (the
    segmentation arrays, the properties with class locations, the raw labels): training must still work."""
    root, env = nnunet_tree
    pre = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    raw = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME
    cases = [f"synthetic_{i:03d}" for i in range(10)]
    unlabeled = cases[4:8]
    write_split(env, [{"train": cases[:2], "val": cases[8:], "unlabeled": unlabeled}])
    shutil.rmtree(raw / "imagesUnlabeled")  # the split's list is the only unlabeled source here
    for case in unlabeled:
        for folder in pre.glob("nnUNetPlans_*"):
            for suffix in ("_seg.b2nd", ".pkl"):
                (folder / f"{case}{suffix}").unlink()
        (raw / "labelsTr" / f"{case}.nii.gz").unlink()
        (pre / "gt_segmentations" / f"{case}.nii.gz").unlink()

    proc = train(env, MT, "2d")
    assert "Unlabeled stream: 4 case(s)" in proc.stdout
    final = load_checkpoint(output_folder(env, MT, "2d") / "checkpoint_final.pth")
    assert final["ssl_state"]["iteration"] == SMOKE_ITERATIONS


def test_ua_mt_trains_through_the_cli(trained, tmp_path):
    root, env, _ = trained
    env = copy_nnunet_tree(root, tmp_path / "tree")
    train(env, "nnUNetTrainerUAMT_smoke", "2d")
    ckpt = load_checkpoint(output_folder(env, "nnUNetTrainerUAMT_smoke", "2d") / "checkpoint_final.pth")
    assert ckpt["ssl_state"]["iteration"] == SMOKE_ITERATIONS
    assert_state_equal(ckpt["network_weights"], ckpt["ssl_state"]["teacher_weights"])
    assert all(0.0 < f <= 1.0 for f in ckpt["logging"]["certain_fraction"])
