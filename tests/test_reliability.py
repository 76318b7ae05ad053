"""Nothing lost, nothing silently wrong (issue 20): interrupted work, stale or damaged inputs, checkpoints.

Kills are real: a real process is started and killed with SIGKILL at a point it reports itself, so the tests see
exactly what a crash, an out-of-memory kill or a pre-empted job leaves behind.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, preprocess_unlabeled_cli, run_cli, tree_digest, write_split
from test_engine_errors import assert_fails_and_changes_nothing
from test_evaluation import scored_folders  # noqa: F401  (fixture)

UNLABELED = [f"synthetic_u{i:03d}" for i in range(4)]
LABELED = [f"synthetic_{i:03d}" for i in range(10)]
MT = "nnUNetTrainerMeanTeacher_smoke"


@pytest.fixture
def tree(nnunet_tree, monkeypatch):
    """A writable dataset copy; the nnU-Net variables also point to it in this process (for in-process checks)."""
    root, env = nnunet_tree
    for k, v in env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    raw = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME
    pre = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    return env, raw, pre


def unlabeled_folder(pre: Path, configuration: str = "3d_fullres") -> Path:
    return pre / f"nnUNetPlans_{configuration}_unlabeled"


def record(pre: Path, configuration: str = "3d_fullres") -> dict:
    return json.loads((unlabeled_folder(pre, configuration) / "unlabeled_preprocessing.json").read_text())


def stream_cases(pre: Path, split_unlabeled=(), configuration: str = "3d_fullres") -> list:
    """The unlabeled cases a trainer of fold 0 would train on (the function the trainer calls)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_foundation.unlabeled import collect_unlabeled_cases

    plans = load_json(str(pre / "nnUNetPlans.json"))
    cases = collect_unlabeled_cases(str(pre), str(pre / f"nnUNetPlans_{configuration}"),
                                    f"nnUNetPlans_{configuration}", plans, configuration, list(split_unlabeled),
                                    LABELED[:2] + LABELED[8:])
    return sorted(cases)


def preprocess(env, check=False):
    return run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", "3d_fullres"], env,
                   check=check)


