"""nnUNetTrainerSCSAM: the U-Net's point prompts in SAM's (x, y) frame, both losses and where their gradients go, the
frozen SAM staying bit-identical, and end to end through the real CLIs (tiny SAM checkpoint, CPU): 2d and 3d_fullres
training with the budget variant, --c after a kill, nnUNetv2_predict and predict-sam-student."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("segment_anything")

from conftest import (SYNTHETIC_ID, copy_nnunet_tree, interrupt_then_resume,  # noqa: E402
                      preprocess_unlabeled_cli, run_cli)
from test_synfoc import load  # noqa: E402

SCSAM = "nnUNetTrainerSCSAM_smoke"
# the reference's prompt-token network is 256 channels wide; 8 keeps the CPU tests fast (same architecture)
SMALL_TOKENS = {"nnUNet_ssl_prompt_token_channels": "8"}


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", seed=5)


def tiny_generalist(sam_checkpoint) -> str:
    return json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint)})


def test_points_lie_inside_and_outside_the_region_in_x_y():
    """A non-square slice with an off-centre, non-square region: with (row, col) swapped most points would fall
    outside it (or outside the slice), so this catches the reference's convention bug."""
    from nnunet_foundation.methods.scsam.prompting import sample_points

    h, w = 20, 48
    region = torch.zeros(2, h, w, dtype=torch.bool)
    region[0, 2:7, 30:46] = True  # a wide strip at the top right
    region[1, 15:18, 1:3] = True  # 6 pixels: fewer than 10 positives, so padding follows
    points, labels = sample_points(region, 10, torch.Generator().manual_seed(0))
    assert points.shape == (2, 20, 2) and labels.shape == (2, 20)
    x, y = points[..., 0].long(), points[..., 1].long()
    for i in range(2):
        pos, neg = labels[i] == 1, labels[i] == 0
        assert region[i, y[i, pos], x[i, pos]].all() and not region[i, y[i, neg], x[i, neg]].any()
        assert (x[i] < w).all() and (y[i] < h).all()
    assert labels[0, :10].eq(1).all() and labels[0, 10:].eq(0).all()
    assert labels[1, :6].eq(1).all() and labels[1, 6:10].eq(-1).all() and labels[1, 10:].eq(0).all()
    assert len({(int(a), int(b)) for a, b in points[0, :10]}) == 10  # without replacement
    # points spread over the region, not its first pixels
    assert x[0, :10].min() < 36 and x[0, :10].max() > 40


def test_prompts_reach_sam_in_its_input_frame(sam_checkpoint, monkeypatch):
    """The points SAM's prompt encoder receives are the sampled slice points scaled into the model frame (a 20 x 48
    slice is resized to 27 x 64 for the 64-px tiny SAM: x and y scale alike, y is not stretched to 64)."""
    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.methods.scsam import prompting

    generalist = prompting.add_prompt_tokens(build_generalist(
        {"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint), "lora_rank": 2,
         "train_decoder": True}), num_classes=2, num_tokens=2, channels=8).eval()
    class_map = torch.zeros(1, 20, 48, dtype=torch.long)
    class_map[0, 2:7, 30:46] = 1
    seen = {}
    encoder = generalist.sam.prompt_encoder
    original = encoder._embed_points

    def spy(points, labels, pad):
        seen.update(points=points.clone(), labels=labels.clone(), pad=pad)
        return original(points, labels, pad)

    monkeypatch.setattr(encoder, "_embed_points", spy)
    with torch.no_grad():
        logits = prompting.prompted_slice_logits(generalist, torch.randn(1, 20, 48), class_map, 2, 5)
    assert logits.shape == (1, 2, 20, 48) and not seen["pad"]
    scale = 64 / 48
    slice_xy = seen["points"] / scale  # back to slice pixels
    for c in range(2):  # pair c prompts class c
        pos, neg = seen["labels"][c] == 1, seen["labels"][c] == 0
        xy = slice_xy[c].round().long()
        assert (class_map[0, xy[pos, 1], xy[pos, 0]] == c).all() and (class_map[0, xy[neg, 1], xy[neg, 0]] != c).all()
    assert seen["points"][..., 1].max() < 20 * scale + 1  # rows stay in the resized content, not the padding


