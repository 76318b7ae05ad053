"""The foundation-model layer with SAM/MedSAM: real ``segment_anything`` modules (tiny, randomly initialised, saved
and loaded as real checkpoint files), prompts from a specialist softmax, geometry, checkpoints and errors."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from nnunet_foundation.foundation.checkpoints import CheckpointError  # noqa: E402
from nnunet_foundation.foundation.config import (GeneralistConfigError, MissingBackendError,  # noqa: E402
                                                 build_generalist, parse_generalist_setting)
from nnunet_foundation.foundation.generalist import combine_outputs, GeneralistOutput  # noqa: E402
from nnunet_foundation.foundation.geometry import (StitchLayout, compute_resize_geometry, resize_from_model,  # noqa
                                                   resize_to_model, stitch, unstitch, choose_slice_axis)
from nnunet_foundation.foundation.prompts import PromptSettings, generate_prompts  # noqa: E402
from nnunet_foundation.foundation.sam_decoding import decode_masks  # noqa: E402
from nnunet_foundation.foundation.tiny import save_tiny_sam2_checkpoint, save_tiny_sam_checkpoint  # noqa: E402

B, K, D, H, W = 2, 3, 6, 20, 24


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth", seed=3)


def specialist(batch=B):
    """A softmax with a confident class-1 blob in item 0 and a class-2 blob in item 1 (class 2 absent in item 0)."""
    probs = torch.zeros(batch, K, D, H, W)
    probs[:, 0] = 1.0
    probs[0, :, 2:4, 5:10, 5:12] = torch.tensor([0.02, 0.97, 0.01]).view(K, 1, 1, 1)
    if batch > 1:
        probs[1, :, 1:3, 8:15, 10:20] = torch.tensor([0.05, 0.0, 0.95]).view(K, 1, 1, 1)
    return probs


def images(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, D, H, W, generator=g) * 3 + 1  # nnU-Net z-scored intensities


def build(checkpoint, **settings):
    return build_generalist({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint), **settings})


# ------------------------------------------------------------------------------------------- the interface
def test_output_contract_3d_and_2d(sam_checkpoint):
    g = build(sam_checkpoint, num_points=2, num_negative_points=1, use_mask_prompt=True)
    out = g(images(), specialist())
    p = out.probabilities
    assert p.shape == (B, K, D, H, W) and out.confidence.shape == (B, K, D, H, W)
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    # classes the specialist does not predict get no prompt and a zero map; background = 1 - max foreground
    assert out.prompted.tolist() == [[True, True, False], [True, False, True]]
    assert float(p[0, 2].abs().max()) == 0 and float(p[1, 1].abs().max()) == 0
    torch.testing.assert_close(p[:, 0], 1 - p[:, 1:].max(1).values)
    # only prompted slices reach the encoder: 2 slices in item 0, 2 in item 1
    assert out.num_encoded == 4
    # slices without any prompt have all-zero foreground
    assert float(p[0, 1, [0, 1, 4, 5]].max()) == 0
    assert float(p[0, 1, 2:4].max()) > 0
    out2d = g(images()[:, :, 2], specialist()[:, :, 2])
    assert out2d.probabilities.shape == (B, K, H, W) and out2d.prompted.tolist() == [[True, True, False],
                                                                                   [True, False, True]]


def test_slice_axis_follows_the_lowest_resolution_axis(sam_checkpoint):
    assert choose_slice_axis((1.0, 1.0, 3.0)) == 2 and choose_slice_axis((5.0, 0.8, 0.8)) == 0
    g = build(sam_checkpoint, spacing=[1.0, 1.0, 3.0])
    out = g(images(), specialist())
    # class 1 of item 0 spans 7 W-slices (5..11): slicing along W encodes 7 + 10 slices instead of 4
    assert out.num_encoded == 7 + 10 and out.probabilities.shape == (B, K, D, H, W)


def test_frozen_no_grad_eval_and_parameters_unchanged(sam_checkpoint):
    g = build(sam_checkpoint)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.train()  # a trainer calling .train() must not put a frozen encoder into training mode
    assert not any(m.training for m in g.modules())
    assert not any(p.requires_grad for p in g.parameters())
    x = images().requires_grad_(True)
    out = g(x, specialist())
    assert not out.probabilities.requires_grad
    for k, v in g.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batched_decoder_equals_sams_own_decoder_prompt_by_prompt(sam_checkpoint):
    g = build(sam_checkpoint)
    sam = g.sam
    torch.manual_seed(0)
    embeddings = torch.randn(3, 32, 8, 8)
    boxes = torch.tensor([[4.0, 5.0, 30.0, 40.0], [10.0, 10.0, 20.0, 25.0], [0.0, 0.0, 63.0, 63.0]])
    points = torch.tensor([[[10.0, 12.0], [0.0, 0.0]], [[15.0, 17.0], [30.0, 3.0]], [[40.0, 40.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, -1], [1, 0], [1, -1]])
    sparse, dense = sam.prompt_encoder(points=(points, labels), boxes=boxes, masks=None)
    with torch.no_grad():
        masks, iou = decode_masks(sam.mask_decoder, embeddings, sam.prompt_encoder.get_dense_pe(), sparse,
                                  dense.expand(3, -1, -1, -1))
        for i in range(3):
            s_i, d_i = sam.prompt_encoder(points=(points[i:i + 1], labels[i:i + 1]), boxes=boxes[i:i + 1], masks=None)
            ref_masks, ref_iou = sam.mask_decoder(image_embeddings=embeddings[i:i + 1],
                                                  image_pe=sam.prompt_encoder.get_dense_pe(),
                                                  sparse_prompt_embeddings=s_i, dense_prompt_embeddings=d_i,
                                                  multimask_output=False)
            torch.testing.assert_close(masks[i:i + 1, :1], ref_masks, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[i:i + 1, :1], ref_iou, atol=1e-5, rtol=1e-4)


def test_slice_prediction_matches_sam_forward_on_the_same_preprocessed_image(sam_checkpoint):
    """End to end for one slice: our intensity mapping, resize, prompt mapping and decoding agree with the official
    ``Sam.forward`` fed the same RGB image (min-max to [0, 255], longest side resized)."""
    from nnunet_foundation.foundation.geometry import compute_resize_geometry
    from nnunet_foundation.foundation.geometry import min_max_scale

    g = build(sam_checkpoint, num_points=1, use_box=True)
    x, probs = images(1), specialist(1)
    prompts = generate_prompts(probs[:, :, 2:3], g.config.prompt_settings())
    (prompt,) = [p for p in prompts if p.class_index == 1]
    logits, iou, _ = g.segment_slices(x[0, 0, 2:3], [prompt], [0])
    geometry = compute_resize_geometry((H, W), g.img_size)
    rgb = (min_max_scale(x[0, 0, 2:3]) * 255).unsqueeze(1).expand(-1, 3, -1, -1)
    rgb = torch.nn.functional.interpolate(rgb, size=geometry.resized_hw, mode="bilinear", align_corners=False,
                                          antialias=True)[0]
    sx, sy = geometry.scale_xy
    scale = torch.tensor([sx, sy])
    with torch.no_grad():
        (ref,) = g.sam([{"image": rgb, "original_size": (H, W), "point_coords": (prompt.points * scale)[None],
                         "point_labels": prompt.labels[None], "boxes": (prompt.box.view(2, 2) * scale).view(1, 4)}],
                       multimask_output=False)
    torch.testing.assert_close(iou, ref["iou_predictions"][:, 0], atol=1e-4, rtol=1e-3)
    # the same low-resolution logits; mapped back to the slice with our resize (SAM's postprocessing differs only
    # in not antialiasing the final downscale)
    from nnunet_foundation.foundation.geometry import upsample_low_res

    expected = resize_from_model(upsample_low_res(ref["low_res_logits"], g.img_size), geometry)[:, 0]
    torch.testing.assert_close(logits, expected, atol=1e-3, rtol=1e-3)


def test_stitching_encodes_one_mosaic_for_many_small_slices(sam_checkpoint):
    g = build(sam_checkpoint, stitch=True, stitch_grid=2)
    out = g(images(), specialist())
    assert out.num_encoded == 1  # 4 prompted slices in one 2 x 2 mosaic
    assert out.probabilities.shape == (B, K, D, H, W) and out.prompted.tolist() == [[True, True, False],
                                                                                     [True, False, True]]
    assert float(out.probabilities[0, 2].max()) == 0


def test_medsam_uses_minmax_inputs_and_squashes_to_the_model_size(sam_checkpoint):
    g = build_generalist({"backend": "medsam", "model_type": "tiny", "checkpoint": str(sam_checkpoint)})
    model_input, geometry = g._to_model_input(images(1)[0, 0, :2])
    assert geometry.resized_hw == (g.img_size, g.img_size)
    assert float(model_input.min()) >= 0 and float(model_input.max()) <= 1
    assert g(images(), specialist()).probabilities.shape == (B, K, D, H, W)


# ------------------------------------------------------------------------------------------- ensembles
def test_ensemble_mean_and_agreement(sam_checkpoint, tmp_path):
    other = save_tiny_sam_checkpoint(tmp_path / "other.pth", seed=11)
    ensemble = build_generalist([{"backend": "sam", "model_type": "tiny", "checkpoint": str(sam_checkpoint)},
                                 {"backend": "medsam", "model_type": "tiny", "checkpoint": str(other)}])
    outs = [m(images(), specialist()) for m in ensemble.members]
    torch.testing.assert_close(ensemble(images(), specialist()).probabilities,
                               (outs[0].probabilities + outs[1].probabilities) / 2)
    # agreement weighting: a third model that disagrees everywhere counts less than the two that agree
    a = torch.zeros(1, 2, 4, 4)
    a[:, 1] = 1
    b = a.clone()
    c = 1 - a
    outputs = [GeneralistOutput(x, torch.ones(1, 2, dtype=torch.bool)) for x in (a, b, c)]
    agreed = combine_outputs(outputs, "agreement").probabilities
    assert float(agreed[0, 1].min()) > 2 / 3 + 0.05  # the plain mean would be exactly 2/3
    assert combine_outputs(outputs, "mean").probabilities[0, 1].allclose(torch.full((4, 4), 2 / 3))


# ------------------------------------------------------------------------------------------- prompts
def test_prompts_points_boxes_masks_and_uncertainty():
    probs = specialist(1)[:, :, 2:3]  # (1, K, 1, H, W)
    settings = PromptSettings(num_points=3, num_negative_points=2, use_box=True, use_mask_prompt=True)
    prompts = generate_prompts(probs, settings)
    (p,) = list(prompts)
    assert (p.batch_index, p.class_index, p.slice_index) == (0, 1, 0)
    assert p.box.tolist() == [5.0, 5.0, 11.0, 9.0]  # x0, y0, x1, y1 (inclusive) of rows 5..9, cols 5..11
    positives = p.points[p.labels == 1]
    assert len(positives) == 3 and len(p.points[p.labels == 0]) == 2
    x, y = positives[0].tolist()
    assert y == 7.0 and 7.0 <= x <= 9.0  # one of the most interior pixels of the 5 x 7 blob (distance 3)
    for x, y in p.points[p.labels == 0].tolist():
        assert not (5 <= x <= 11 and 5 <= y <= 9)
    assert p.mask.shape == (H, W) and float(p.mask[7, 8]) > 0 > float(p.mask[0, 0])
    unc = generate_prompts(probs, PromptSettings(num_points=2, point_selection="uncertainty"))
    assert len(unc) == 1 and unc.slices[0].num_points == 2
    # nothing confident: no prompt at all
    flat = torch.full((1, K, 1, H, W), 1.0 / K)
    assert len(generate_prompts(flat, settings)) == 0


# ------------------------------------------------------------------------------------------- geometry
def test_stitch_unstitch_and_resize_round_trip():
    layout = StitchLayout(num_slices=5, grid=2, target=64)
    tiles = torch.randn(5, 3, 32, 32)
    mosaics = stitch(tiles, layout)
    assert mosaics.shape == (2, 3, 64, 64) and torch.equal(unstitch(mosaics, layout), tiles)
    geometry = compute_resize_geometry((16, 32), 64)  # integer scale 2, padded to 64 x 64
    mask = torch.zeros(1, 1, 16, 32)
    mask[..., 3:11, 4:20] = 1  # an object, not pixel noise (bilinear resampling mixes neighbouring pixels)
    back = resize_from_model(resize_to_model(mask, geometry) * 20 - 10, geometry)
    assert torch.equal((back > 0).float(), mask)


# ------------------------------------------------------------------------------------------- errors
def test_checkpoint_errors_name_the_file_and_the_model(sam_checkpoint, tmp_path):
    missing = tmp_path / "nope" / "sam_vit_b.pth"
    with pytest.raises(CheckpointError, match=str(missing)):
        build(missing)
    sam2_file = save_tiny_sam2_checkpoint(tmp_path / "tiny_sam2.pt")
    with pytest.raises(CheckpointError, match="SAM2") as e:
        build(sam2_file)
    assert str(sam2_file) in str(e.value)
    with pytest.raises(CheckpointError, match="not a released size") as e:
        build_generalist({"backend": "sam", "model_type": "vit_b", "checkpoint": str(sam_checkpoint)})
    assert "model_type" in str(e.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build(garbage)


def test_config_errors_and_missing_package(sam_checkpoint, monkeypatch, tmp_path):
    with pytest.raises(GeneralistConfigError, match="needs a checkpoint"):
        build_generalist({"backend": "sam"})
    with pytest.raises(GeneralistConfigError, match="unknown generalist setting"):
        build_generalist({"backend": "sam", "checkpoint": "x", "num_point": 3})
    with pytest.raises(GeneralistConfigError, match="model_type"):
        build_generalist({"backend": "medsam", "model_type": "vit_h", "checkpoint": "x"})
    setting = tmp_path / "generalists.json"
    setting.write_text('[{"backend": "sam", "model_type": "tiny", "checkpoint": "%s"}]' % sam_checkpoint)
    assert len(parse_generalist_setting(str(setting))) == 1
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # as if not installed
    with pytest.raises(MissingBackendError, match="pip install"):
        build(sam_checkpoint)


def test_random_init_vit_b_builds_without_checkpoint_only_when_allowed():
    g = build_generalist({"backend": "sam", "model_type": "vit_b", "allow_random_init": True})
    assert g.img_size == 1024 and not any(p.requires_grad for p in g.parameters())
    assert np.isclose(sum(p.numel() for p in g.parameters()) / 1e6, 93.7, atol=0.5)


def test_embedding_cache_reuses_encoder_outputs_of_unchanged_inputs(sam_checkpoint):
    # float32: bfloat16 results depend on the batch an image is encoded in, so a cached embedding from another batch
    # would differ in the last bits
    plain = build(sam_checkpoint, precision="float32")
    cached = build(sam_checkpoint, cache_embeddings=True, cache_size_mb=64, precision="float32")
    x, probs = images(), specialist()
    first = cached(x, probs, cache_keys=["case_a", "case_b"])
    second = cached(x, probs, cache_keys=["case_a", "case_b"])
    assert first.num_encoded == 4 and second.num_encoded == 0 and cached.cache_hits == 4
    expected = plain(x, probs).probabilities
    torch.testing.assert_close(first.probabilities, expected)
    torch.testing.assert_close(second.probabilities, expected)
    # a new key is a new input: encoded again; without keys nothing is cached
    assert cached(x, probs, cache_keys=["case_c", "case_b"]).num_encoded == 2
    assert cached(x, probs).num_encoded == 4
    tiny = build(sam_checkpoint, cache_embeddings=True, cache_size_mb=0.001)  # room for less than one call
    tiny(x, probs, cache_keys=["a", "b"])
    assert len(tiny._embedding_cache) == 4  # the current call's entries stay, older ones are evicted
    tiny(x, probs, cache_keys=["c", "d"])
    assert set(k[0] for k in tiny._embedding_cache) == {"c", "d"}


def test_prefetched_mosaics_give_each_slice_the_logits_of_one_stitched_call(sam_checkpoint):
    """IFL prompts a case's slices one at a time; with stitching it encodes the case's mosaics once
    (``prefetch_stitched``) and decodes each prompt on its slice's tile: the same logits as one stitched call with
    every prompt, and no encoder call per prompt."""
    from nnunet_foundation.foundation.prompts import SlicePrompt

    g = build(sam_checkpoint, stitch=True, precision="float32")
    slices = torch.randn(5, 16, 12, generator=torch.Generator().manual_seed(3))
    assert g.stitches((16, 12)) and not g.stitches((40, 40))  # 64-px tiny SAM: 4 x 4 tiles of 16 px
    boxes = {0: [1, 2, 8, 12], 3: [4, 0, 11, 9], 4: [0, 5, 6, 15]}
    prompts = {i: SlicePrompt(batch_index=0, class_index=1, slice_index=i, points=torch.zeros((0, 2)),
                              labels=torch.zeros((0,), dtype=torch.long), box=torch.tensor(b, dtype=torch.float32))
               for i, b in boxes.items()}
    together, _, encoded = g.segment_slices(slices, list(prompts.values()), list(boxes))
    assert encoded == 1  # one mosaic holds the 5 slices
    calls = []
    encode = g.encode
    g.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    keys = [("case", z) for z in range(5)]
    assert g.prefetch_stitched(slices, keys) == 1 and calls == [1]
    for j, i in enumerate(boxes):
        g._slice_cache_keys = [keys[i]]
        alone, _, encoded = g.segment_slices(slices[i:i + 1], [prompts[i]], [0])
        assert encoded == 0
        torch.testing.assert_close(alone[0], together[j])
    g._slice_cache_keys = [("other case", 0)]  # not prefetched: encoded as usual
    assert g.segment_slices(slices[:1], [prompts[0]], [0])[2] == 1 and calls == [1, 1]
    with pytest.raises(ValueError, match="stitch"):
        build(sam_checkpoint).prefetch_stitched(slices, keys)


def test_component_prompts_give_each_component_its_own_box_and_points():
    from nnunet_foundation.foundation.prompts import PromptSettings, prompts_for_slice

    probs = np.zeros((2, 20, 30), dtype=np.float32)
    probs[1, 2:6, 3:8] = 0.9  # small component
    probs[1, 10:18, 15:27] = 0.9  # large component
    probs[0] = 1 - probs[1]
    union = prompts_for_slice(probs, PromptSettings(num_points=1, box_mode="union"))
    per_component = prompts_for_slice(probs, PromptSettings(num_points=1, box_mode="components"))
    assert len(union) == 1 and union[0].box.tolist() == [3, 2, 26, 17]
    assert [p.box.tolist() for p in per_component] == [[15, 10, 26, 17], [3, 2, 7, 5]]  # largest first
    for p in per_component:  # each point lies inside its own component's box
        x, y = p.points[0].tolist()
        assert p.box[0] <= x <= p.box[2] and p.box[1] <= y <= p.box[3]
