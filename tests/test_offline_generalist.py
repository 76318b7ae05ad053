"""The generalist outside training, end to end: ``nnunet-foundation generalist-quality`` and ``pseudo-label``, prompted
by a real nnU-Net model trained with nnUNetv2_train (oracle prompts come from the labels). A tiny SAM keeps it fast;
the real-weight conventions are checked in test_litemedsam.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SYNTHETIC_ID, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    """A copy of the synthetic tree with a smoke-trained 2d nnU-Net (fold 0), unlabeled scans preprocessed, and a
    tiny SAM checkpoint: (env, checkpoint)."""
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    root = tmp_path_factory.mktemp("offline")
    env = copy_nnunet_tree(synthetic_dataset, root / "tree")
    preprocess_unlabeled_cli(env, ("2d",))
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainer_smoke", "-device", "cpu"], env)
    return env, save_tiny_sam_checkpoint(root / "tiny_sam.pth", seed=1)


def test_oracle_and_specialist_prompts_through_the_cli(trained, tmp_path):
    env, checkpoint = trained
    generalists = json.dumps([{"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint)},
                              {"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint),
                               "stitch": True}])
    out = tmp_path / "quality"
    proc = run_cli(["nnunet-foundation", "generalist-quality", "-d", SYNTHETIC_ID, "-c", "2d", "--generalists",
                    generalists, "-tr", "nnUNetTrainer_smoke", "-f", "0", "--num-cases", 2,
                    "--exclude-fold-training", 0, "-o", out], env)
    rows = json.loads((out / "generalist_quality.json").read_text())
    # two generalists x (oracle, specialist) and the prompting model alone once
    assert [r["mode"] for r in rows] == ["oracle", "specialist", "specialist alone", "oracle", "specialist"]
    assert rows[1]["name"].startswith("sam tiny") and rows[4]["name"].endswith("stitch=True)")
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset900_Synthetic" / "splits_final.json").read_text())
    evaluated = set(rows[0]["dice_per_case"])
    assert len(evaluated) == 2 and not evaluated & set(splits[0]["train"])  # cases the model never trained on
    for r in rows:
        assert set(r["dice_per_class"]) == {"head", "body"}  # named as dataset.json names the labels
        assert all(0.0 <= v <= 1.0 for v in r["dice_per_class"].values() if not np.isnan(v))
    assert rows[0]["slices_encoded"] > 0 and rows[0]["ms_per_slice"] > 0
    # the stitched generalist encodes mosaics: fewer encoder images for the same slices
    assert rows[3]["slices_encoded"] < rows[0]["slices_encoded"]
    assert (out / "generalist_quality.png").stat().st_size > 0 and "| oracle |" in proc.stdout

    missing = run_cli(["nnunet-foundation", "generalist-quality", "-d", SYNTHETIC_ID, "-c", "2d", "--modes",
                       "specialist", "-o", tmp_path / "x"], env, check=False)
    assert missing.returncode == 2 and "needs the trained model" in missing.stderr


def test_pseudo_labels_are_written_resumed_split_and_guarded(trained, tmp_path):
    env, checkpoint = trained
    generalist = json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint)})
    base = ["nnunet-foundation", "pseudo-label", "-d", SYNTHETIC_ID, "-c", "2d", "-tr", "nnUNetTrainer_smoke", "-f",
            0, "--generalists", generalist]
    # two machines: each labels its part of the four unlabeled scans
    first = run_cli([*base, "-part_id", 0, "-num_parts", 2], env)
    assert "2 case(s) in this part: 0 already done, 2 to do" in first.stdout
    folder = (Path(env["nnUNet_preprocessed"]) / "Dataset900_Synthetic" / "nnUNetPlans_2d_pseudo_labels"
              / "nnUNetTrainer_smoke__nnUNetPlans__fold0")
    assert len(list(folder.glob("*.npz"))) == 2
    run_cli([*base, "-part_id", 1, "-num_parts", 2], env)
    files = sorted(folder.glob("*.npz"))
    unlabeled = sorted(p.name.split("_0000")[0] for p in
                       (Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesUnlabeled").iterdir())
    assert [f.stem for f in files] == unlabeled
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["specialist"]["trainer"] == "nnUNetTrainer_smoke" and len(manifest["specialist"]["sha256"]) == 64
    assert manifest["generalist"]["checkpoint_sha256"] and "checkpoint" not in manifest["generalist"]

    with np.load(files[0]) as npz:
        probabilities, covered, label = npz["probabilities"], npz["covered"], npz["label"]
    assert probabilities.shape[0] == 3 and probabilities.shape[1:] == label.shape == covered.shape
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(0), 1.0, atol=1e-2)  # a distribution
    assert set(np.unique(label)) <= {0, 1, 2, 255}
    assert (label[~covered] == 255).all()  # no prompt there: the label says nothing, not "background"
    assert ((label != 255) == (covered & (probabilities.max(0) >= 0.5))).all()

    # a rerun skips finished cases; another generalist is refused instead of mixing two sources
    again = run_cli(base, env)
    assert "4 already done, 0 to do" in again.stdout
    other = json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint), "box_jitter": 2})
    refused = run_cli([*base[:-1], other], env, check=False)
    assert refused.returncode == 2 and "manifest.json was made from other inputs (generalist differ)" in refused.stderr


def threshold_cache(env: dict, name: str, threshold: float):
    """A 2d pseudo-label cache of fold 0's unlabeled cases whose label is a known function of the image (image >
    threshold), with a stripe marked unknown: (cache folder, cases)."""
    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.unlabeled import UnlabeledImageDataset, plans_fingerprint

    base = Path(env["nnUNet_preprocessed"]) / "Dataset900_Synthetic"
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    cases = pl.fold_unlabeled_cases(str(base), plans, "2d", 0)
    folder = pl.cache_folder(str(base), "nnUNetPlans_2d", name)
    pl.check_or_write_manifest(folder, {"configuration": "2d", "plans_fingerprint": plans_fingerprint(plans, "2d")})
    images = UnlabeledImageDataset(cases)
    for case in cases:
        data = np.asarray(images.load_case(case)[0][:])
        label = (data[0] > threshold).astype(np.uint8)
        label[:, :, :2] = pl.IGNORE  # a stripe the cache says nothing about
        pl.save_case(folder, case, {"label": label})
    return folder, cases


def test_semisam_learns_from_the_offline_cache_and_its_labels_follow_the_augmented_crop(trained, tmp_path,
                                                                                          monkeypatch):
    """A cache whose label is a known function of the image (a threshold), so that alignment can be checked after
    nnU-Net's spatial augmentation; then SemiSAM trains from it through nnUNetv2_train without any generalist."""
    from nnunet_foundation import pseudo_labels as pl

    env, _ = trained
    threshold = 1.0
    folder, cases = threshold_cache(env, "threshold", threshold)

    for k, v in env.items():
        if k.startswith("nnUNet_") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("nnUNet_ssl_pseudo_labels", "threshold")
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, "nnUNetTrainerSemiSAM_smoke", device=torch.device("cpu"))
    t.on_train_start()
    assert t.generalist is None  # nothing to run: the labels are on disk
    overlap = total = known_fraction = 0.0
    for _ in range(3):  # random crops: pool a few batches so that the object is in them
        batch = next(t.dataloader_unlabeled)
        label, data = batch["pseudo_label"][:, 0], batch["data"][:, 0]
        assert label.shape == data.shape
        known = label != pl.IGNORE
        from_image, from_cache = (data > threshold) & known, (label == 1) & known
        overlap += 2 * float((from_image & from_cache).sum())
        total += float(from_image.sum() + from_cache.sum())
        known_fraction += float(known.float().mean()) / 3
    # crops and transforms match: the cached label covers the thresholded augmented image (Dice, so the background's
    # size does not flatter it; the image is interpolated with splines, the label with nearest neighbours)
    assert known_fraction > 0.5 and total > 0
    assert overlap / total > 0.7, overlap / total
    env_cache = {**env, "nnUNet_ssl_pseudo_labels": "threshold"}
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainerSemiSAM_smoke", "-device", "cpu"],
                   env_cache)
    assert "pseudo-labels from the offline cache" in proc.stdout and "generalist(s), frozen" not in proc.stdout
    checkpoint = torch.load(Path(env["nnUNet_results"]) / "Dataset900_Synthetic" /
                            "nnUNetTrainerSemiSAM_smoke__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    assert all(v > 0 for v in checkpoint["logging"]["sam_loss"])
    # a cache that lacks a case of the fold is refused before training, naming the command that completes it
    os.remove(os.path.join(folder, f"{sorted(cases)[0]}.npz"))
    refused = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 1, "-tr", "nnUNetTrainerSemiSAM_smoke", "-device",
                       "cpu"], env_cache, check=False)
    assert refused.returncode != 0 and "run nnunet-foundation pseudo-label" in refused.stdout + refused.stderr