@pytest.mark.parametrize("image_channel", ["rgb", 1])
@pytest.mark.parametrize("dimensions", [2, 3])
def test_sam_sees_the_configured_channel_or_the_colour_image_slice_by_slice(sam_checkpoint, monkeypatch,
                                                                            image_channel, dimensions):
    """Endoscopy (SC-SAM's task) is colour: with ``image_channel: "rgb"`` SAM gets channels 0-2 of each slice as one
    colour image, otherwise the one named channel; in 3D every slice along the slicing axis, in slice order."""
    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.methods.scsam import prompting

    generalist = prompting.add_prompt_tokens(build_generalist(
        {"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint), "image_channel": image_channel,
         "axis": 0, "lora_rank": 2, "train_decoder": True}), num_classes=2, num_tokens=2, channels=8).eval()
    shape = (2, 4, 3, 20, 24) if dimensions == 3 else (2, 4, 20, 24)  # 4 channels: R, G, B and one more
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    class_map = (images[:, 0] > 0).long()
    seen = []
    original = generalist._to_model_input
    monkeypatch.setattr(generalist, "_to_model_input", lambda slices, *a: seen.append(slices) or original(slices, *a))
    with torch.no_grad():
        logits = prompting.prompted_patch_logits(generalist, images, class_map, 2, 3)
    assert logits.shape == (images.shape[0], 2, *images.shape[2:])
    slices = images.unsqueeze(2) if dimensions == 2 else images  # (B, C, S, h, w), axis 0
    expected = slices[:, :3] if image_channel == "rgb" else slices[:, image_channel]
    expected = expected.transpose(1, 2).flatten(0, 1) if image_channel == "rgb" else expected.flatten(0, 1)
    (got,) = seen
    assert got.shape == expected.shape and torch.equal(got, expected)


def test_an_rgb_dataset_is_shown_to_sam_in_colour_unless_a_channel_is_set(trainer_factory, sam_checkpoint,
                                                                           monkeypatch):
    monkeypatch.setenv("nnUNet_ssl_generalists", tiny_generalist(sam_checkpoint))
    t = trainer_factory(SCSAM, "2d")
    assert t.sam_config["image_channel"] == 0  # the synthetic dataset is an MRI-like one-channel image
    rgb = {**t.dataset_json, "channel_names": {"0": "R", "1": "G", "2": "B"}}
    t.dataset_json = rgb
    assert t._sam_config()["image_channel"] == "rgb"
    # a channel the user names wins
    monkeypatch.setenv("nnUNet_ssl_generalists", json.dumps({**json.loads(tiny_generalist(sam_checkpoint)),
                                                              "image_channel": 2}))
    t = trainer_factory(SCSAM, "2d")
    t.dataset_json = rgb
    assert t._sam_config()["image_channel"] == 2


