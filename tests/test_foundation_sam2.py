"""The SAM2 generalists (image mode and video propagation) with the real ``sam2`` modules: tiny, randomly initialised
models saved and loaded as real checkpoint files, prompts from a specialist softmax, checked against SAM2's own
``SAM2ImagePredictor`` and ``SAM2VideoPredictor.init_state``."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sam2")

from nnunet_foundation.foundation.checkpoints import CheckpointError  # noqa: E402
from nnunet_foundation.foundation.config import (GeneralistConfigError, MissingBackendError,  # noqa: E402
                                                 build_generalist)
from nnunet_foundation.foundation.geometry import min_max_scale  # noqa: E402
from nnunet_foundation.foundation.prompts import PromptSettings, SlicePrompt, generate_prompts  # noqa: E402
from nnunet_foundation.foundation.sam2_backend import (SAM2ImageGeneralist, SAM2VideoGeneralist,  # noqa: E402
                                                       _is_sam2_0_checkpoint, to_sam2_frames)
from nnunet_foundation.foundation.tiny import save_tiny_sam2_checkpoint  # noqa: E402

B, K, D, H, W = 2, 3, 6, 20, 24


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    return save_tiny_sam2_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam2.pt", seed=0)


def specialist(batch=B):
    """A softmax with a confident class-1 blob on slices 2-3 of item 0 and a class-2 blob on slices 1-2 of item 1
    (class 2 absent in item 0, class 1 absent in item 1)."""
    probs = torch.zeros(batch, K, D, H, W)
    probs[:, 0] = 1.0
    probs[0, :, 2:4, 5:10, 5:12] = torch.tensor([0.02, 0.97, 0.01]).view(K, 1, 1, 1)
    if batch > 1:
        probs[1, :, 1:3, 8:15, 10:20] = torch.tensor([0.05, 0.0, 0.95]).view(K, 1, 1, 1)
    return probs


def images(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, D, H, W, generator=g) * 3 + 1  # nnU-Net z-scored intensities


def build(checkpoint, backend="sam2", **settings):
    return build_generalist({"backend": backend, "model_type": "tiny", "checkpoint": str(checkpoint), **settings})


def sees_the_object(generalist):
    """A random model's object-score head decides at random whether the tracked object is present on a frame (and
    SAM2 blanks the frames where it is not). Shifting the head's output makes the tiny model always see it, so that
    the propagation checks do not depend on the luck of a random initialisation."""
    with torch.no_grad():
        generalist.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.add_(20.0)
    return generalist


# ------------------------------------------------------------------------------------------- image mode
def test_image_mode_output_contract_3d_and_2d(sam2_checkpoint):
    g = build(sam2_checkpoint, num_points=2, num_negative_points=1)
    assert isinstance(g, SAM2ImageGeneralist)
    out = g(images(), specialist())
    p = out.probabilities
    assert p.shape == (B, K, D, H, W) and out.confidence.shape == (B, K, D, H, W)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    # classes the specialist does not predict get no prompt and a zero map; background = 1 - max foreground
    assert out.prompted.tolist() == [[True, True, False], [True, False, True]]
    assert float(p[0, 2].abs().max()) == 0 and float(p[1, 1].abs().max()) == 0
    torch.testing.assert_close(p[:, 0], 1 - p[:, 1:].max(1).values)
    # only slices with a prompt reach the encoder: 2 slices in item 0, 2 in item 1
    assert out.num_encoded == 4
    assert float(p[0, 1, [0, 1, 4, 5]].max()) == 0 and float(p[0, 1, 2:4].max()) > 0
    assert float(out.confidence[0, 1, [0, 1, 4, 5]].max()) == 0 and float(out.confidence[0, 1, 2:4].min()) > 0

    out2d = g(images()[:, :, 2], specialist()[:, :, 2])
    assert out2d.probabilities.shape == (B, K, H, W) and out2d.num_encoded == 2
    assert out2d.prompted.tolist() == [[True, True, False], [True, False, True]]


def test_image_mode_mask_only_prompts(sam2_checkpoint):
    g = build(sam2_checkpoint, num_points=0, use_box=False, use_mask_prompt=True)
    out = g(images(), specialist())
    assert out.probabilities.shape == (B, K, D, H, W) and out.num_encoded == 4
    assert float(out.probabilities[0, 1, 2:4].max()) > 0 and float(out.probabilities[0, 2].max()) == 0


def _prompts_on(slices, settings):
    """Prompts of the class-1/class-2 blobs on given (item, slice) pairs, as SlicePrompts on a stack of slices."""
    probs = specialist()
    out, index = [], []
    for n, (b, s) in enumerate(slices):
        for p in generate_prompts(probs[b:b + 1, :, s:s + 1], settings):
            out.append(p)
            index.append(n)
    return out, index


def test_batched_decode_equals_sam2_image_predictor_prompt_by_prompt(sam2_checkpoint):
    """All prompts of a call (on different slices, several per slice, different point counts, with and without mask
    prompts) decoded in one call give what ``SAM2ImagePredictor`` gives decoding each prompt on its own image."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    g = build(sam2_checkpoint)
    x = images()
    slice_ids = [(0, 2), (1, 1), (0, 3)]
    slices = torch.stack([x[b, 0, s] for b, s in slice_ids])
    prompts, index = _prompts_on(slice_ids, PromptSettings(num_points=1, use_box=True, use_mask_prompt=True))
    # a second prompt on slice 0 with more points and no mask: point sets need padding, masks are mixed
    prompts.append(SlicePrompt(0, 2, 2, points=torch.tensor([[6.0, 6.0], [9.0, 7.0], [1.0, 18.0]]),
                               labels=torch.tensor([1, 1, 0]), box=torch.tensor([5.0, 5.0, 11.0, 9.0])))
    index.append(0)
    # a mask-free, box-free prompt
    prompts.append(SlicePrompt(1, 2, 1, points=torch.tensor([[14.0, 11.0]]), labels=torch.tensor([1])))
    index.append(1)

    model_inputs, geometry = to_sam2_frames(slices, g.image_size)
    with torch.no_grad():
        features = g.encode(model_inputs)
        low_res, iou = g.decode(features, index, prompts, geometry)
    assert low_res.shape == (len(prompts), 1, g.image_size // 4, g.image_size // 4) and iou.shape == (len(prompts),)

    predictor = SAM2ImagePredictor(g.sam2)
    # the predictor's feature sizes are those of the 1024-pixel models; the tiny model's are T/4, T/8, T/16
    predictor._bb_feat_sizes = [(g.image_size // s, g.image_size // s) for s in (4, 8, 16)]
    # one image per prompt: the slice in [0, 1], grey as RGB, as the predictor's transforms expect it
    rgb = [min_max_scale(slices[i][None])[0, :, :, None].expand(-1, -1, 3).numpy().astype(np.float32)
           for i in index]
    predictor.set_image_batch(rgb)
    # each prompt in slice pixels, with the padding the batch needs: label -1 points after the prompt's own points,
    # and two in place of the box of a box-free prompt; the predictor adds the box corners (labels 2, 3) in front
    most = max(p.num_points for p in prompts)
    point_rows, label_rows, boxes, mask_inputs = [], [], [], []
    _, _, masks, _ = g.prompt_inputs(prompts, geometry)
    mask_row = iter(masks)
    for p in prompts:
        lead, trail = (0 if p.box is not None else 2), most - p.num_points
        point_rows.append(np.concatenate([np.zeros((lead, 2)), p.points.numpy(), np.zeros((trail, 2))]))
        label_rows.append(np.concatenate([-np.ones(lead), p.labels.numpy(), -np.ones(trail)]).astype(np.int32))
        boxes.append(p.box.numpy() if p.box is not None else None)
        # the mask prompt as our batch feeds it (the slice logits resized to the prompt encoder's mask input size)
        mask_inputs.append(next(mask_row).numpy() if p.mask is not None else None)
    _, ref_iou, ref_low_res = predictor.predict_batch(point_rows, label_rows, box_batch=boxes,
                                                      mask_input_batch=mask_inputs, multimask_output=False,
                                                      return_logits=True)
    torch.testing.assert_close(low_res.clamp(-32, 32), torch.from_numpy(np.stack(ref_low_res)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, torch.from_numpy(np.stack(ref_iou))[:, 0], atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------- video mode
def test_video_mode_propagates_from_the_key_slice(sam2_checkpoint):
    g = sees_the_object(build(sam2_checkpoint, backend="sam2_video"))
    assert isinstance(g, SAM2VideoGeneralist)
    out = g(images(), specialist())
    p = out.probabilities
    assert p.shape == (B, K, D, H, W) and out.confidence.shape == (B, K, D, H, W)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    assert out.prompted.tolist() == [[True, True, False], [True, False, True]]
    assert float(p[0, 2].abs().max()) == 0 and float(p[1, 1].abs().max()) == 0
    torch.testing.assert_close(p[:, 0], 1 - p[:, 1:].max(1).values)
    # every frame of an item with a prompted class is encoded, once for all its classes
    assert out.num_encoded == B * D
    # one prompt per class on its key slice (item 0: slice 2, item 1: slice 1), masks on the other slices come
    # from propagation, in both directions
    for b, k, key in ((0, 1, 2), (1, 2, 1)):
        others = [s for s in range(D) if s != key]
        assert all(float(p[b, k, s].max()) > 0 for s in others), (b, k)
        assert float(out.confidence[b, k].min()) > 0
    # the tracking of item 0 never saw item 1's frames: a different item changes nothing
    alone = g(images()[:1], specialist()[:1])
    torch.testing.assert_close(alone.probabilities, p[:1], atol=1e-5, rtol=1e-4)

    out2d = g(images()[:, :, 3], specialist()[:, :, 3])
    assert out2d.probabilities.shape == (B, K, H, W) and out2d.num_encoded == 1  # item 1 has no blob on slice 3
    assert out2d.prompted.tolist() == [[True, True, False], [True, False, False]]
    assert float(out2d.probabilities[0, 1].max()) > 0


def test_video_mode_explicit_prompts_and_mask_only_prompts(sam2_checkpoint):
    g = sees_the_object(build(sam2_checkpoint, backend="sam2_video", num_points=0, use_box=False,
                              use_mask_prompt=True))
    out = g(images(), specialist())
    assert out.prompted.tolist() == [[True, True, False], [True, False, True]]
    assert float(out.probabilities[0, 1, 5].max()) > 0  # propagated from a mask prompt on slice 2
    # an explicit prompt set conditions every slice it has prompts on
    prompts = generate_prompts(specialist()[:1], PromptSettings(num_points=1))
    assert sorted(p.slice_index for p in prompts) == [2, 3]
    out = g(images()[:1], specialist()[:1], prompts)
    assert out.prompted.tolist() == [[True, True, False]] and out.num_encoded == D


def test_video_state_is_built_from_tensors_like_init_state(sam2_checkpoint, monkeypatch):
    """No JPEG folder, no file: our state has the layout of ``SAM2VideoPredictor.init_state`` and tracking on it
    gives what tracking on an ``init_state`` state gives (frames handed to init_state in memory)."""
    import sam2.sam2_video_predictor as video_module

    g = sees_the_object(build(sam2_checkpoint, backend="sam2_video"))
    x = images()[0, 0]
    frames, _ = to_sam2_frames(x, g.image_size)
    prompts = list(generate_prompts(specialist()[:1], g.config.prompt_settings(), slice_indices=[2]))
    assert [(p.class_index, p.slice_index) for p in prompts] == [(1, 2)]

    monkeypatch.setattr(video_module, "load_video_frames", lambda **kwargs: (frames, H, W))
    with torch.no_grad():
        reference_state = g.sam2.init_state("in-memory")
        reference = g.track(reference_state, prompts)

    def no_files(*args, **kwargs):
        raise AssertionError("the video generalist must not read frames from files")

    monkeypatch.setattr(video_module, "load_video_frames", no_files)
    monkeypatch.setattr(type(g.sam2), "init_state", no_files)
    with torch.no_grad():
        state = g.init_state(frames, (H, W))
        ours = g.track(state, prompts)
    assert set(state) == set(reference_state)
    assert state["images"].shape == (D, 3, g.image_size, g.image_size) and sorted(state["cached_features"]) == \
        list(range(D))
    torch.testing.assert_close(ours[0], reference[0], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(ours[1], reference[1], atol=1e-5, rtol=1e-4)
    assert g(images(), specialist()).probabilities.shape == (B, K, D, H, W)  # the full forward, file-free too


# ------------------------------------------------------------------------------------------- frozen
@pytest.mark.parametrize("backend", ["sam2", "sam2_video"])
def test_frozen_no_grad_eval_and_parameters_unchanged(sam2_checkpoint, backend):
    g = build(sam2_checkpoint, backend=backend)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.train()  # a trainer calling .train() must not put a frozen encoder into training mode
    assert not any(m.training for m in g.modules())
    assert not any(p.requires_grad for p in g.parameters())
    x = images().requires_grad_(True)
    out = g(x, specialist())
    assert not out.probabilities.requires_grad
    assert not any(p.requires_grad or p.grad is not None for p in g.parameters())
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k


# ------------------------------------------------------------------------------------------- building, errors
def test_released_configs_build_offline_without_checkpoint():
    from sam2.modeling.sam2_base import SAM2Base
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    g = build_generalist({"backend": "sam2", "model_type": "hiera_t", "allow_random_init": True})
    assert type(g.sam2) is SAM2Base and g.image_size == 1024
    assert np.isclose(sum(p.numel() for p in g.parameters()) / 1e6, 38.96, atol=0.05)  # SAM2.1 Hiera-T
    assert not any(p.requires_grad for p in g.parameters())
    v = build_generalist({"backend": "sam2_video", "model_type": "hiera_t", "allow_random_init": True})
    assert isinstance(v.sam2, SAM2VideoPredictor) and v.sam2.no_obj_embed_spatial is not None  # the 2.1 model
    # SAM 2.0 files (without the 2.1 additions) are recognised and get the 2.0 model definition
    keys = dict.fromkeys(g.sam2.state_dict())
    assert not _is_sam2_0_checkpoint(keys)
    assert _is_sam2_0_checkpoint({k: v for k, v in keys.items()
                                  if k != "no_obj_embed_spatial" and not k.startswith("obj_ptr_tpos_proj")})


def test_checkpoint_errors_name_the_file(sam2_checkpoint, tmp_path):
    missing = tmp_path / "nope" / "sam2.1_hiera_tiny.pt"
    for backend in ("sam2", "sam2_video"):
        with pytest.raises(CheckpointError, match=re.escape(str(missing))):
            build(missing, backend=backend)
    # a checkpoint of the wrong size: the message names the file, the model it holds and the setting to change
    with pytest.raises(CheckpointError, match="not a released size") as e:
        build_generalist({"backend": "sam2", "model_type": "hiera_t", "checkpoint": str(sam2_checkpoint)})
    assert str(sam2_checkpoint) in str(e.value) and "model_type" in str(e.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read") as e:
        build(garbage)
    assert str(garbage) in str(e.value)


def test_a_sam_v1_checkpoint_is_rejected(tmp_path):
    pytest.importorskip("segment_anything")
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    sam_file = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth")
    for backend in ("sam2", "sam2_video"):
        with pytest.raises(CheckpointError, match=r"looks like a SAM \(ViT") as e:
            build(sam_file, backend=backend)
        assert str(sam_file) in str(e.value) and "SAM2 tiny" in str(e.value)


def test_config_errors_and_missing_package(sam2_checkpoint, monkeypatch):
    with pytest.raises(GeneralistConfigError, match="frozen"):
        build(sam2_checkpoint, lora_rank=4)
    with pytest.raises(GeneralistConfigError, match="stitch"):
        build(sam2_checkpoint, stitch=True)
    with pytest.raises(GeneralistConfigError, match="needs a checkpoint"):
        build_generalist({"backend": "sam2_video"})
    monkeypatch.setitem(sys.modules, "sam2", None)  # as if not installed
    with pytest.raises(MissingBackendError, match="pip install"):
        build(sam2_checkpoint)
