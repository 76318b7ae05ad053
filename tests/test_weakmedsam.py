"""WeakMedSAM (nnunet_foundation/methods/weakmedsam): the affinity and random-walk maths, the prompt grid, the
sub-class clustering, what the classifier trains, the side file, and a generated 2D dataset with slice-level labels
only, from ``nnunet-foundation weak-labels`` through the stock nnUNetv2_plan_and_preprocess / train / predict.

The tiny random SAM (foundation/tiny.py) stands in for LiteMedSAM: its masks are meaningless, so the end-to-end test
checks the plumbing and the data contract, never pseudo-mask quality (README 'WeakMedSAM' gives measured quality).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import nnunet_environment, plan_and_preprocess, run_cli, tree_digest
from nnunet_foundation.methods.weakmedsam import affinity as aff

SOURCE_ID, WEAK_ID, OUT_ID = 930, 931, 932
LABELED_CASES = ["blob_000", "blob_001"]  # keep their masks; every other case has slice-level labels only


# ------------------------------------------------------------------------------------------------ maths
def test_affinity_matrix_properties():
    torch.manual_seed(0)
    logits = torch.randn(1, 12, 10) * 3
    radius = 5
    a = aff.affinity_matrix(logits, radius)
    assert a.shape == (120, 120)
    assert torch.equal(a, a.T), "affinity must be symmetric before normalisation"
    assert torch.allclose(a.diagonal(), torch.ones(120))
    yy, xx = np.divmod(np.arange(120), 10)
    distance = np.hypot(yy[:, None] - yy[None], xx[:, None] - xx[None])
    outside = torch.from_numpy(distance >= radius)
    assert bool((a[outside] == 0).all()), "no affinity at or beyond the radius"
    assert bool((a[~outside] > 0).all()), "every pair inside the radius has an affinity"
    # the value itself: exp(-|m_i - m_j|) for a pair 3 cells apart on one row
    i, j = 0, 3
    assert torch.isclose(a[i, j], torch.exp(-(logits[0, 0, 0] - logits[0, 0, 3]).abs()))
    t = aff.transition_matrix(a, beta=4)
    assert torch.allclose(t.sum(dim=0), torch.ones(120), atol=1e-6), "columns sum to 1"
    assert torch.allclose(t * (a.sum(0) ** 0), a.pow(4) / a.pow(4).sum(0, keepdim=True))


def test_random_walk_spreads_inside_object_not_across_edge():
    h = w = 20
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[4:14, 3:11] = True
    logits = torch.where(inside, 8.0, -8.0)[None]  # the summed prompt masks: a strong edge at the object border
    cam = torch.zeros(1, h, w)
    cam[0, 8, 6] = 1.0  # a CAM that fires on one cell of the object
    walked = aff.random_walk(cam, aff.transition_matrix(aff.affinity_matrix(logits, 5), 4), steps=4)[0]
    assert walked[inside].mean() > 0.2, "the seed spreads over the object"
    assert (walked[inside] > 0.01).float().mean() > 0.5
    assert walked[~inside].max() < 1e-3, "nothing crosses the strong edge"
    # the same walk without the edge leaks out of the object: the edge is what stops it
    flat = aff.random_walk(cam, aff.transition_matrix(aff.affinity_matrix(torch.zeros(1, h, w), 5), 4), steps=4)[0]
    assert flat[~inside].max() > 0.1


def test_cam_and_walk_ignore_the_padding_cells():
    """SAM-family encoders pad the image bottom/right: what the padding cells score must not rescale the content's
    CAM (min-max) nor take part in the walk; the padding cells repeat the content's edge for the upsampling."""
    torch.manual_seed(0)
    rows, cols, eh, ew = 10, 7, 12, 12
    cam = torch.randn(2, eh, ew)
    prompts = torch.randn(eh, ew)
    refined = aff.refine_on_content(cam, prompts, rows, cols, radius=3, beta=4, steps=3)
    assert refined.shape == (2, eh, ew)
    padded_cam, padded_prompts = cam.clone(), prompts.clone()
    padded_cam[:, rows:, :] = 50.0       # a padding that scores far above the content ...
    padded_cam[:, :, cols:] = -50.0      # ... and far below it
    padded_prompts[rows:, :] = padded_prompts[:, cols:] = 9.0
    again = aff.refine_on_content(padded_cam, padded_prompts, rows, cols, radius=3, beta=4, steps=3)
    assert torch.equal(again, refined), "the padding cells changed the content's maps"
    content = refined[:, :rows, :cols]
    assert torch.allclose(content.amax(dim=(-2, -1)), torch.ones(2)) and float(content.min()) < 1e-3
    assert torch.equal(refined[:, rows:, :cols], content[:, -1:, :].expand(-1, eh - rows, -1))
    assert torch.equal(refined[:, :rows, cols:], content[:, :, -1:].expand(-1, -1, ew - cols))
    # what the walk alone would give on the content cells
    walk = aff.random_walk(aff.min_max(cam[:, :rows, :cols]),
                           aff.transition_matrix(aff.affinity_matrix(prompts[None, :rows, :cols], 3), 4), 3)
    assert torch.equal(content, walk)