def test_litemedsam_is_the_default_and_takes_point_prompts(trainer_factory, monkeypatch):
    """With nothing configured the trainer co-trains the real LiteMedSAM with LoRA, a trainable prompt encoder and
    decoder and prompt tokens (points allowed here, unlike SemiSAM's frozen LiteMedSAM)."""
    monkeypatch.setenv("nnUNet_ssl_prompt_token_channels", "8")
    t = trainer_factory(SCSAM, "2d")
    assert t.sam_config["backend"] == "litemedsam" and t.sam_config["train_decoder"]
    t.initialize()
    trainable = {n.split(".")[0] if n.startswith("prompt_tokens") else ".".join(n.split(".")[:2])
                 for n, p in t.sam.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_tokens", "sam.image_encoder", "sam.prompt_encoder", "sam.mask_decoder"}
    assert all(".lora_" in n for n, p in t.sam.named_parameters() if p.requires_grad and "image_encoder" in n)
    with torch.no_grad():  # one prompted slice through the real model: K logit maps on the slice's grid
        logits = t.sam_logits(torch.randn(1, 1, 32, 40), torch.randint(0, 3, (1, 32, 40)))
    assert logits.shape == (1, 3, 32, 40) and torch.isfinite(logits).all()


def test_each_loss_reaches_its_own_model_and_the_frozen_sam_stays(trainer_factory, sam_checkpoint, monkeypatch):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    monkeypatch.setenv("nnUNet_ssl_generalists", tiny_generalist(sam_checkpoint))
    monkeypatch.setenv("nnUNet_ssl_prompt_token_channels", "8")
    t = trainer_factory(SCSAM, "2d")
    t.on_train_start()
    t.on_train_epoch_start()
    batch, unlabeled = next(t.dataloader_train), next(t.dataloader_unlabeled)
    labeled = {"data": batch["data"], "target": batch["target"]}
    terms = t.scsam_terms(labeled, {"data": unlabeled["data"]})
    unet_params = [p for p in t.network.parameters() if p.requires_grad]
    sam_params = t.sam.trainable_parameters()
    for name in ("unet_supervised", "unet_pseudo", "entropy", "sam_supervised", "sam_pseudo"):
        assert terms[name] > 0, name
        own, other = (unet_params, sam_params) if name.startswith(("unet", "entropy")) else (sam_params, unet_params)
        grads = torch.autograd.grad(terms[name], own + other, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads[:len(own)]), name
        assert all(g is None or g.abs().sum() == 0 for g in grads[len(own):]), name
    # the pseudo-labels are the other model's argmax on the unlabeled patches
    assert terms["unet_argmax"].shape[0] == batch["data"].shape[0] + unlabeled["data"].shape[0]

    # through the trainer's own steps: frozen SAM tensors bit-identical, adapted ones and nnU-Net moved; SAM's
    # learning rate decays linearly per step
    adapted = {n for n, _ in t.sam.named_parameters() if t.sam.is_trainable_parameter(n)}
    before = {n: v.clone() for n, v in t.sam.state_dict().items()}
    before_unet = {n: v.clone() for n, v in t.network.state_dict().items()}
    lr0 = t.optimizer_sam.param_groups[0]["lr"]
    for _ in range(2):
        logs = t.train_step(next(t.dataloader_train))
    assert logs["sam_loss"] > 0 and logs["unsup_loss"] > 0 and 0 <= logs["agreement"] <= 1
    after = t.sam.state_dict()
    frozen = [n for n in before if n not in adapted and not n.startswith("prompt_tokens")]  # BN stats learn
    assert any(n.startswith("sam.image_encoder.") for n in frozen)
    assert [n for n in frozen if not torch.equal(before[n], after[n])] == []
    moved = {n for n in adapted if not torch.equal(before[n], after[n])}
    for part in (".lora_b", "prompt_tokens.", "sam.mask_decoder.", "sam.prompt_encoder."):
        assert any(part in n for n in moved), part
    assert any(not torch.equal(before_unet[n], v) for n, v in t.network.state_dict().items())
    assert t.optimizer_sam.param_groups[0]["lr"] == pytest.approx(lr0 * (1 - 2 / t.total_iterations))


def test_lora_rank_0_keeps_the_whole_image_encoder_frozen(trainer_factory, sam_checkpoint, monkeypatch):
    """The CPU polyp study's variant (no backward through the encoder): nothing of the encoder learns, SAM's
    prompt encoder, decoder and tokens still do, and SAM's loss still reaches them."""
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    monkeypatch.setenv("nnUNet_ssl_generalists", tiny_generalist(sam_checkpoint))
    monkeypatch.setenv("nnUNet_ssl_prompt_token_channels", "8")
    monkeypatch.setenv("nnUNet_ssl_lora_rank", "0")
    t = trainer_factory(SCSAM, "2d")
    t.on_train_start()
    t.on_train_epoch_start()
    assert not any(".lora_" in n for n, _ in t.sam.named_parameters())
    encoder = {n: v.clone() for n, v in t.sam.state_dict().items() if n.startswith("sam.image_encoder.")}
    decoder = {n: v.clone() for n, v in t.sam.state_dict().items() if n.startswith("sam.mask_decoder.")}
    assert encoder and not any(p.requires_grad for n, p in t.sam.named_parameters() if "image_encoder" in n)
    logs = t.train_step(next(t.dataloader_train))
    assert logs["sam_loss"] > 0
    after = t.sam.state_dict()
    assert all(torch.equal(v, after[n]) for n, v in encoder.items())
    assert any(not torch.equal(v, after[n]) for n, v in decoder.items())


@pytest.mark.e2e
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_scsam_trains_predicts_and_resumes(synthetic_dataset, sam_checkpoint, tmp_path, configuration):
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, (configuration,))
    env.update(SMALL_TOKENS, nnUNet_ssl_generalists=tiny_generalist(sam_checkpoint))
    train = ["nnUNetv2_train", SYNTHETIC_ID, configuration, 0, "-tr", SCSAM, "-device", "cpu"]
    out = Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / f"{SCSAM}__nnUNetPlans__{configuration}" / "fold_0"
    # kill + --c and stock prediction are the engine's, the same in 2d and 3d: checked once, in 2d (CI time);
    # 3d_fullres checks what differs there, SAM slice-wise in training and in predict-sam-student
    resume = configuration == "2d"
    if resume:
        interrupted, final = interrupt_then_resume(train, env, out)
    else:
        run_cli(train, env)
        final = load(out / "checkpoint_final.pth")
    ssl = final["ssl_state"]
    assert final["current_epoch"] == 2 and ssl["iteration"] == 8
    assert ssl["sam_network"] == "specialist_prompted"
    assert all(v > 0 for v in final["logging"]["sam_loss"]) and all(v > 0 for v in final["logging"]["unsup_loss"])
    names = list(ssl["sam_student"])
    assert names and all(".lora_" in n or n.startswith(("sam.prompt_encoder.", "sam.mask_decoder.",
                                                         "prompt_tokens.")) for n in names)
    if resume:
        moved = [n for n in names
                 if not torch.equal(ssl["sam_student"][n], interrupted["ssl_state"]["sam_student"][n])]
        assert moved  # SAM kept learning after the resume
    # the SAM's optimiser state came back with --c (Adam's step count continued from the interrupted run)
    steps = [s["step"] for s in ssl["extra_optimizer_states"][0]["state"].values()]
    assert steps and all(float(s) == 8 for s in steps)

    images = Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesTs"
    env_predict = {k: v for k, v in env.items() if not k.startswith("nnUNet_ssl_")}
    pred, sam_pred = tmp_path / "pred", tmp_path / "pred_sam"
    run_cli(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", SYNTHETIC_ID, "-c", configuration, "-tr", SCSAM,
             "-f", 0, "-device", "cpu", "--disable_progress_bar", "-npp", 0, "-nps", 0], env_predict)
    proc = run_cli(["nnunet-foundation", "predict-sam-student", "-i", images, "-o", sam_pred, "-d", SYNTHETIC_ID,
                    "-c", configuration, "-tr", SCSAM, "-f", 0, "-device", "cpu", "-npp", 1, "-nps", 1], env_predict)
    assert "2 case(s) segmented by the SAM student" in proc.stdout
    import SimpleITK as sitk

    labels = set(json.loads((Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "dataset.json").read_text())
                 ["labels"].values())
    cases = sorted(pred.glob("*.nii.gz"))
    assert len(cases) == 2
    for case in cases:
        ours, reference = sitk.ReadImage(str(sam_pred / case.name)), sitk.ReadImage(str(case))
        assert ours.GetSize() == reference.GetSize() and ours.GetSpacing() == reference.GetSpacing()
        assert set(sitk.GetArrayFromImage(ours).ravel().tolist()) <= labels
    proc = run_cli(["nnunet-foundation", "predict-sam-student", "-i", images, "-o", tmp_path / "t", "-d",
                    SYNTHETIC_ID, "-c", configuration, "-tr", SCSAM, "-device", "cpu", "--teacher"], env_predict,
                   check=False)
    assert proc.returncode == 2 and "no EMA teacher" in proc.stderr


