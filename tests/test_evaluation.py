"""Dice, HD95 and NSD against known answers and a brute-force reference; empty-mask conventions; spacing read from
image headers; aggregation and the gap-closed formula."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nnunet_foundation.evaluation import (EvaluationError, binary_metrics, evaluate_folder, gap_closed, mean_std,
                                          parse_tolerance, surface)


def box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def brute_force_surface_metrics(reference, prediction, spacing, tolerance):
    """All pairwise distances between surface voxel centres in mm: slow, but obviously right."""
    p = np.argwhere(surface(prediction)) * np.asarray(spacing, dtype=float)
    r = np.argwhere(surface(reference)) * np.asarray(spacing, dtype=float)
    d = np.sqrt(((p[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    pred_to_ref, ref_to_pred = d.min(1), d.min(0)
    hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
    nsd = ((pred_to_ref <= tolerance).sum() + (ref_to_pred <= tolerance).sum()) / (d.shape[0] + d.shape[1])
    return hd95, nsd


def test_parallel_plates_with_anisotropic_spacing_have_exact_answers():
    # two 1-voxel-thick plates 3 slices apart along an axis with 2.5 mm spacing: every surface voxel is 7.5 mm from
    # the other plate, so HD95 = 7.5 mm and NSD flips from 0 to 1 exactly at a 7.5 mm tolerance
    ref, pred = box((10, 12, 12), (3, 2, 2), (4, 8, 8)), box((10, 12, 12), (6, 2, 2), (7, 8, 8))
    spacing = (2.5, 1.0, 0.5)
    at_7_5 = binary_metrics(ref, pred, spacing, tolerance_mm=7.5)
    assert at_7_5["Dice"] == 0 and at_7_5["HD95"] == pytest.approx(7.5) and at_7_5["NSD"] == 1.0
    assert binary_metrics(ref, pred, spacing, tolerance_mm=7.4)["NSD"] == 0.0
    # the same geometry with the spacing ignored would be 3 voxels; the spacing must be used
    assert binary_metrics(ref, pred, (1.0, 1.0, 1.0), tolerance_mm=3.0)["HD95"] == pytest.approx(3.0)


def test_shifted_cube_dice_and_surface_bounds():
    # a cube shifted by 2 voxels along an axis of 2 mm spacing: Dice = overlap fraction; every surface point has a
    # point of the other surface within 4 mm (its translate), and the moving faces are exactly 4 mm away
    ref = box((12, 20, 20), (2, 5, 5), (10, 15, 15))
    pred = box((12, 20, 20), (2, 7, 5), (10, 17, 15))
    m = binary_metrics(ref, pred, (1.0, 2.0, 0.5), tolerance_mm=4.0)
    assert m["Dice"] == pytest.approx(2 * (8 * 8 * 10) / (2 * 8 * 10 * 10))
    assert 0 < m["HD95"] <= 4.0 + 1e-9 and m["NSD"] == 1.0
    assert binary_metrics(ref, pred, (1.0, 2.0, 0.5), tolerance_mm=1.0)["NSD"] < 1.0


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.7, 1.2)])
def test_surface_metrics_match_brute_force(spacing):
    rng = np.random.default_rng(0)
    ref = box((14, 16, 15), (3, 4, 3), (10, 12, 11))
    pred = box((14, 16, 15), (4, 3, 5), (11, 12, 12)) | (rng.random((14, 16, 15)) > 0.97)  # plus scattered blobs
    for tolerance in (0.5, 1.5, 3.0):
        m = binary_metrics(ref, pred, spacing, tolerance)
        hd95, nsd = brute_force_surface_metrics(ref, pred, spacing, tolerance)
        assert m["HD95"] == pytest.approx(hd95, rel=1e-9) and m["NSD"] == pytest.approx(nsd, rel=1e-9)


def test_2d_images_stored_as_3d_are_scored_as_2d():
    # nnU-Net's 2D readers return (1, Y, X) with a dummy spacing (999) for the singleton axis; eroding along that
    # axis would make every voxel "surface". The 3D-stored and the true 2D result must agree.
    ref2d, pred2d = box((20, 20), (4, 4), (14, 14)), box((20, 20), (5, 5), (13, 13))
    as_3d = binary_metrics(ref2d[None], pred2d[None], (999.0, 0.8, 0.8), tolerance_mm=0.5)
    as_2d = binary_metrics(ref2d, pred2d, (0.8, 0.8), tolerance_mm=0.5)
    assert as_3d == as_2d
    hd95, nsd = brute_force_surface_metrics(ref2d, pred2d, (0.8, 0.8), 0.5)
    assert as_2d["HD95"] == pytest.approx(hd95) and as_2d["NSD"] == pytest.approx(nsd)
    assert as_2d["NSD"] == 0.0  # the rings are 0.8 mm apart: nothing within 0.5 mm


def test_empty_mask_conventions():
    empty = np.zeros((4, 6, 8), dtype=bool)
    something = box((4, 6, 8), (1, 1, 1), (3, 3, 3))
    both_empty = binary_metrics(empty, empty, (2.0, 1.0, 1.0))
    assert (both_empty["Dice"], both_empty["HD95"], both_empty["NSD"]) == (1.0, 0.0, 1.0)
    diagonal = math.sqrt((4 * 2.0) ** 2 + 6 ** 2 + 8 ** 2)
    for ref, pred in ((something, empty), (empty, something)):  # missed and hallucinated structure alike
        m = binary_metrics(ref, pred, (2.0, 1.0, 1.0))
        assert (m["Dice"], m["NSD"]) == (0.0, 0.0) and m["HD95"] == pytest.approx(diagonal)


def test_bad_inputs_are_refused():
    a = np.zeros((3, 3, 3), bool)
    with pytest.raises(EvaluationError, match="shape"):
        binary_metrics(a, np.zeros((3, 3, 4), bool), (1, 1, 1))
    with pytest.raises(EvaluationError, match="spacing"):
        binary_metrics(a, a, (1, 1))
    with pytest.raises(EvaluationError, match="tolerance"):
        binary_metrics(a, a, (1, 1, 1), tolerance_mm=-1)


def test_gap_closed_and_aggregation():
    assert gap_closed(0.7, 0.5, 0.9) == pytest.approx(0.5)
    assert gap_closed(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # worse than labeled-only: negative
    assert gap_closed(6.0, 10.0, 2.0) == pytest.approx(0.5)  # lower-is-better metric (HD95)
    assert math.isnan(gap_closed(0.7, 0.8, 0.8))  # no gap to close
    assert math.isnan(gap_closed(float("nan"), 0.5, 0.9))
    stats = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert stats["mean"] == 2.0 and stats["std"] == pytest.approx(1.0) and stats["n"] == 3  # ddof=1, NaN dropped
    single = mean_std([0.5])
    assert single["mean"] == 0.5 and math.isnan(single["std"])


def test_tolerance_parsing():
    assert parse_tolerance(None) == 1.0 and parse_tolerance(["2.5"]) == 2.5
    assert parse_tolerance(["1=1", "2=2.5"]) == {"1": 1.0, "2": 2.5}
    assert parse_tolerance(["3", "1=1"]) == {"default": 3.0, "1": 1.0}
    with pytest.raises(EvaluationError, match="CLASS=MM"):
        parse_tolerance(["one"])


def _write(array_zyx, path, spacing_zyx):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array_zyx.astype(np.uint8))
    image.SetSpacing([float(s) for s in spacing_zyx[::-1]])  # SimpleITK wants x, y, z
    sitk.WriteImage(image, str(path))


@pytest.fixture
def scored_folders(tmp_path):
    """Reference and prediction NIfTI folders with anisotropic spacing stored only in the image headers."""
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    shape, spacing = (10, 12, 12), (2.5, 1.0, 0.5)
    # case a: class 1 = plates 7.5 mm apart; class 2 identical in both
    ref_a, pred_a = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    ref_a[3, 2:8, 2:8] = 1
    pred_a[6, 2:8, 2:8] = 1
    ref_a[8, 1:4, 1:4] = pred_a[8, 1:4, 1:4] = 2
    # case b: class 1 identical, class 2 absent from both (both empty), class... and case c: class 2 missed
    ref_b = np.zeros(shape, np.uint8)
    ref_b[2:5, 2:5, 2:5] = 1
    ref_c = ref_b.copy()
    ref_c[7:9, 7:9, 7:9] = 2
    for name, ref, pred in (("a", ref_a, pred_a), ("b", ref_b, ref_b), ("c", ref_c, ref_b)):
        _write(ref, ref_dir / f"{name}.nii.gz", spacing)
        _write(pred, pred_dir / f"{name}.nii.gz", spacing)
    dataset_json = {"labels": {"background": 0, "head": 1, "body": 2}, "file_ending": ".nii.gz",
                    "channel_names": {"0": "MRI"}, "numTraining": 3}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    return ref_dir, pred_dir, tmp_path / "dataset.json", shape, spacing


def test_evaluate_folder_reads_spacing_from_headers_and_aggregates(scored_folders, tmp_path):
    ref_dir, pred_dir, dataset_json, shape, spacing = scored_folders
    out = tmp_path / "summary.json"
    result = evaluate_folder(str(ref_dir), str(pred_dir), str(dataset_json), tolerance={"1": 7.5, "2": 1.0},
                             output_file=str(out))
    assert json.loads(out.read_text())["per_case"] == json.loads(json.dumps(result["per_case"]))
    assert result["classes"] == {"1": "head", "2": "body"}
    cases = {c["case"]: c["metrics"] for c in result["per_case"]}
    assert cases["a"]["1"]["HD95"] == pytest.approx(7.5) and cases["a"]["1"]["NSD"] == 1.0  # 3 slices x 2.5 mm
    assert cases["a"]["1"]["Dice"] == 0.0 and cases["a"]["2"]["Dice"] == 1.0
    assert (cases["b"]["2"]["Dice"], cases["b"]["2"]["HD95"], cases["b"]["2"]["NSD"]) == (1.0, 0.0, 1.0)
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))
    assert cases["c"]["2"]["Dice"] == 0.0 and cases["c"]["2"]["HD95"] == pytest.approx(diagonal)
    # aggregates are means over cases of exactly these numbers
    dice_body = [cases[c]["2"]["Dice"] for c in "abc"]
    assert result["per_class"]["2"]["Dice"]["mean"] == pytest.approx(np.mean(dice_body))
    assert result["per_class"]["2"]["Dice"]["std"] == pytest.approx(np.std(dice_body, ddof=1))
    fg = [np.mean([cases[c][k]["NSD"] for k in ("1", "2")]) for c in "abc"]
    assert result["foreground_mean"]["NSD"]["mean"] == pytest.approx(np.mean(fg))


def test_evaluate_folder_refuses_missing_predictions(scored_folders):
    ref_dir, pred_dir, dataset_json, _, _ = scored_folders
    (pred_dir / "b.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="1 of 3 reference cases have no prediction"):
        evaluate_folder(str(ref_dir), str(pred_dir), str(dataset_json))
    with pytest.raises(EvaluationError, match="unknown class"):
        evaluate_folder(str(ref_dir), str(ref_dir), str(dataset_json), tolerance={"7": 1.0})


def test_evaluate_cli_prints_table_and_writes_json(scored_folders, tmp_path, capsys):
    from nnunet_foundation.cli import main

    ref_dir, pred_dir, dataset_json, _, _ = scored_folders
    out = tmp_path / "cli.json"
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(pred_dir), "--dataset-json", str(dataset_json),
                 "--tolerance", "7.5", "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["per_case"]) == 3
    # NIfTI images carry their spacing: distances in mm
    assert json.loads(out.read_text())["distance_unit"] == "mm" and "HD95 in mm" in capsys.readouterr().out
    assert main(["evaluate", "-ref", str(ref_dir), "-pred", str(tmp_path / "nope"), "--dataset-json",
                 str(dataset_json)]) == 2