def test_prompt_probabilities_let_the_walk_spread_where_raw_logits_of_a_box_trained_model_do_not():
    torch.manual_seed(0)
    h = w = 20
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[4:14, 3:11] = True
    # 16 point answers as LiteMedSAM gives them (-20 +- 3 wherever no mask responds), one prompt's mask on the object
    answers = -20 + 3 * torch.randn(16, 1, h, w)
    answers[0, 0] = torch.where(inside, 8.0, -8.0) + torch.randn(h, w)
    cam = torch.zeros(1, h, w)
    cam[0, 8, 6] = 1.0

    def walk(kind):
        summed = aff.prompt_response_map(answers, kind)
        assert summed.shape == (1, h, w)
        return aff.random_walk(cam, aff.transition_matrix(aff.affinity_matrix(summed, 5), 4), steps=4)[0]

    probabilities, logits = walk("probabilities"), walk("logits")
    assert (probabilities[inside] > 0.01).all() and probabilities[inside].mean() > 0.3, "spreads over the object"
    assert probabilities[~inside].mean() < 0.05 * probabilities[inside].mean(), "and stops at its edge"
    # the released code's raw-logit sum: the noise between neighbours is tens of logits, the walk stays on its seed
    assert (logits[inside] > 0.01).float().mean() < 0.05
    with pytest.raises(ValueError, match="prompt map"):
        aff.prompt_response_map(answers, "softmax")


def test_point_grid_covers_whole_image():
    height, width, n = 48.0, 36.0, 4
    points = aff.uniform_point_grid(height, width, n)
    assert points.shape == (n * n, 2)
    x, y = points[:, 0], points[:, 1]
    assert bool(((x > 0) & (x < width) & (y > 0) & (y < height)).all())
    # one point in every tile of an n x n tiling of the whole image
    tiles = {(int(yy // (height / n)), int(xx // (width / n))) for xx, yy in points.tolist()}
    assert tiles == {(r, c) for r in range(n) for c in range(n)}
    assert x.max() - x.min() == pytest.approx(width * (n - 1) / n)
    assert y.max() - y.min() == pytest.approx(height * (n - 1) / n)


def test_subclass_labels_reproducible_with_a_seed():
    from nnunet_foundation.methods.weakmedsam.subclasses import explore_subclasses, subclass_targets

    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6)) + np.repeat(rng.normal(size=(4, 6)) * 5, 10, axis=0)
    labels = [[1] if i % 5 else [] for i in range(20)] + [[1, 2] if i % 2 else [2] for i in range(20)]
    first = explore_subclasses(features, labels, num_classes=2, num_subclasses=3, seed=7)
    assert first == explore_subclasses(features, labels, num_classes=2, num_subclasses=3, seed=7)
    assert [sorted(s) for s in first] == [sorted(x) for x in labels], "a sub-class for each present class only"
    assert {v for s in first for v in s.values()} == {0, 1, 2}
    target = subclass_targets({1: 2, 2: 0}, num_classes=2, num_subclasses=3)
    assert target.tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert subclass_targets({}, 2, 3).tolist() == [1, 0, 0, 0, 0, 0, 0]


def test_roc_auc_of_the_localisation_benchmark():
    import importlib.util

    spec = importlib.util.spec_from_file_location("localisation", Path(__file__).resolve().parent.parent /
                                                  "benchmarks" / "weakmedsam_localisation.py")
    localisation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localisation)
    truth = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert localisation.roc_auc(np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7]), truth) == 1.0
    assert localisation.roc_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]), truth) == 0.0
    assert localisation.roc_auc(np.full(6, 0.5), truth) == 0.5
    assert localisation.roc_auc(np.array([0.1, 0.6, 0.5, 0.9, 0.3, 0.2]), truth) == pytest.approx(2 / 3)
    assert np.isnan(localisation.roc_auc(np.ones(3), np.zeros(3, dtype=bool)))


