"""convert-2d on generated two-domain RGB data, and splits and reports by domain on the converted dataset.

The data: 'kvasir' JPEG images of varied sizes with 0/255 PNG masks, and 'cvc' PNG frames 1-9 in three "video
sequences" (a group file). The converted dataset is planned and preprocessed by the real nnUNetv2_plan_and_preprocess
(2d) once per module.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import nnunet_environment, plan_and_preprocess, run_cli, tree_digest
from nnunet_foundation.convert2d import ConversionError, convert_2d, parse_source
from nnunet_foundation.splits import CaseDomains, SplitError, draw_test_cases_by_group, make_label_scarcity_splits

DATASET_ID = 910
DATASET_NAME = f"Dataset{DATASET_ID:03d}_TwoDomains"
KVASIR_SIZES = [(40, 40), (48, 36), (40, 40), (36, 44), (40, 40), (44, 40), (40, 40), (40, 32)]  # (width, height)
CVC_SEQUENCES = {"seqA": ["1-3"], "seqB": ["4-6"], "seqC": ["7-8", "9"]}


def _blob(rng, width, height):
    """An RGB image with a brighter ellipse, and its 0/255 mask."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    inside = ((yy - cy) / (0.25 * height)) ** 2 + ((xx - cx) / (0.2 * width)) ** 2 <= 1
    rgb = rng.integers(20, 90, size=(height, width, 3)).astype(np.uint8)
    rgb[inside] += np.array([120, 60, 40], dtype=np.uint8)
    return rgb, (inside * 255).astype(np.uint8)


def write_two_domains(root: Path, seed: int = 0) -> dict:
    """Folders of the two domains; returns {'kvasir': (images, masks), 'cvc': (images, masks), 'groups': file}."""
    rng = np.random.default_rng(seed)
    out = {}
    for domain, names, ending in (("kvasir", [f"k{i}x" for i in range(len(KVASIR_SIZES))], ".jpg"),
                                  ("cvc", [str(i) for i in range(1, 10)], ".png")):
        images, masks = root / domain / "images", root / domain / "masks"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for k, name in enumerate(names):
            width, height = KVASIR_SIZES[k] if domain == "kvasir" else (40, 30)
            rgb, mask = _blob(rng, width, height)
            Image.fromarray(rgb).save(images / f"{name}{ending}", quality=95)
            Image.fromarray(mask).save(masks / f"{name}.png")
        out[domain] = (images, masks)
    out["groups"] = root / "cvc_sequences.json"
    out["groups"].write_text(json.dumps(CVC_SEQUENCES))
    return out