def test_self_training_learns_the_cached_labels_and_exports_an_ema(trained, monkeypatch):
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.training.settings import SettingsError

    env, _ = trained
    threshold_cache(env, "threshold_self", 1.0)
    for k, v in env.items():
        if k.startswith("nnUNet_") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)
    monkeypatch.delenv("nnUNet_ssl_pseudo_labels", raising=False)
    with pytest.raises(SettingsError, match="nnunet-foundation pseudo-label"):  # no cache named: refused at once
        get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, "nnUNetTrainerSelfTraining_smoke", device=torch.device("cpu"))
    monkeypatch.setenv("nnUNet_ssl_pseudo_labels", "threshold_self")
    t = get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, "nnUNetTrainerSelfTraining_smoke", device=torch.device("cpu"))
    t.on_train_start()
    batch, unlabeled_batch = next(t.dataloader_train), next(t.dataloader_unlabeled)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": unlabeled_batch["data"], "pseudo_label": unlabeled_batch["pseudo_label"]}

    def student_grads(weight, batch_u):
        t.unsup_weight = lambda: weight
        t.optimizer.zero_grad(set_to_none=True)
        parts = t.compute_losses(labeled, batch_u)
        parts.total.backward()
        return [p.grad.detach().clone() for p in t.network.parameters() if p.grad is not None], parts.logs

    g0, _ = student_grads(0.0, unlabeled)
    g1, logs = student_grads(1.0, unlabeled)
    assert float(logs["unsup_loss"]) > 0 and 0.5 < logs["pseudo_coverage"] < 1.0  # the unknown stripe is left out
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1)), "the pseudo-label term must reach the student"
    # voxels the cache knows nothing about teach nothing
    unknown = {**unlabeled, "pseudo_label": torch.full_like(unlabeled["pseudo_label"], pl.IGNORE)}
    g2, logs = student_grads(1.0, unknown)
    assert logs["pseudo_coverage"] == 0.0 and all(torch.allclose(a, b) for a, b in zip(g0, g2))
    assert t.inference_network() is not t.network  # the EMA of the weights is what nnU-Net exports
    # the real command trains from the cache; the term was > 0 in every epoch
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainerSelfTraining_smoke", "-device",
                    "cpu"], {**env, "nnUNet_ssl_pseudo_labels": "threshold_self"})
    assert "Self-training on the pseudo-labels of the offline cache" in proc.stdout
    checkpoint = torch.load(Path(env["nnUNet_results"]) / "Dataset900_Synthetic" /
                            "nnUNetTrainerSelfTraining_smoke__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth",
                            map_location="cpu", weights_only=False)
    assert all(v > 0 for v in checkpoint["logging"]["unsup_loss"])
    assert set(checkpoint["ssl_state"]) >= {"ema_weights"}