def test_masks_from_maps_gate_and_argmax():
    maps = torch.tensor([[[0.9, 0.6, 0.2]], [[0.7, 0.8, 0.3]]])
    assert aff.masks_from_maps(maps, torch.tensor([True, True])).tolist() == [[1, 2, 0]]
    assert aff.masks_from_maps(maps, torch.tensor([False, True])).tolist() == [[2, 2, 0]]
    assert aff.masks_from_maps(maps, torch.tensor([False, False])).tolist() == [[0, 0, 0]]


# ------------------------------------------------------------------------------------------ side file
def test_derive_side_file_along_an_axis_and_errors(tmp_path):
    from nnunet_foundation.methods.weakmedsam.weak_labels import WeakLabelError, derive_weak_labels, load_weak_labels
    from nnunet_foundation.synthetic import write_dataset

    folder = write_dataset(str(tmp_path), dataset_id=933, name="Tiny3D", num_labeled=1, num_unlabeled=0,
                           shape=(6, 16, 12))
    import SimpleITK as sitk

    label = sitk.GetArrayFromImage(sitk.ReadImage(f"{folder}/labelsTr/tiny3d_000.nii.gz"))  # (z, y, x)
    path = derive_weak_labels(folder, axis=2)
    derived = load_weak_labels(folder)
    assert path.endswith("imageLabelsTr.json") and derived["axis"] == 2
    expected = [sorted(int(v) for v in np.unique(label[:, :, i]) if v) for i in range(label.shape[2])]
    assert derived["cases"]["tiny3d_000"] == expected and any(expected) and not all(expected)
    data = json.loads(Path(path).read_text())
    data["cases"]["tiny3d_000"][0] = [3]
    Path(path).write_text(json.dumps(data))
    with pytest.raises(WeakLabelError, match=r"imageLabelsTr.json.*\[3\].*foreground labels"):
        load_weak_labels(folder)
    # a slice count that does not match the image is refused with the file and the fix
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset

    data["cases"]["tiny3d_000"] = expected[:-1]
    Path(path).write_text(json.dumps(data))
    shutil.rmtree(f"{folder}/labelsTr")
    with pytest.raises(WeakLabelError, match=r"lists 11 slice\(s\), but its image has 12 along axis 2"):
        WeakDataset(folder).slices("tiny3d_000")


