"""SFR (stitching, fine-tuning, re-training): the native-size mosaics round-trip exactly and lose no slice; fine-tuning
lowers its loss on a tiny generated set, moves only LoRA/decoder/head tensors and resumes exactly; SFR+ moves the
confident cases; nnUNetTrainerSFR refuses to start without a fine-tuned generalist, its pseudo-label term reaches the
student (online and from the offline cache); and end to end through the real CLIs (tiny SAM checkpoint, CPU, 2d):
``nnunet-foundation sfr`` (killed and resumed), ``nnUNetv2_train -tr nnUNetTrainerSFR_smoke``, its --c (in process)
and ``nnUNetv2_predict``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli  # noqa: E402
from test_synfoc import load  # noqa: E402

SFR = "nnUNetTrainerSFR_smoke"


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", seed=7)


def tiny_config(sam_checkpoint, num_classes=2) -> dict:
    from nnunet_foundation.foundation.config import GeneralistConfig

    config = GeneralistConfig.from_dict({"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint),
                                         "axis": 0}).to_dict()
    return {**config, "lora_rank": 4, "lora_alpha": 4.0, "train_decoder": True, "multiclass_head": True,
            "num_classes": num_classes}


# ------------------------------------------------------------------------------------------------ stitching
@pytest.mark.parametrize("hw,slices", [((13, 21), 37), ((7, 9), 5), ((64, 64), 3), ((33, 5), 40)])
def test_stitching_round_trip_is_exact_and_keeps_every_slice(hw, slices):
    from nnunet_foundation.foundation.geometry import mosaic_layout, stitch_native, unstitch_native
    from nnunet_foundation.methods.sfr.stitching import IGNORE

    layout = mosaic_layout(slices, hw, 64)
    assert layout.content_hw == hw and layout.rows == 64 // hw[0] and layout.cols == 64 // hw[1]
    # more slices than cells: consecutive sub-volumes, one mosaic each, none dropped
    assert layout.num_mosaics == -(-slices // (layout.rows * layout.cols))
    x = torch.randn(slices, 3, *hw)
    mosaics = stitch_native(x, layout, pad_value=0.0)
    assert mosaics.shape == (layout.num_mosaics, 3, 64, 64)
    assert torch.equal(unstitch_native(mosaics, layout), x)
    # each slice is findable by its own value, exactly once; the padding is everything else
    ids = torch.arange(1, slices + 1).view(-1, 1, 1, 1).expand(-1, 1, *hw)
    labels = stitch_native(ids, layout, pad_value=IGNORE, labels=True)
    counts = torch.bincount(labels.flatten(), minlength=IGNORE + 1)
    assert (counts[1:slices + 1] == hw[0] * hw[1]).all()
    assert int(layout.content_mask().sum()) == slices * hw[0] * hw[1] == int((labels != IGNORE).sum())
    assert torch.equal(unstitch_native(labels, layout, labels=True), ids)


def test_patches_to_slices_and_back_for_every_axis():
    from nnunet_foundation.methods.sfr.stitching import patch_slices, slices_to_patches

    x = torch.randn(2, 2, 5, 7, 9)
    for axis in (0, 1, 2):
        s = patch_slices(x, axis, channel=1)
        assert s.shape[0] == 2 * x.shape[2 + axis]
        assert torch.equal(slices_to_patches(s[:, None], 2, axis, False)[:, 0], x[:, 1])
    x2 = torch.randn(3, 1, 7, 9)
    assert torch.equal(slices_to_patches(patch_slices(x2, 0)[:, None], 3, 0, True), x2)


def test_3d_patches_go_through_mosaics_along_the_slicing_axis(sam_checkpoint):
    """3d_fullres: every slice along the axis is segmented (several mosaics for a deep patch) and lands back in
    place."""
    from nnunet_foundation.methods.sfr.fine_tune import build_sfr_generalist
    from nnunet_foundation.methods.sfr.stitching import stitched_patch_logits, stitched_slice_logits

    g = build_sfr_generalist(tiny_config(sam_checkpoint, num_classes=3))
    x = torch.randn(2, 1, 9, 11, 30)  # along W: 30 slices of 9 x 11 per patch, 42 cells per 64-px mosaic
    with torch.no_grad():
        out = stitched_patch_logits(g, x, axis=2)
        reference = stitched_slice_logits(g, x[:, 0].permute(0, 3, 1, 2).reshape(60, 9, 11))
    assert out.shape == (2, 3, 9, 11, 30)
    torch.testing.assert_close(out.permute(0, 4, 1, 2, 3).reshape(60, 3, 9, 11), reference)


def test_whole_slices_are_tiled_at_the_training_scale(sam_checkpoint):
    """Slices larger than the patch are cut into patch-sized tiles (not shrunk), the last ones padded by replication;
    each tile's logits land back where the tile came from."""
    import torch.nn.functional as F

    from nnunet_foundation.methods.sfr.fine_tune import build_sfr_generalist
    from nnunet_foundation.methods.sfr.stitching import stitched_slice_logits, tiled_slice_logits

    g = build_sfr_generalist(tiny_config(sam_checkpoint))
    slices = torch.randn(2, 40, 30)
    padded = F.pad(slices, (0, 2, 0, 0), mode="replicate")  # 30 -> 32 = 2 tiles of 16
    tiles = [padded[i, y:y + 20, x:x + 16] for i in range(2) for y in (0, 20) for x in (0, 16)]
    with torch.no_grad():
        tiled = tiled_slice_logits(g, slices, (20, 16))
        expected = stitched_slice_logits(g, torch.stack(tiles))
    assert tiled.shape == (2, 2, 40, 30)
    k = 0
    for i in range(2):
        for y in (0, 20):
            for x in (0, 16):
                torch.testing.assert_close(tiled[i, :, y:y + 20, x:x + 16], expected[k][..., :min(16, 30 - x)])
                k += 1