def test_sam_network_prompts_sam_with_the_folds_nnunet(sam_checkpoint):
    """What nnU-Net's predictor runs: the fold's nnU-Net argmax prompts the fold's SAM; load_state_dict swaps both."""
    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.foundation.lora import adaptable_state_dict
    from nnunet_foundation.methods.scsam.prompting import add_prompt_tokens, prompted_patch_logits
    from nnunet_foundation.methods.scsam.sam_network import PREDICTION_SEED, SpecialistPromptedSAMNetwork

    generalist = add_prompt_tokens(build_generalist(
        {"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint), "lora_rank": 2,
         "train_decoder": True}), 2, 2, 8)
    specialist = torch.nn.Conv2d(1, 2, 1)
    network = SpecialistPromptedSAMNetwork(generalist, specialist, 2, 5).eval()
    x = torch.randn(2, 1, 24, 24)
    with torch.no_grad():
        out = network(x)
        expected = prompted_patch_logits(generalist, x, specialist(x).argmax(1), 2, 5,
                                         torch.Generator().manual_seed(PREDICTION_SEED))
        assert torch.equal(out, expected)
        state = {"sam": {n: v + 0.05 for n, v in adaptable_state_dict(generalist).items()},
                 "specialist": {n: -v for n, v in specialist.state_dict().items()}}
        network.load_state_dict(state)
        assert torch.equal(specialist.weight, state["specialist"]["weight"])
        assert not torch.allclose(network(x), out)
    with pytest.raises(ValueError, match="missing keys"):
        network.load_state_dict({"sam": {}, "specialist": specialist.state_dict()})
