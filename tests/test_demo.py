"""The demo command end to end (smoke budget, real LiteMedSAM), its resume behaviour and its refusal to touch foreign
folders."""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import run_cli

pytestmark = pytest.mark.e2e

DEMO_ARGS = ["--budget", "smoke", "--labeled", "2", "--validation", "1", "--unlabeled", "3", "--test", "2",
             "--device", "cpu"]


def test_demo_compares_labeled_only_mean_teacher_and_semisam_and_resumes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "2"})
    workdir = tmp_path / "demo"
    proc = run_cli(["nnunet-foundation", "demo", "--workdir", workdir, *DEMO_ARGS], env)

    report = json.loads((workdir / "demo_results.json").read_text())
    trainers = ["nnUNetTrainer_smoke", "nnUNetTrainerMeanTeacher_smoke", "nnUNetTrainerSemiSAM_smoke"]
    assert list(report["results"]) == trainers
    for trainer in trainers:
        dice = report["results"][trainer]["dice"]
        assert set(dice) == {"lesion", "duct", "mean"} and all(0.0 <= v <= 1.0 for v in dice.values())
        # the printed table shows the numbers of the JSON report
        row = re.search(rf"^\| {trainer} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| [0-9]+ \| ([0-9]+) \|",
                        proc.stdout, re.M)
        assert row, proc.stdout[-3000:]
        assert [float(x) for x in row.groups()[:3]] == [round(dice[k], 3) for k in ("lesion", "duct", "mean")]
        # predictions for every test image, scored by nnU-Net's evaluation
        assert len(list((workdir / "predictions" / trainer).glob("*.nii.gz"))) == 2
    # SemiSAM learned from LiteMedSAM's labels of the 3 unlabeled images, made once before its training
    cache = workdir / "nnUNet_preprocessed" / "Dataset990_Demo"
    assert len(list(cache.glob("*_pseudo_labels/nnUNetTrainer_smoke__nnUNetPlans__fold0/*.npz"))) == 3
    assert "litemedsam" in (workdir / "logs" / "pseudo_label.log").read_text()
    # prompted per object of the labeled-only model, filtered by LiteMedSAM's own confidence (demo.DEMO_GENERALIST)
    manifest = json.loads(next(cache.glob("*_pseudo_labels/nnUNetTrainer_smoke__nnUNetPlans__fold0/manifest.json"))
                          .read_text())
    assert manifest["generalist"]["backend"] == "litemedsam"
    assert manifest["generalist"]["box_mode"] == "components" and manifest["generalist"]["min_prompt_score"] == 0.25
    assert report["generalist"]["box_mode"] == "components"
    semisam_log = (workdir / "logs" / "train_nnUNetTrainerSemiSAM_smoke.log").read_text()
    assert "pseudo-labels from the offline cache" in semisam_log
    assert report["results"][trainers[2]]["generalist_seconds"] > 0
    for png in ("demo_results.png", "demo_examples.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (workdir / png).stat().st_size > 5_000
    # the user's nnU-Net folders were never used: everything sits in the workdir
    assert (workdir / "nnUNet_results" / "Dataset990_Demo").is_dir()

    # a second run skips what is done
    again = run_cli(["nnunet-foundation", "demo", "--workdir", workdir, *DEMO_ARGS], env)
    assert again.stdout.count("already trained") == 3 and "nnUNetv2_train" not in again.stdout
    assert "already labelled" in again.stdout and "pseudo-label -d" not in again.stdout
    assert json.loads((workdir / "demo_results.json").read_text())["results"][trainers[2]]["dice"] == \
        report["results"][trainers[2]]["dice"]

    # other settings in the same folder are refused instead of mixing runs
    other = run_cli(["nnunet-foundation", "demo", "--workdir", workdir, *DEMO_ARGS[:-2], "--labeled", "3"], env,
                    check=False)
    assert other.returncode == 2 and "other settings" in other.stderr


def test_demo_refuses_a_folder_it_did_not_create(tmp_path):
    (tmp_path / "precious.txt").write_text("user data")
    proc = run_cli(["nnunet-foundation", "demo", "--workdir", tmp_path, *DEMO_ARGS], dict(os.environ), check=False)
    assert proc.returncode == 2 and "was not created by the demo" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]