def start_and_kill(cmd: list, env: dict, marker: str, timeout: float = 300) -> str:
    """Start cmd, SIGKILL its whole process group as soon as a line containing ``marker`` is printed; return the
    output up to then."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError(f"{cmd} ended before printing {marker!r}:\n{''.join(seen)[-4000:]}")
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return "".join(seen)


# ------------------------------------------------------------------------------------- 1. interrupted preprocessing
def test_killed_unlabeled_preprocessing_can_be_rerun(tree):
    env, raw, pre = tree
    nnunet_foundation = Path(sys.executable).parent / "nnunet-foundation"
    start_and_kill([nnunet_foundation, "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", "3d_fullres"], env,
                   marker="1/4")
    proc = preprocess(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(record(pre)["cases"]) == UNLABELED
    # a split with its own 'unlabeled' list still gets every imagesUnlabeled scan
    assert stream_cases(pre, LABELED[2:5]) == sorted(LABELED[2:5] + UNLABELED)


def test_lost_record_is_rebuilt_and_a_failed_rerun_never_empties_it(tree):
    env, raw, pre = tree
    preprocess(env, check=True)
    (unlabeled_folder(pre) / "unlabeled_preprocessing.json").unlink()
    proc = preprocess(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(record(pre)["cases"]) == UNLABELED
    # a scan that cannot be read stops the rerun, but what was done stays recorded
    (raw / "imagesUnlabeled" / "synthetic_u009_0000.nii.gz").write_bytes(b"not a nifti file")
    proc = preprocess(env)
    assert proc.returncode == 2 and "synthetic_u009" in proc.stderr
    assert sorted(record(pre)["cases"]) == UNLABELED


# ------------------------------------------------------------------------------------- 2. mirror imagesUnlabeled
def test_scans_removed_from_imagesUnlabeled_leave_the_stream(tree):
    env, raw, pre = tree
    preprocess(env, check=True)
    (raw / "imagesUnlabeled" / "synthetic_u001_0000.nii.gz").unlink()
    # training before the folder was brought up to date is refused, naming the case and the command
    from nnunet_foundation.unlabeled import UnlabeledDataError
    with pytest.raises(UnlabeledDataError, match="synthetic_u001.*preprocess-unlabeled"):
        stream_cases(pre)
    proc = preprocess(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "removed from imagesUnlabeled" in proc.stdout and "synthetic_u001" in proc.stdout
    assert "3 unlabeled case(s), 3 already preprocessed, 0 to do" in proc.stdout
    assert sorted(record(pre)["cases"]) == [c for c in UNLABELED if c != "synthetic_u001"]
    assert not list(unlabeled_folder(pre).glob("synthetic_u001*"))
    assert stream_cases(pre) == [c for c in UNLABELED if c != "synthetic_u001"]


def test_changed_scan_is_preprocessed_again(tree):
    env, raw, pre = tree
    preprocess(env, check=True)
    image = sitk.ReadImage(str(raw / "imagesUnlabeled" / "synthetic_u000_0000.nii.gz"))
    sitk.WriteImage(image[:, :, :12], str(raw / "imagesUnlabeled" / "synthetic_u000_0000.nii.gz"))
    with pytest.raises(Exception, match="synthetic_u000"):
        stream_cases(pre)
    proc = preprocess(env)
    assert "1 to do" in proc.stdout and "synthetic_u000" in proc.stdout, proc.stdout
    import blosc2
    assert blosc2.open(str(unlabeled_folder(pre) / "synthetic_u000.b2nd"), mode="r").shape[1] == 12
    assert stream_cases(pre) == UNLABELED


# ------------------------------------------------------------------------------------- 3./4. damaged scans
def test_truncated_nifti_is_refused(tree):
    env, raw, pre = tree
    scan = raw / "imagesUnlabeled" / "synthetic_u002_0000.nii.gz"
    data = scan.read_bytes()
    scan.write_bytes(data[: len(data) // 2])
    message = assert_fails_and_changes_nothing(env, raw, pre, "synthetic_u002_0000.nii.gz")
    assert "truncated" in message or "incomplete" in message


def test_uncompressed_nifti_missing_its_voxels_is_refused(tree):
    env, raw, pre = tree
    scan = raw / "imagesUnlabeled" / "synthetic_u002_0000.nii.gz"
    nii = raw / "imagesUnlabeled" / "synthetic_u002_0000.nii"
    nii.write_bytes(gzip.decompress(scan.read_bytes())[:-2000])
    scan.unlink()
    # this dataset's file ending is .nii.gz, so use the checker directly on the plain .nii
    from nnunet_foundation.unlabeled import UnlabeledDataError, check_image_file_complete
    with pytest.raises(UnlabeledDataError, match="synthetic_u002_0000.nii"):
        check_image_file_complete(str(nii))


def test_2d_image_in_a_3d_dataset_is_refused(tree):
    env, raw, pre = tree
    image = sitk.ReadImage(str(raw / "imagesUnlabeled" / "synthetic_u003_0000.nii.gz"))
    sitk.WriteImage(image[:, :, 5], str(raw / "imagesUnlabeled" / "synthetic_u003_0000.nii.gz"))
    message = assert_fails_and_changes_nothing(env, raw, pre, "synthetic_u003_0000.nii.gz")
    assert "2D" in message and "3D" in message


# ------------------------------------------------------------------------------------- 5. checkpoints
SAVE_AND_BLOCK = """
import os, sys, time, torch
from nnunetv2.run.run_training import get_trainer_from_args

trainer = get_trainer_from_args("%s", "2d", 0, "%s", device=torch.device("cpu"))
trainer.initialize()
os.makedirs(trainer.output_folder, exist_ok=True)
path = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
trainer.save_checkpoint(path)
trainer.current_epoch = 6