def test_colour_images_go_through_the_mosaics_as_colour_slices(sam_checkpoint):
    """An R, G, B dataset (endoscopy) with ``image_channel: "rgb"``: slices keep their three channels from the patch
    through the whole-slice tiling into the mosaics, in slice order, and the logits land back in place."""
    from nnunet_foundation.foundation.config import RGB
    from nnunet_foundation.methods.sfr.fine_tune import build_sfr_generalist, predict_case
    from nnunet_foundation.methods.sfr.stitching import (patch_slices, stitched_patch_logits, stitched_slice_logits,
                                                         tiled_slice_logits)

    x3 = torch.randn(2, 4, 5, 7, 9)  # R, G, B and a fourth channel
    for axis in (0, 1, 2):
        s = patch_slices(x3, axis, RGB)
        moved = x3[:, :3].movedim(2 + axis, 1)  # (B, S, 3, h, w)
        assert torch.equal(s, moved.reshape(-1, 3, *moved.shape[-2:]))
    x2 = torch.randn(3, 4, 7, 9)
    assert torch.equal(patch_slices(x2, 0, RGB), x2[:, :3])

    g = build_sfr_generalist({**tiny_config(sam_checkpoint), "image_channel": "rgb"})
    seen = []
    encode = g.encode
    g.encode = lambda mosaics: seen.append(mosaics) or encode(mosaics)
    with torch.no_grad():
        out = stitched_patch_logits(g, x2, axis=0, channel=RGB)
        grey = stitched_patch_logits(g, x2, axis=0, channel=0)
    assert out.shape == (3, 2, 7, 9) and not torch.allclose(out, grey)  # the colour reached the encoder
    # the first slice's tile, back in 0-255 units: three different channels in colour, one replicated in grey
    mean, std = g.sam.pixel_mean.view(3, 1, 1), g.sam.pixel_std.view(3, 1, 1)
    colour_tile, grey_tile = (m[0, :, :7, :9] * std + mean for m in seen)
    assert not torch.allclose(colour_tile[0], colour_tile[1], atol=1.0)
    torch.testing.assert_close(grey_tile[0], grey_tile[1], atol=1e-3, rtol=0)

    slices = torch.randn(2, 3, 40, 30)  # whole colour slices, tiled at the patch size (30 -> 32 = 2 tiles of 16)
    padded = torch.nn.functional.pad(slices, (0, 2, 0, 0), mode="replicate")
    tiles = [padded[i, :, y:y + 20, x:x + 16] for i in range(2) for y in (0, 20) for x in (0, 16)]
    with torch.no_grad():
        tiled = tiled_slice_logits(g, slices, (20, 16))
        expected = stitched_slice_logits(g, torch.stack(tiles))
        case = predict_case(g, np.random.default_rng(0).normal(size=(4, 6, 40, 30)).astype(np.float32), 0, RGB,
                            (20, 16))
    assert tiled.shape == (2, 2, 40, 30) and case.shape == (2, 6, 40, 30)
    torch.testing.assert_close(tiled[0, :, :20, :16], expected[0])
    torch.testing.assert_close(tiled[1, :, 20:, 16:], expected[7][..., :14])