# ------------------------------------------------------------------------------------- generated 2D data
def write_blobs(raw: Path, dataset_id: int, num_cases: int = 14, size: int = 40, seed: int = 0) -> Path:
    """Grey PNG images with one bright ellipse (label 1) in three of four cases, and their masks."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = raw / f"Dataset{dataset_id:03d}_Blobs"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(num_cases):
        image = rng.normal(60, 12, (size, size))
        mask = np.zeros((size, size), np.uint8)
        if i % 4 != 3:
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            r = rng.uniform(0.12, 0.22) * size
            mask[((yy - cy) / r) ** 2 + ((xx - cx) / (0.8 * r)) ** 2 <= 1] = 1
            image[mask == 1] += 110
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / "imagesTr" / f"blob_{i:03d}_0000.png")
        Image.fromarray(mask).save(folder / "labelsTr" / f"blob_{i:03d}.png")
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "gray"},
                                                     "labels": {"background": 0, "blob": 1},
                                                     "numTraining": num_cases, "file_ending": ".png"}))
    return folder


@pytest.fixture(scope="module")
def weak_tree(tmp_path_factory):
    """A raw tree: the labeled source, and its copy with slice-level labels only (made by 'weak-labels derive')."""
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    root = tmp_path_factory.mktemp("weakmedsam")
    env = nnunet_environment(root)
    source = write_blobs(Path(env["nnUNet_raw"]), SOURCE_ID)
    weak_cases = sorted(p.name[:-4] for p in (source / "labelsTr").iterdir() if p.name[:-4] not in LABELED_CASES)
    out = run_cli(["nnunet-foundation", "weak-labels", "derive", "-d", SOURCE_ID, "--cases", *weak_cases,
                   "--copy-to", WEAK_ID], env)
    assert "12 case(s) with slice labels only" in out.stdout and "2 case(s) with their masks" in out.stdout
    weak = Path(env["nnUNet_raw"]) / f"Dataset{WEAK_ID:03d}_BlobsSliceLabels"
    # float32: CPU bfloat16 autocast ("auto") makes the tiny model 3x slower
    env["generalist"] = json.dumps({"backend": "sam", "model_type": "tiny", "precision": "float32",
                                    "checkpoint": str(save_tiny_sam_checkpoint(root / "tiny_sam.pth"))})
    return root, env, source, weak, weak_cases


def test_side_file_derived_without_touching_the_source(weak_tree):
    from PIL import Image

    root, env, source, weak, weak_cases = weak_tree
    side = json.loads((weak / "imageLabelsTr.json").read_text())
    assert side["axis"] == 0 and sorted(side["cases"]) == weak_cases
    for case in weak_cases:
        present = int(np.asarray(Image.open(source / "labelsTr" / f"{case}.png")).max())
        assert side["cases"][case] == ([[1]] if present else [[]])
    assert sorted(p.name for p in (weak / "labelsTr").iterdir()) == [f"{c}.png" for c in LABELED_CASES]
    assert len(list((source / "labelsTr").iterdir())) == 14


def test_classifier_trains_lora_and_heads_only(weak_tree, monkeypatch):
    """The classifier stage in-process on the weak dataset: only LoRA and the heads change; every other parameter of
    the generalist stays bit-identical to the checkpoint."""
    root, env, source, weak, weak_cases = weak_tree
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset, WeakMedSAMRun, WeakMedSAMSettings

    generalist = json.loads(env["generalist"])
    run = WeakMedSAMRun(WeakDataset(str(weak)), str(root / "classifier_only"), generalist,
                        WeakMedSAMSettings(classifier_steps=6, batch_size=4, lr=1e-2), log=lambda m: None)
    model = run.classifier()
    heads = ("parent_head.", "subclass_head.")
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(heads)}
    assert run.run(stop_after="classifier") == {}
    checkpoint = torch.load(generalist["checkpoint"], weights_only=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n or n.startswith(("parent_head", "subclass_head")) for n in trainable)
    for name, tensor in model.generalist.sam.state_dict().items():
        if ".lora_" in name:
            continue
        assert torch.equal(tensor, checkpoint[name.replace(".qkv.base.", ".qkv.")]), f"{name} changed"
    lora_b = [p for n, p in model.named_parameters() if ".lora_b_" in n]
    assert lora_b and any(bool(p.abs().sum() > 0) for p in lora_b), "LoRA B starts at 0 and must have learned"
    assert len(heads_before) == 2
    assert all(not torch.equal(heads_before[k], v) for k, v in model.state_dict().items() if k.startswith(heads))
    saved = torch.load(run.classifier_file(), weights_only=True)
    assert set(saved["adapted"]) == {n[len("generalist."):] for n in trainable if n.startswith("generalist.")}


@pytest.mark.e2e
def test_slice_labels_to_nnunet_predict(weak_tree, tmp_path):
    """weak-labels run (no mask of a weak case exists anywhere: they were never copied), then the stock
    plan_and_preprocess / train (nnUNetTrainerWeakMedSAM_smoke) / predict; resume and refusal of changed inputs."""
    root, env, source, weak, weak_cases = weak_tree
    from PIL import Image

    args = ["nnunet-foundation", "weak-labels", "run", "-d", WEAK_ID, "-o_d", OUT_ID, "--generalists",
            env["generalist"], "--classifier-steps", 4, "--batch-size", 4]
    out = run_cli(args, env)
    assert "12 slice-labelled case(s) (axis 0), 2 case(s) with masks" in out.stdout
    assert "done: 12 pseudo-mask(s) written, 0 already there, 0 still missing" in out.stdout
    assert "classifier step 4/4" in out.stdout and "features 12/12" in out.stdout
    # the check: the 2 cases with masks pseudo-labelled as the weak ones and scored against their masks
    assert "check on the 2 case(s) with masks" in out.stdout
    check = json.loads((Path(env["nnUNet_raw"]) / f"Dataset{OUT_ID:03d}_BlobsSliceLabelsWeakMedSAM" /
                        "weakmedsam_work" / "labeled_check.json").read_text())
    assert sorted(check["cases"]) == LABELED_CASES and set(check["mean_dice"]) == {"1"}
    for case, row in check["cases"].items():
        assert 0 <= row["dice"]["1"] <= 1 and row["slices"] == 1
        mask = np.asarray(Image.open(weak / "labelsTr" / f"{case}.png"))
        assert row["foreground_fraction_mask"] == pytest.approx(float((mask > 0).mean()))
    assert check["mean_dice"]["1"] == pytest.approx(np.mean([r["dice"]["1"] for r in check["cases"].values()]))
    output = Path(env["nnUNet_raw"]) / f"Dataset{OUT_ID:03d}_BlobsSliceLabelsWeakMedSAM"
    assert sorted(p.name for p in (output / "labelsTr").iterdir()) == sorted(f"blob_{i:03d}.png" for i in range(14))
    for case in LABELED_CASES:  # the user's masks are kept byte for byte
        assert (output / "labelsTr" / f"{case}.png").read_bytes() == (weak / "labelsTr" / f"{case}.png").read_bytes()
    for case in weak_cases:
        mask = np.asarray(Image.open(output / "labelsTr" / f"{case}.png"))
        assert mask.shape == (40, 40) and set(np.unique(mask)) <= {0, 1}
    assert json.loads((output / "dataset.json").read_text())["numTraining"] == 14

    # benchmarks/weakmedsam_localisation.py recomputes the maps of the written run and scores them against the masks
    import importlib.util

    spec = importlib.util.spec_from_file_location("localisation", Path(__file__).resolve().parent.parent /
                                                  "benchmarks" / "weakmedsam_localisation.py")
    localisation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(localisation)
    scores = tmp_path / "localisation.json"
    assert localisation.main(["--pseudo", str(output), "--source", str(weak), "--truth", str(source), "--cases", "5",
                              "--generalists", env["generalist"], "--json", str(scores)]) == 0
    blob = json.loads(scores.read_text())["classes"]["blob"]
    positive = [c for c in weak_cases[:5] if json.loads((weak / "imageLabelsTr.json").read_text())["cases"][c][0]]
    assert positive and set(blob) == {"cam", "refined"}
    for row in blob.values():
        assert 0 <= row["auc"] <= 1 and row["pixels"] == 40 * 40 * len(positive)
        assert 0 <= row["dice_at_threshold"] <= 1 and 0 <= row["best_dice"] <= 1
    stats = json.loads((output / "weakmedsam_work" / "pseudo_stats_part0of1.json").read_text())
    assert sorted(stats) == weak_cases

    # resume: nothing is redone; changed settings are refused and change nothing
    before = tree_digest(output)
    again = run_cli(args, env)
    assert "done: 0 pseudo-mask(s) written, 12 already there" in again.stdout and "features" not in again.stdout
    refused = run_cli(args[:-4] + ["--classifier-steps", 5], env, check=False)
    assert refused.returncode == 2 and "settings differ" in refused.stderr and "-o_d" in refused.stderr
    assert tree_digest(output) == before

    plan_and_preprocess(env, OUT_ID, configurations=("2d",))
    run_cli(["nnUNetv2_train", OUT_ID, "2d", 0, "-tr", "nnUNetTrainerWeakMedSAM_smoke", "-device", "cpu"], env)
    results = Path(env["nnUNet_results"]) / output.name / "nnUNetTrainerWeakMedSAM_smoke__nnUNetPlans__2d"
    settings = json.loads((results / "fold_0" / "ssl_settings.json").read_text())["settings"]
    assert settings == {"ce_background_weight": 10.0, "dice_weight": 0.0}
    images = tmp_path / "imagesTs"
    images.mkdir()
    for case in weak_cases[:2]:
        shutil.copy(source / "imagesTr" / f"{case}_0000.png", images)
    run_cli(["nnUNetv2_predict", "-d", OUT_ID, "-c", "2d", "-tr", "nnUNetTrainerWeakMedSAM_smoke", "-f", 0,
             "-i", images, "-o", tmp_path / "pred", "-device", "cpu", "--disable_tta", "-npp", 0, "-nps", 0], env)
    predicted = sorted(p.name for p in (tmp_path / "pred").glob("*.png"))
    assert predicted == [f"{c}.png" for c in weak_cases[:2]]
    assert np.asarray(Image.open(tmp_path / "pred" / predicted[0])).shape == (40, 40)


def test_3d_cases_are_sliced_along_the_side_file_axis(tmp_path):
    """3D volumes: one image per slice along the side file's axis, pseudo-masks written back in the volume's shape
    and geometry; with gate 'weak-label' a slice without labels stays background whatever the classifier says.
    Also the 'heads' mode (frozen encoder, heads on the cached pooled embeddings)."""
    import SimpleITK as sitk

    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset, WeakMedSAMRun, WeakMedSAMSettings
    from nnunet_foundation.methods.weakmedsam.weak_labels import derive_weak_labels
    from nnunet_foundation.synthetic import write_dataset

    folder = write_dataset(str(tmp_path), dataset_id=934, name="Vol", num_labeled=2, num_unlabeled=0,
                           shape=(6, 16, 10), spacing=(2.0, 1.0, 1.5))
    derive_weak_labels(folder, axis=2)
    side = json.loads((Path(folder) / "imageLabelsTr.json").read_text())["cases"]
    shutil.rmtree(f"{folder}/labelsTr")
    generalist = {"backend": "sam", "model_type": "tiny", "precision": "float32",
                  "checkpoint": str(save_tiny_sam_checkpoint(tmp_path / "t.pth"))}
    settings = WeakMedSAMSettings(trainable="heads", classifier_steps=20, batch_size=4, num_subclasses=2,
                                  gate="weak-label")
    run = WeakMedSAMRun(WeakDataset(folder), str(tmp_path / "out"), generalist, settings, log=lambda m: None)
    assert run.run()["done"] == 2
    assert not run.classifier().generalist.trainable_parameters(), "trainable 'heads' leaves the encoder frozen"
    for case, slices in side.items():
        image = sitk.ReadImage(f"{folder}/imagesTr/{case}_0000.nii.gz")
        mask_image = sitk.ReadImage(str(tmp_path / "out" / "labelsTr" / f"{case}.nii.gz"))
        assert mask_image.GetSize() == image.GetSize() and mask_image.GetSpacing() == image.GetSpacing()
        mask = sitk.GetArrayFromImage(mask_image)  # (z, y, x); slices along x
        for i, labels in enumerate(slices):
            assert set(np.unique(mask[:, :, i])) - {0} <= set(labels)


def test_the_check_on_labeled_cases_scores_a_perfect_pseudo_labeler_1_and_an_empty_one_0(tmp_path):
    """The labeled-case check pins its numbers: a pseudo-labeler that returns the truth scores Dice 1 for every
    class and every slice label right; one that returns background scores 0. The images equal 100 x the masks, so
    'perfect' is computed from the slices the check hands over (read along the side file's axis): a mask read along
    another axis than its image would score below 1."""
    import SimpleITK as sitk

    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset, WeakMedSAMRun, WeakMedSAMSettings
    from nnunet_foundation.methods.weakmedsam.weak_labels import derive_weak_labels

    folder = tmp_path / "Dataset935_Check"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        seg = np.zeros((5, 12, 9), np.uint8)  # (z, y, x); slices along x (axis 2) differ from z slices
        seg[1:4, 2:7, 1 + i:5 + i] = 1
        seg[2:5, 7:11, 3:8] = 2
        seg[rng.random(seg.shape) < 0.05] = 0
        for array, path in ((seg * 100.0, folder / "imagesTr" / f"c{i}_0000.nii.gz"),
                            (seg, folder / "labelsTr" / f"c{i}.nii.gz")):
            image = sitk.GetImageFromArray(array.astype(np.float32 if array.dtype != np.uint8 else np.uint8))
            image.SetSpacing((1.5, 1.0, 2.0))
            sitk.WriteImage(image, str(path))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                     "labels": {"background": 0, "a": 1, "b": 2},
                                                     "numTraining": 3}))
    derive_weak_labels(str(folder), axis=2, cases=["c0"])
    (folder / "labelsTr" / "c0.nii.gz").unlink()  # c0 is the weak case, c1 and c2 keep their masks
    source = WeakDataset(str(folder))
    assert source.labeled == ["c1", "c2"] and source.weak == ["c0"]
    run = WeakMedSAMRun(source, str(tmp_path / "out"), {"backend": "sam", "model_type": "tiny"},
                        WeakMedSAMSettings(), log=lambda m: None)
    os.makedirs(run.work)
    seen = []

    def perfect(slices, slice_labels):
        seen.append([list(labels) for labels in slice_labels])
        return np.rint(slices / 100).astype(np.uint8), len(slice_labels)

    run.case_masks = perfect
    check = run.check_on_labeled_cases()
    assert check["mean_dice"] == {"1": 1.0, "2": 1.0}
    for case, entry in check["cases"].items():
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / f"{case}.nii.gz")))
        assert entry["slices"] == mask.shape[2] == entry["label_correct"]  # slices along axis 2, all labels right
        assert entry["foreground_fraction"] == entry["foreground_fraction_mask"] == pytest.approx((mask > 0).mean())
    # the slice labels handed to the pseudo-labeler are the classes each slice's mask holds
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "c1.nii.gz")))
    assert seen[0] == [sorted(int(v) for v in np.unique(mask[:, :, i]) if v) for i in range(mask.shape[2])]
    # saved and reused; a pseudo-labeler that finds nothing scores 0 once the saved check is gone
    assert json.loads((Path(run.work) / "labeled_check.json").read_text()) == check
    run.case_masks = lambda slices, labels: (np.zeros(slices.shape, np.uint8), 0)
    assert run.check_on_labeled_cases() == check
    os.remove(os.path.join(run.work, "labeled_check.json"))
    empty = run.check_on_labeled_cases()
    assert empty["mean_dice"] == {"1": 0.0, "2": 0.0} and all(e["foreground_fraction"] == 0
                                                            for e in empty["cases"].values())