class BlockWhilePickled:
    def __reduce__(self):  # torch.save has opened its output by now; stop here until killed
        print("SAVING", flush=True)
        time.sleep(600)
        return (int, ())


trainer.ssl_state_dict = lambda: {"block": BlockWhilePickled()}
trainer.save_checkpoint(path)
""" % (SYNTHETIC_ID, MT)


def test_checkpoint_killed_while_being_written_keeps_the_previous_one(tree):
    env, raw, pre = tree
    start_and_kill([sys.executable, "-c", SAVE_AND_BLOCK], env, marker="SAVING")
    out = Path(env["nnUNet_results"]) / SYNTHETIC_NAME / f"{MT}__nnUNetPlans__2d" / "fold_0"
    checkpoint = torch.load(out / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert checkpoint["current_epoch"] == 1 and checkpoint["ssl_state"]["trainer"] == MT


def test_resume_falls_back_from_an_unreadable_checkpoint_or_names_it(trainer_factory):
    trainer = trainer_factory(MT, "2d", continue_training=True)
    trainer.initialize()
    out = Path(trainer.output_folder)
    out.mkdir(parents=True, exist_ok=True)
    trainer.current_epoch = 2
    trainer.save_checkpoint(str(out / "checkpoint_best.pth"))
    good = (out / "checkpoint_best.pth").read_bytes()
    (out / "checkpoint_latest.pth").write_bytes(good[: len(good) // 2])  # what an in-place write leaves

    resumed = trainer_factory(MT, "2d", continue_training=True)
    resumed.load_checkpoint(str(out / "checkpoint_latest.pth"))
    assert resumed.current_epoch == 3
    log = Path(resumed.log_file).read_text()
    assert "checkpoint_latest.pth" in log and "checkpoint_best.pth" in log
    assert (out / "checkpoint_latest.pth").read_bytes() == good[: len(good) // 2]  # kept for inspection

    (out / "checkpoint_best.pth").unlink()
    with pytest.raises(RuntimeError, match="checkpoint_latest.pth") as error:
        trainer_factory(MT, "2d", continue_training=True).load_checkpoint(str(out / "checkpoint_latest.pth"))
    assert "without --c" in str(error.value)


# ------------------------------------------------------------------------------------- 6. settings of a failed start
def test_a_run_that_fails_to_start_keeps_the_finished_runs_settings(trainer_factory):
    env = trainer_factory.env
    preprocess_unlabeled_cli(env, ("2d",))
    trainer = trainer_factory(MT, "2d")
    settings_file = Path(trainer.output_folder) / "ssl_settings.json"
    settings_file.parent.mkdir(parents=True, exist_ok=True)
    finished = {"trainer": MT, "settings": {**trainer.ssl_settings, "unsup_weight": 0.5}}
    settings_file.write_text(json.dumps(finished))
    write_split(env, [{"train": LABELED[:3], "val": LABELED[8:], "unlabeled": LABELED[2:8]}])
    from nnunet_foundation.unlabeled import UnlabeledDataError
    with pytest.raises(UnlabeledDataError, match="synthetic_002"):
        trainer.on_train_start()
    assert json.loads(settings_file.read_text()) == finished


# ------------------------------------------------------------------------------------- 9. generalist checkpoints
@pytest.mark.parametrize("content", [b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01cos\nsystem\nq\x02s.", b"garbage" * 100])
def test_damaged_generalist_checkpoint_error_gives_no_unsafe_advice(tmp_path, content):
    from nnunet_foundation.foundation.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "sam_vit_b_01ec64.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as error:
        read_state_dict(path, "SAM vit_b")
    message = str(error.value)
    assert str(path) in message and "download_checkpoints.sh" in message
    assert "weights_only" not in message and "trust" not in message


def test_truncated_generalist_checkpoint_is_named(tmp_path):
    from nnunet_foundation.foundation.checkpoints import CheckpointError, read_state_dict

    path = tmp_path / "sam.pth"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated") as error:
        read_state_dict(path, "SAM vit_b")
    assert "weights_only" not in str(error.value)


# ------------------------------------------------------------------------------------- 10. evaluate
def test_evaluate_refuses_another_spacing_and_undeclared_labels(scored_folders):
    from nnunet_foundation.evaluation import EvaluationError, evaluate_folder
    from test_evaluation import _write

    ref_dir, pred_dir, dataset_json, shape, spacing = scored_folders
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "b.nii.gz")))
    _write(prediction, pred_dir / "b.nii.gz", (1.0, 1.0, 1.0))
    with pytest.raises(EvaluationError, match=r"b\.nii\.gz has spacing \(1\.0, 1\.0, 1\.0\)"):
        evaluate_folder(str(ref_dir), str(pred_dir), str(dataset_json))
    _write(prediction, pred_dir / "b.nii.gz", spacing)
    prediction[0, 0, 0] = 7
    _write(prediction, pred_dir / "b.nii.gz", spacing)
    with pytest.raises(EvaluationError, match=r"b\.nii\.gz contains label value\(s\) \[7\]"):
        evaluate_folder(str(ref_dir), str(pred_dir), str(dataset_json))


# ------------------------------------------------------------------------------------- check command
def test_check_reports_what_a_run_would_trip_over_and_changes_nothing(tree):
    env, raw, pre = tree
    preprocess(env, check=True)
    proc = run_cli(["nnunet-foundation", "check", "-d", SYNTHETIC_ID, "-c", "3d_fullres", "-tr", MT], env)
    assert "0 problem(s)" in proc.stdout and "4 case(s) preprocessed, matching imagesUnlabeled" in proc.stdout

    (raw / "imagesUnlabeled" / "synthetic_u001_0000.nii.gz").unlink()
    scan = raw / "imagesUnlabeled" / "synthetic_u002_0000.nii.gz"
    scan.write_bytes(scan.read_bytes()[:500])
    write_split(env, [{"train": LABELED[:3] + LABELED[:1], "val": LABELED[8:], "unlabeled": LABELED[2:5]}])
    before = tree_digest(pre), tree_digest(raw)
    proc = run_cli(["nnunet-foundation", "check", "-d", SYNTHETIC_ID, "-c", "3d_fullres"], env, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = proc.stdout
    assert "synthetic_u002_0000.nii.gz is truncated" in report
    assert "removed from imagesUnlabeled" in report and "synthetic_u001" in report
    assert "'train' lists ['synthetic_000'] more than once" in report
    assert "['synthetic_002'] are in both 'train' and 'unlabeled'" in report
    assert (tree_digest(pre), tree_digest(raw)) == before


def test_a_logged_command_shows_its_progress_in_the_log_while_it_runs(tmp_path):
    """The benchmark's pre-stages (SFR fine-tuning, IFL rounds) run for an hour: their log must show each line as it
    comes, not when the command ends. The command here prints a line, then exits 0 only if it can read that line
    back from its own log while it is still running."""
    from nnunet_foundation.subprocesses import run_logged

    log = tmp_path / "stage.log"
    # the marker is computed by the child: the log's '$ command' header holds the child's source, not the marker
    child = ("import sys, time, pathlib\n"
             "marker = 'SFR fine-tuning: iteration ' + str(5 * 2) + '/300'\n"
             "print(marker, flush=True)\n"
             f"log = pathlib.Path({str(log)!r})\n"
             "for _ in range(100):\n"
             "    if marker in log.read_text():\n"
             "        sys.exit(0)\n"
             "    time.sleep(0.05)\n"
             "sys.exit(3)\n")
    run_logged([sys.executable, "-c", child], dict(os.environ), log)
    assert "iteration 10/300" in log.read_text()