@pytest.mark.parametrize("is_2d", [True, False])
def test_sampler_crops_colour_slices_with_their_labels(is_2d):
    from nnunet_foundation.foundation.config import RGB
    from nnunet_foundation.methods.sfr.fine_tune import LabeledPatchSampler

    cases = []
    for image, label in tiny_cases():  # channel c holds 10 c + the grey image, so each channel is recognisable
        cases.append((np.concatenate([image + 10 * c for c in range(3)]), label))
    patch = (12, 12) if is_2d else (4, 12, 12)
    images, labels = LabeledPatchSampler(cases, patch, 0, is_2d, RGB, 64, seed=2).sample(2)
    assert images.ndim == 4 and images.shape[1] == 3 and labels.shape == (images.shape[0], 12, 12)
    assert labels.dtype == torch.long and (labels == 1).any()
    inside = labels != 255  # padding is 0 in every channel
    for c in range(1, 3):  # the channels of one pixel stay together: G - R = 10, B - R = 20
        assert torch.allclose((images[:, c] - images[:, 0])[inside], torch.full_like(images[:, 0][inside], 10.0 * c))


def test_an_rgb_dataset_is_fine_tuned_in_colour_unless_a_channel_is_named(sam_checkpoint):
    from types import SimpleNamespace

    from nnunet_foundation.methods.sfr.fine_tune import sfr_generalist_config

    plan = SimpleNamespace(patch_size=[64, 64], spacing=[1.0, 1.0])
    rgb = {"channel_names": {"0": "R", "1": "G", "2": "B"}}
    tiny = {"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint)}
    assert sfr_generalist_config(json.dumps(tiny), "SFR", plan, 2, dataset_json=rgb)["image_channel"] == "rgb"
    assert sfr_generalist_config(json.dumps(tiny), "SFR", plan, 2, dataset_json={"channel_names": {"0": "MRI"}}
                                 )["image_channel"] == 0
    named = json.dumps({**tiny, "image_channel": 1})
    assert sfr_generalist_config(named, "SFR", plan, 2, dataset_json=rgb)["image_channel"] == 1


# ------------------------------------------------------------------------------------------------ fine-tuning
def tiny_cases(n=3, seed=0):
    """Generated volumes (1, 6, 14, 18) with one bright box (label 1) each."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        label = np.zeros((6, 14, 18), dtype=np.int64)
        z, y, x = rng.integers(0, 3), rng.integers(1, 7), rng.integers(1, 9)
        label[z:z + 3, y:y + 6, x:x + 8] = 1
        image = (label * 2.0 + rng.normal(0, 0.3, label.shape)).astype(np.float32)[None]
        cases.append((image, label))
    return cases


def test_fine_tuning_lowers_the_loss_and_moves_only_adapted_tensors(sam_checkpoint):
    from nnunet_foundation.methods.sfr.fine_tune import LabeledPatchSampler, build_sfr_generalist, fine_tune

    g = build_sfr_generalist(tiny_config(sam_checkpoint))
    adapted = {n for n, _ in g.named_parameters() if g.is_trainable_parameter(n)}
    assert adapted and all(".lora_" in n or n.startswith(("sam.prompt_encoder.", "sam.mask_decoder.",
                                                          "multiclass_head.")) for n in adapted)
    before = {n: v.clone() for n, v in g.state_dict().items()}
    sampler = LabeledPatchSampler(tiny_cases(), (6, 14, 18), 0, False, 0, g.img_size, seed=0)
    # batch 1 and a higher learning rate than SFR's 1e-3 keep this short on a CPU
    losses = fine_tune(g, sampler, iterations=16, batch_size=1, lr=3e-3, progress=lambda _: None)
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.92 * np.mean(losses[:4])
    after = g.state_dict()
    frozen = [n for n in before if n not in adapted]
    assert any(n.startswith("sam.image_encoder.") for n in frozen)
    assert [n for n in frozen if not torch.equal(before[n], after[n])] == []
    moved = {n for n in adapted if not torch.equal(before[n], after[n])}
    # the prompt-free forward uses the head (SAM's decoder with K outputs) and the prompt encoder's "no prompt"
    # embeddings; SAM's own single-mask decoder is trainable but never on that path
    for part in (".lora_b_q", ".lora_b_v", "sam.prompt_encoder.", "multiclass_head."):
        assert any(part in n for n in moved), part
    assert not g.training and all(not m.training for m in g.modules())


def test_fine_tuning_resumes_exactly(sam_checkpoint):
    from nnunet_foundation.foundation.lora import adaptable_state_dict
    from nnunet_foundation.methods.sfr.fine_tune import LabeledPatchSampler, build_sfr_generalist, fine_tune

    def run(resume=None, stop_at=None):
        g = build_sfr_generalist(tiny_config(sam_checkpoint))
        sampler = LabeledPatchSampler(tiny_cases(), (6, 14, 18), 0, False, 0, g.img_size, seed=3)
        saved = {}

        def save(state):
            saved["state"] = state
            if state["iteration"] == stop_at:
                raise KeyboardInterrupt  # a kill right after a save

        try:
            fine_tune(g, sampler, iterations=6, batch_size=1, save=save, save_every=2, resume=resume,
                      progress=lambda _: None)
        except KeyboardInterrupt:
            pass
        return adaptable_state_dict(g), saved["state"]

    straight, _ = run()
    _, interrupted = run(stop_at=2)
    assert interrupted["iteration"] == 2
    resumed, final_state = run(resume=interrupted)
    assert final_state["iteration"] == 6 and len(final_state["losses"]) == 6
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_sampler_2d_fills_mosaics_and_marks_padding(sam_checkpoint):
    from nnunet_foundation.methods.sfr.fine_tune import LabeledPatchSampler
    from nnunet_foundation.methods.sfr.stitching import IGNORE

    # 2d patch larger than the slices: padded with IGNORE; 64 // 20 = 3 x 3 patches per mosaic
    sampler = LabeledPatchSampler(tiny_cases(), (20, 20), 0, True, 0, 64, seed=1)
    images, labels = sampler.sample(2)
    assert images.shape == labels.shape == (18, 20, 20)
    assert (labels == IGNORE).any() and (labels == 1).any()


# ------------------------------------------------------------------------------------------------ trainer + CLIs
def tiny_generalist_json(sam_checkpoint) -> str:
    return json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint)})


def refusal(env) -> str:
    """The error nnUNetv2_train gets when it builds the trainer (nnU-Net's own get_trainer_from_args, in this
    process: the same constructor without paying another interpreter start-up)."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_foundation.methods.sfr.fine_tune import SFRError

    saved = {k: os.environ.get(k) for k in env if k.startswith("nnUNet_")}
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet_")})
    try:  # nnU-Net reads its folders from the environment when it uses them
        with pytest.raises(SFRError) as error:
            get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, SFR, device=torch.device("cpu"))
        return str(error.value)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def sfr_tree(synthetic_dataset, sam_checkpoint, tmp_path_factory):
    """A dataset copy with preprocessed unlabeled 2d cases and a finished SFR+ fine-tuning of fold 0 (tiny SAM),
    made through the real CLI: killed after its first save, then resumed, plus the offline pseudo-label cache."""
    root = tmp_path_factory.mktemp("sfr_tree")
    env = copy_nnunet_tree(synthetic_dataset, root)
    preprocess_unlabeled_cli(env, ("2d",))
    refused = refusal(env)  # first, while there is no fine-tuned generalist yet
    folder = Path(env["nnUNet_results"]) / SYNTHETIC_NAME / "SFR_generalist__nnUNetPlans__2d" / "fold_0"
    command = ["nnunet-foundation", "sfr", "-d", SYNTHETIC_ID, "-c", "2d", "-f", 0, "--generalists",
               tiny_generalist_json(sam_checkpoint), "--iterations", 4, "--save-every", 2, "--plus",
               "--plus-threshold", 0.0]
    from conftest import BIN

    # killed (the whole process group, like a lost job) as soon as its first resumable state is saved
    proc = subprocess.Popen([str(BIN / command[0]), *map(str, command[1:])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (folder / "fine_tuning_state.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_output = proc.communicate()[0]
    resumed = run_cli(command, env)
    rerun = run_cli(command + ["--pseudo-labels"], env)  # finished: only the offline cache is written
    return {"env": env, "folder": folder, "refused": refused, "killed": killed_output, "resumed": resumed,
            "rerun": rerun}


@pytest.mark.e2e
def test_trainer_refuses_to_start_without_a_fine_tuned_generalist(sfr_tree):
    refused = sfr_tree["refused"]
    assert f"nnunet-foundation sfr -d {SYNTHETIC_NAME} -c 2d -f 0" in refused and "does not exist" in refused


@pytest.mark.e2e
def test_sfr_cli_resumes_and_sfr_plus_moves_cases(sfr_tree):
    folder, resumed = sfr_tree["folder"], sfr_tree["resumed"]
    assert "finished" not in json.dumps(sfr_tree["killed"]) or "resuming" in resumed.stdout
    assert "SFR round 1: resuming at iteration" in resumed.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["finished"] and manifest["rounds"] == 2
    unlabeled = sorted(p.name[:-len("_0000.nii.gz")] for p in
                       (Path(sfr_tree["env"]["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesUnlabeled").glob("*.nii.gz"))
    # threshold 0: every unlabeled case is confident enough and joins round 2 with its label map
    assert manifest["sfr_plus_moved"] == unlabeled
    assert sorted(p.stem for p in (folder / "sfr_plus_labels").glob("*.npz")) == unlabeled
    assert "SFR round 2 (SFR+): iteration 4/4" in resumed.stdout
    final = torch.load(folder / "generalist_final.pth", map_location="cpu", weights_only=True)
    assert set(final["adapted"]) == set(manifest["trainable_tensors"])
    assert all(".lora_" in n or n.startswith(("sam.prompt_encoder.", "sam.mask_decoder.", "multiclass_head."))
               for n in final["adapted"])
    rerun = sfr_tree["rerun"].stdout
    assert "nothing to fine-tune" in rerun and "SFR round" not in rerun and "pseudo-labelled synthetic_u003" in rerun


def test_sfr_plus_moves_exactly_the_confident_cases(sam_checkpoint, tmp_path):
    """Real per-case confidences of a generalist; the threshold between them splits the cases."""
    from nnunet_foundation.methods.sfr import fine_tune as ft
    from nnunet_foundation.cli.sfr import sfr_plus_selection

    g = ft.build_sfr_generalist(tiny_config(sam_checkpoint))
    folder = tmp_path / "unlabeled"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, level in enumerate((0.1, 1.0, 5.0)):  # different contrast -> different confidence
        np.save(folder / f"case{i}.npy", (rng.normal(0, level, (1, 3, 20, 24))).astype(np.float32))
    unlabeled = {f"case{i}": str(folder) for i in range(3)}
    from nnunet_foundation.unlabeled import UnlabeledImageDataset

    images = UnlabeledImageDataset(unlabeled)
    confidence = {c: ft.mean_max_softmax(ft.predict_case(g, images.load_case(c)[0][:], 0, 0, (20, 24)))
                  for c in unlabeled}
    assert len(set(confidence.values())) == 3
    threshold = sorted(confidence.values())[1]
    moved = sfr_plus_selection(g, unlabeled, str(tmp_path / "sfr"), 0, 0, (20, 24), threshold)
    assert moved == sorted(c for c, v in confidence.items() if v >= threshold) and len(moved) == 2
    record = json.loads((tmp_path / "sfr" / ft.CONFIDENCE_FILE).read_text())
    assert record["complete"] and all(abs(record["confidence"][c] - confidence[c]) < 1e-6 for c in unlabeled)
    for case in moved:
        with np.load(tmp_path / "sfr" / ft.PLUS_LABELS / f"{case}.npz") as npz:
            expected = ft.predict_case(g, images.load_case(case)[0][:], 0, 0, (20, 24)).argmax(0).numpy()
            assert np.array_equal(npz["label"], expected)


@pytest.mark.e2e
@pytest.mark.parametrize("source", ["online", "cache"])
def test_pseudo_label_term_reaches_the_student(sfr_tree, source, monkeypatch):
    from nnunet_foundation.methods.sfr.trainer import nnUNetTrainerSFR  # noqa: F401

    env = sfr_tree["env"]
    for k, v in env.items():
        if k.startswith("nnUNet_") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)
    if source == "cache":
        monkeypatch.setenv("nnUNet_ssl_pseudo_labels", "SFR__nnUNetPlans__fold0")
    from nnunetv2.run.run_training import get_trainer_from_args

    t = get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, SFR, device=torch.device("cpu"))
    t.on_train_start()  # single-threaded loaders (nnUNet_n_proc_DA=0): nothing to stop afterwards
    try:
        assert (t.generalist is None) == (source == "cache")
        if t.generalist is not None:
            assert not any(p.requires_grad for p in t.generalist.parameters())
        t.on_train_epoch_start()
        unlabeled_batch = next(t.dataloader_unlabeled)
        unlabeled = {"data": unlabeled_batch["data"]}
        if source == "cache":
            unlabeled["pseudo_label"] = unlabeled_batch["pseudo_label"]
        out_u = t.as_list(t.network(unlabeled["data"]))
        mt_only, _ = super(nnUNetTrainerSFR, t).unsupervised_loss(out_u, unlabeled)
        loss, logs = t.unsupervised_loss(out_u, unlabeled)
        assert logs["sfr_loss"] > 0 and logs["sfr_weight"] == 1.0
        term = loss - mt_only
        params = [p for p in t.network.parameters() if p.requires_grad]
        grads = torch.autograd.grad(term, params, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads)
        if source == "online":  # the labels are the generalist's argmax of the same patches
            expected = t.online_pseudo_label(unlabeled["data"])
            assert expected.shape == unlabeled["data"][:, 0].shape
    finally:  # no on_train_end: it would write a checkpoint_final that the CLI test's --c would pick up
        import shutil

        shutil.rmtree(t.output_folder, ignore_errors=True)


@pytest.mark.e2e
def test_sfr_trains_resumes_and_predicts(sfr_tree, tmp_path, monkeypatch):
    env = sfr_tree["env"]
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", SFR, "-device", "cpu"], env)
    out = Path(env["nnUNet_results"]) / SYNTHETIC_NAME / f"{SFR}__nnUNetPlans__2d" / "fold_0"
    final = load(out / "checkpoint_final.pth")
    manifest_file = sfr_tree["folder"] / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert final["current_epoch"] == 2 and final["ssl_state"]["iteration"] == 8
    assert final["ssl_state"]["sfr_generalist_sha256"] == manifest["final_sha256"]
    assert all(v > 0 for v in final["logging"]["sfr_loss"])
    assert not any("generalist" in k or "sam." in k for k in final["network_weights"])

    # --c: what nnUNetv2_train --c runs (nnU-Net's get_trainer_from_args and load_checkpoint, in this process; the
    # engine's kill-and-resume through the CLI is tested in test_engine_e2e.py): the run continues with the same
    # fine-tuned generalist, and is refused once that generalist was replaced
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunet_foundation.methods.sfr.fine_tune import SFRError

    for k, v in env.items():
        if k.startswith("nnUNet_") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)
    resumed = get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, SFR, continue_training=True,
                                    device=torch.device("cpu"))
    resumed.load_checkpoint(str(out / "checkpoint_final.pth"))
    assert resumed.ssl_iteration == 8 and resumed.generalist is not None
    try:
        manifest_file.write_text(json.dumps({**manifest, "final_sha256": "0" * 64}))
        replaced = get_trainer_from_args(str(SYNTHETIC_ID), "2d", 0, SFR, continue_training=True,
                                         device=torch.device("cpu"))
        with pytest.raises(SFRError, match="Refusing to resume"):
            replaced.load_checkpoint(str(out / "checkpoint_final.pth"))
    finally:
        manifest_file.write_text(json.dumps(manifest))

    images = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesTs"
    pred = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", SYNTHETIC_ID, "-c", "2d", "-tr", SFR, "-f", 0,
             "-device", "cpu", "--disable_progress_bar", "-npp", 0, "-nps", 0], env)
    assert len(list(pred.glob("*.nii.gz"))) == 2