def convert_args(data: dict, *extra) -> list:
    return ["nnunet-foundation", "convert-2d", "-d", DATASET_ID, "--name", "TwoDomains", "--label-name", "polyp",
            "--source", f"kvasir={data['kvasir'][0]}:{data['kvasir'][1]}",
            "--source", f"cvc={data['cvc'][0]}:{data['cvc'][1]}", "--groups", f"cvc={data['groups']}", *extra]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Two domains converted with --max-size 32 and planned + preprocessed (2d) by nnU-Net."""
    root = tmp_path_factory.mktemp("convert2d")
    data = write_two_domains(root / "source")
    env = nnunet_environment(root / "nnunet")
    first = run_cli(convert_args(data, "--max-size", 32, "--progress-every", 5), env)
    plan_and_preprocess(env, DATASET_ID, configurations=("2d",))
    return {"data": data, "env": env, "raw": Path(env["nnUNet_raw"]) / DATASET_NAME, "stdout": first.stdout}


def test_conversion_is_what_nnunet_reads_as_rgb_with_0_1_labels(converted):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO

    raw = converted["raw"]
    dataset = json.loads((raw / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["file_ending"] == ".png"
    assert dataset["labels"] == {"background": 0, "polyp": 1} and dataset["numTraining"] == 17
    assert "converted 5/17" in converted["stdout"] and "kvasir 8, cvc 9" in converted["stdout"]
    reader = NaturalImage2DIO()
    image, _ = reader.read_images([str(raw / "imagesTr" / "kvasir_k1x_0000.png")])
    label, _ = reader.read_seg(str(raw / "labelsTr" / "kvasir_k1x.png"))
    # 48x36 shrunk to a longest side of 32: bilinear image, nearest mask, both 32 wide and 24 high
    assert image.shape == (3, 1, 24, 32) and label.shape == (1, 1, 24, 32)
    assert set(np.unique(label)) == {0, 1}
    for case in ("cvc_4", "kvasir_k0x"):
        assert set(np.unique(reader.read_seg(str(raw / "labelsTr" / f"{case}.png"))[0])) == {0, 1}
    # nnU-Net planned it as a 3-channel 2d dataset with the two labels (its integrity check passed too)
    plans = json.loads((Path(converted["env"]["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json").read_text())
    assert "2d" in plans["configurations"]
    assert len(plans["foreground_intensity_properties_per_channel"]) == 3
    # so pseudo-label, predict-generalist and SemiSAM show it to the generalist in colour, not as its red channel;
    # a dataset of other channels keeps the channel index
    from nnunet_foundation.foundation.config import colour_defaults

    assert colour_defaults(dataset) == {"image_channel": "rgb"}
    assert colour_defaults({"channel_names": {"0": "T2", "1": "ADC", "2": "B"}}) == {}
    assert colour_defaults({"channel_names": {"0": "MRI"}}) == {}
    side = json.loads((raw / "domains.json").read_text())
    assert side["domain"]["cvc_9"] == "cvc" and side["group"]["cvc_9"] == "seqC" and side["group"]["kvasir_k0x"] is None
    k1 = side["cases"]["kvasir_k1x"]
    assert (k1["original_width"], k1["original_height"], k1["width"], k1["height"]) == (48, 36, 32, 24)
    assert side["domains"]["cvc"]["groups"] == {"seqA": 3, "seqB": 3, "seqC": 3}


def test_rerun_changes_nothing_and_another_dataset_is_refused_unless_forced(converted, tmp_path):
    env = nnunet_environment(tmp_path / "nnunet")
    shutil.copytree(converted["raw"], Path(env["nnUNet_raw"]) / DATASET_NAME)
    raw = Path(env["nnUNet_raw"]) / DATASET_NAME
    before = tree_digest(raw)
    mtimes = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    again = run_cli(convert_args(converted["data"], "--max-size", 32), env)
    assert "up to date" in again.stdout
    assert tree_digest(raw) == before and {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == mtimes

    other = run_cli(convert_args(converted["data"], "--max-size", 40), env, check=False)
    assert other.returncode == 2 and "--force" in other.stderr and "Traceback" not in other.stderr
    assert tree_digest(raw) == before
    (raw / "imagesTr" / "intruder_0000.png").write_bytes(b"added by hand")  # never mixed into a conversion
    assert run_cli(convert_args(converted["data"], "--max-size", 32), env, check=False).returncode == 2

    run_cli(convert_args(converted["data"], "--max-size", 40, "--force"), env)
    assert not (raw / "imagesTr" / "intruder_0000.png").exists()
    assert Image.open(raw / "imagesTr" / "kvasir_k1x_0000.png").size == (40, 30)
    assert not [p for p in Path(env["nnUNet_raw"]).iterdir() if p.name.startswith(".")]  # no staging left


def _break(data: dict, how: str) -> str:
    """Damage the generated data one way; returns the file name the error must name."""
    images, masks = data["kvasir"]
    if how == "image without mask":
        (masks / "k2x.png").unlink()
        return "k2x.jpg"
    if how == "mask without image":
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "lonely.png")
        return "lonely.png"
    if how == "unreadable image":
        (images / "k3x.jpg").write_bytes(b"not a jpeg at all")
        return "k3x.jpg"
    if how == "mask of another size":
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(masks / "k4x.png")
        return "k4x.png"
    if how == "grey mask":
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).save(masks / "k0x.png")
        return "k0x.png"
    if how == "0/1 mask":
        mask = np.asarray(Image.open(masks / "k6x.png")) // 255
        Image.fromarray(mask.astype(np.uint8)).save(masks / "k6x.png")
        return "k6x.png"
    raise ValueError(how)


@pytest.mark.parametrize("how,message", [
    ("image without mask", "image without mask"), ("mask without image", "mask without image"),
    ("unreadable image", "unreadable image"), ("mask of another size", "12x10"),
    ("grey mask", "not a binary mask"), ("0/1 mask", "--threshold 0"),
])
def test_bad_inputs_stop_before_anything_is_written(tmp_path, how, message):
    data = write_two_domains(tmp_path / "source")
    culprit = _break(data, how)
    sources = [parse_source(f"{d}={data[d][0]}:{data[d][1]}") for d in ("kvasir", "cvc")]
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(ConversionError, match=message) as info:
        convert_2d(sources, str(raw), DATASET_ID, "TwoDomains", progress_every=0, log=lambda _: None)
    assert culprit in str(info.value)
    assert list(raw.iterdir()) == []  # not even a partial dataset or a staging folder


def test_group_rules_must_cover_every_case_and_cli_errors_are_one_line(tmp_path):
    data = write_two_domains(tmp_path / "source")
    data["groups"].write_text(json.dumps({"seqA": ["1-3"], "seqB": ["4-8"]}))  # frame 9 in no sequence
    env = nnunet_environment(tmp_path / "nnunet")
    proc = run_cli(convert_args(data), env, check=False)
    assert proc.returncode == 2 and "in no group" in proc.stderr and "'9'" in proc.stderr
    assert "Traceback" not in proc.stderr and not any(Path(env["nnUNet_raw"]).iterdir())


def test_test_set_by_domain_holds_out_whole_groups_and_labels_come_from_one_domain(converted):
    domains = CaseDomains.load(str(converted["raw"]))
    cases = sorted(domains.domain)
    test = draw_test_cases_by_group(cases, domains, {"kvasir": 0.25, "cvc": 0.34}, seed=0)
    assert test == draw_test_cases_by_group(cases, domains, {"cvc": 0.34, "kvasir": 0.25}, seed=0)
    test_cvc = [c for c in test if domains.domain[c] == "cvc"]
    assert len([c for c in test if domains.domain[c] == "kvasir"]) == 2 and len(test_cvc) == 3
    assert len({domains.group[c] for c in test_cvc}) == 1  # one whole sequence (round(0.34 x 3) = 1)
    kvasir = domains.cases_of(["kvasir"], cases)
    folds, infos = make_label_scarcity_splits(cases, [1, 2, 4], seeds=[0, 1], num_val=1, test_cases=test,
                                              with_full=True, labeled_from=kvasir)
    for fold, info in zip(folds, infos):
        assert not set(test) & (set(fold["train"]) | set(fold["val"]) | set(fold["unlabeled"]))
        assert sorted(fold["train"] + fold["val"] + fold["unlabeled"] + test) == cases  # every case once
        assert set(fold["val"]) <= set(kvasir)
        if info.num_labeled is not None:
            assert set(fold["train"]) <= set(kvasir)
            # every non-test cvc frame is unlabeled data, test sequences never are
            assert {c for c in fold["unlabeled"] if c.startswith("cvc")} == set(domains.cases_of(["cvc"], cases)) - \
                set(test_cvc)
    assert set(folds[0]["train"]) < set(folds[1]["train"]) < set(folds[2]["train"])  # nested per seed
    with pytest.raises(SplitError, match="unknown domain"):
        draw_test_cases_by_group(cases, domains, {"etis": 0.5}, seed=0)


def test_make_splits_by_domain_on_the_planned_dataset(converted, tmp_path):
    env = nnunet_environment(tmp_path / "nnunet")
    for key in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(Path(converted["env"][key]) / DATASET_NAME, Path(env[key]) / DATASET_NAME)
    out = run_cli(["nnunet-foundation", "make-splits", "-d", DATASET_ID, "--num-labeled", 2, 4, "--num-val", 1,
                   "--test-fraction", "kvasir=0.25", "cvc=0.34", "--labeled-domain", "kvasir"], env).stdout
    assert "held-out test cases: 5 (cvc 3, kvasir 2)" in out
    base = Path(env["nnUNet_preprocessed"]) / DATASET_NAME
    test = json.loads((base / "test_split.json").read_text())
    for fold in json.loads((base / "splits_final.json").read_text()):
        assert all(c.startswith("kvasir") for c in fold["train"] + fold["val"])
        assert not set(test) & set(fold["train"] + fold["val"] + fold["unlabeled"])
    bad = run_cli(["nnunet-foundation", "make-splits", "-d", DATASET_ID, "--num-labeled", 2, "--labeled-domain",
                   "etis", "--force"], env, check=False)
    assert bad.returncode == 2 and "unknown domain" in bad.stderr


def test_benchmark_report_gives_in_domain_and_cross_domain_metrics(converted, tmp_path, monkeypatch):
    """The report on fabricated per-case results (no training): per-domain tables recomputed from the cases."""
    from nnunet_foundation.benchmark import Benchmark, BenchmarkSettings, write_reports
    from nnunet_foundation.benchmark.settings import LOWER, SSL, UPPER
    from nnunet_foundation.cli import build_parser
    from nnunet_foundation.evaluation import summarise

    env = nnunet_environment(tmp_path / "nnunet")
    for key in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(Path(converted["env"][key]) / DATASET_NAME, Path(env[key]) / DATASET_NAME)
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("nnUNet_results", env["nnUNet_results"])
    settings = BenchmarkSettings(dataset=str(DATASET_ID), configuration="2d", labeled=(1, 2), seeds=(0, 1),
                                 other_seeds_at=(2,),
                                 test_fraction=("cvc=0.34", "kvasir=0.25"), labeled_domains=("kvasir",),
                                 num_val=1, budget="smoke", output=str(tmp_path / "bench"))
    bench = Benchmark(settings)
    assert [(i.num_labeled, i.seed) for i in bench.fold_infos] == [(1, 0), (2, 0), (None, 0), (2, 1), (None, 1)]
    assert build_parser().parse_args(bench.settings.command_args("/x")).other_seeds_at == [2]
    assert bench.settings.command_args("/x")[bench.settings.command_args("/x").index("--test-fraction") + 1] == \
        "cvc=0.34"
    bench.prepare()
    domains = CaseDomains.load(str(bench.raw))
    # per role: gap closed 0.75 on cvc, 0.25 on kvasir, 0.625 over both
    cvc_dice = {LOWER: 0.2, SSL: 0.5, UPPER: 0.6}
    kvasir_dice = {LOWER: 0.7, SSL: 0.75, UPPER: 0.9}
    results = []
    for run in bench.runs:
        per_case = []
        for case in bench.test_cases:
            dice = (kvasir_dice if domains.domain[case] == "kvasir" else cvc_dice)[run.role]
            metrics = {"Dice": dice, "HD95": 10 * (1 - dice), "NSD": dice}
            per_case.append({"case": case, "metrics": {"1": {**metrics, "n_ref": 1, "n_pred": 1}},
                             "foreground_mean": metrics})
        evaluation = {"per_case": per_case, "classes": {"1": "polyp"}, "tolerance_mm": {"1": 1.0},
                      **summarise(per_case, {"1": "polyp"})}
        results.append({"run": run.describe(), "evaluation": evaluation, "training": {}, "timings": {}})
    data = write_reports(bench, results, [])
    cvc = data["by_test_domain"]["cvc"]
    kvasir = data["by_test_domain"]["kvasir"]
    assert (cvc["setting"], kvasir["setting"]) == ("cross-domain", "in-domain")
    assert (cvc["num_test_cases"], cvc["num_test_groups"], kvasir["num_test_cases"]) == (3, 1, 2)
    ssl = "nnUNetTrainerMeanTeacher_smoke"
    assert cvc["aggregates"][ssl]["2"]["foreground_mean"]["Dice"]["mean"] == pytest.approx(0.5)
    assert kvasir["aggregates"][ssl]["2"]["foreground_mean"]["Dice"]["mean"] == pytest.approx(0.75)
    assert cvc["gap_closed"][ssl]["2"]["Dice"]["mean"] == pytest.approx(0.75)  # (0.5-0.2)/(0.6-0.2)
    assert kvasir["gap_closed"][ssl]["2"]["Dice"]["mean"] == pytest.approx(0.25)
    assert data["aggregates"][ssl]["2"]["foreground_mean"]["Dice"]["mean"] == pytest.approx(0.6)
    assert data["gap_closed"][ssl]["2"]["Dice"]["mean"] == pytest.approx(0.625)
    report = (bench.output / "report.md").read_text()
    # PNGs have no spacing (nnU-Net reads each pixel as 1 x 1): the report says pixels, not mm
    assert data["metrics"]["distance_unit"] == "px" and "HD95 in px" in report and "HD95 (px)" in report
    assert " mm" not in report
    assert "### cvc (cross-domain): 3 test cases from 1 held-out groups" in report
    assert "### kvasir (in-domain): 2 test cases" in report and "(cvc 3, kvasir 2)" in report
    # the Dice plot once more with a panel per domain, linked from the report
    assert (bench.output / "dice_vs_labeled_per_domain.png").stat().st_size > 10_000
    assert "](dice_vs_labeled_per_domain.png)" in report and "dice_vs_labeled_per_domain.png" in data["plots"]
    assert data["aggregates"][ssl]["2"]["seeds"] == [0, 1] and data["aggregates"][ssl]["1"]["seeds"] == [0]
    for gap in ("0.625", "0.750", "0.250"):  # overall, cvc, kvasir; columns 1 labeled (seed 0), 2 (seeds 0, 1)
        assert f"| nnUNetTrainerMeanTeacher_smoke | Dice | {gap} | {gap} ± 0.000 |" in report
