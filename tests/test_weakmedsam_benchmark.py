"""The WeakMedSAM benchmark helpers: benchmarks/weakmedsam_quality.py scores only the weak cases of a 'weak-labels run'
output against the hidden masks, and benchmarks/hippocampus_weakmedsam.py draws its cases from the committed split
without ever touching a test case."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_volume(path: Path, array: np.ndarray) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


def test_pseudo_mask_quality_scores_weak_cases_only(tmp_path, capsys):
    pseudo, truth = tmp_path / "pseudo", tmp_path / "truth"
    for folder in (pseudo, truth):
        (folder / "labelsTr").mkdir(parents=True)
    labels = {"background": 0, "a": 1, "b": 2}
    (pseudo / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz",
                                                     "channel_names": {"0": "MRI"}, "numTraining": 3}))
    (pseudo / "weakmedsam_work").mkdir()
    (pseudo / "weakmedsam_work" / "manifest.json").write_text(json.dumps({"weak_cases": ["w0", "w1"],
                                                                          "settings": {"gate": "predicted"}}))
    (pseudo / "weakmedsam_work" / "pseudo_stats_part0of1.json").write_text(json.dumps({
        "w0": {"slices": 4, "label_correct": 3}, "w1": {"slices": 4, "label_correct": 1}}))
    t0 = np.zeros((4, 6, 6)); t0[1:3, 1:4, 1:4] = 1                 # class 1: 18 voxels, class 2 absent
    p0 = np.zeros((4, 6, 6)); p0[1:3, 1:4, 1:3] = 1                 # 12 of them, nothing else: Dice 24/30
    t1 = np.zeros((4, 6, 6)); t1[0, :2, :2] = 2                     # class 2: 4 voxels, class 1 absent
    p1 = np.zeros((4, 6, 6)); p1[3, :, :] = 1                       # 36 false class-1 voxels, class 2 missed
    for case, p, t in (("w0", p0, t0), ("w1", p1, t1)):
        write_volume(pseudo / "labelsTr" / f"{case}.nii.gz", p)
        write_volume(truth / "labelsTr" / f"{case}.nii.gz", t)
    # a labeled case the run copied: it must not be scored even though it differs from the truth
    write_volume(pseudo / "labelsTr" / "lab.nii.gz", np.ones((4, 6, 6)))
    write_volume(truth / "labelsTr" / "lab.nii.gz", np.zeros((4, 6, 6)))
    out = tmp_path / "q.json"
    assert load_script("weakmedsam_quality").main(["--pseudo", str(pseudo), "--truth", str(truth),
                                                   "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert sorted(data["per_case"]) == ["w0", "w1"]
    assert data["per_case"]["w0"] == pytest.approx({"1": 0.8, "2": 1.0, "foreground_fraction_pseudo": 12 / 144,
                                                    "foreground_fraction_truth": 18 / 144})
    assert data["per_case"]["w1"]["1"] == 0.0 and data["per_case"]["w1"]["2"] == 0.0
    assert data["summary"]["a"]["mean"] == pytest.approx(0.4) and data["summary"]["b"]["mean"] == pytest.approx(0.5)
    assert data["summary"]["foreground_mean"]["mean"] == pytest.approx(0.45)
    assert data["slice_label_accuracy"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "2 of 2 weak case(s) scored" in printed and "| a | 0.400 |" in printed


def test_hippocampus_study_cases_come_from_the_committed_split():
    script = load_script("hippocampus_weakmedsam")
    committed = json.loads(script.SPLIT_SOURCE.read_text())
    fold0 = next(f for f in committed["folds"] if f["fold"] == 0)
    cases = script.study_cases(12, seed=0)
    assert cases["test"] == sorted(committed["test_cases"]) and len(cases["test"]) == 40
    assert cases["labeled"] == sorted(fold0["train"]) and cases["val"] == sorted(fold0["val"])
    assert len(cases["weak"]) == 12 and set(cases["weak"]) <= set(fold0["unlabeled"])
    assert not set(cases["test"]) & set(cases["weak"] + cases["labeled"] + cases["val"])
    assert script.study_cases(12, seed=0) == cases                      # reproducible
    assert set(script.study_cases(20, seed=0)["weak"]) > set(cases["weak"])   # nested: more cases add to the set
    assert script.study_cases(12, seed=1)["weak"] != cases["weak"]
    with pytest.raises(SystemExit, match="only 162 unlabeled"):
        script.study_cases(500, seed=0)