def test_generalist_alone_predicts_through_nnunets_export(trained, tmp_path, monkeypatch):
    """`predict-generalist` writes one segmentation per input case in the input's geometry; and a generalist that
    answers with its prompter's own probabilities reproduces nnUNetv2_predict exactly (log-probabilities into
    nnU-Net's export, same preprocessing and resampling: no convention lost on the way)."""
    from types import SimpleNamespace

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_foundation.generalist_prediction import make_prompted_generalist_predictor

    env, checkpoint = trained
    images = Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesTs"
    out = tmp_path / "generalist"
    proc = run_cli(["nnunet-foundation", "predict-generalist", "-d", SYNTHETIC_ID, "-c", "2d", "-tr",
                    "nnUNetTrainer_smoke", "-f", "0", "-i", images, "-o", out, "--generalists",
                    json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint)})], env)
    written = sorted(out.glob("*.nii.gz"))
    assert "2 case(s) segmented by the generalist" in proc.stdout and len(written) == 2
    io = SimpleITKIO()
    for path in written:
        seg, _ = io.read_seg(str(path))
        image, _ = io.read_images([str(images / path.name.replace(".nii.gz", "_0000.nii.gz"))])
        assert seg.shape[1:] == image.shape[1:] and set(np.unique(seg)) <= {0, 1, 2}

    reference = tmp_path / "nnunet"
    run_cli(["nnUNetv2_predict", "-i", images, "-o", reference, "-d", SYNTHETIC_ID, "-c", "2d", "-tr",
             "nnUNetTrainer_smoke", "-f", 0, "-device", "cpu", "--disable_tta", "-npp", 0, "-nps", 0,
             "--disable_progress_bar"], env)
    for k, v in env.items():
        if k.startswith("nnUNet_"):
            monkeypatch.setenv(k, v)
    class Echo:
        device = torch.device("cpu")

        def __call__(self, data, specialist):
            return SimpleNamespace(probabilities=specialist)

    predictor = make_prompted_generalist_predictor(Echo(), use_mirroring=False, perform_everything_on_device=False,
                                                   device=torch.device("cpu"), verbose=False,
                                                   verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / "nnUNetTrainer_smoke__nnUNetPlans__2d"), (0,),
        checkpoint_name="checkpoint_final.pth")
    for path in sorted(reference.glob("*.nii.gz")):
        image, properties = io.read_images([str(images / path.name.replace(".nii.gz", "_0000.nii.gz"))])
        echoed = predictor.predict_single_npy_array(image, properties)
        expected, _ = io.read_seg(str(path))
        assert (echoed == expected[0]).all()
