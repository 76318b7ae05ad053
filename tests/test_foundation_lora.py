"""Adapting the SAM generalist (``foundation/lora.py``): LoRA on q/v, trainable decoder, prompt-free multi-class head,
freezing, training mode, one optimiser step and checkpoints of the adapted parameters, on a tiny real SAM."""
from __future__ import annotations

import copy
import io

import pytest
import torch

pytest.importorskip("segment_anything")

from nnunet_foundation.foundation.config import build_generalist  # noqa: E402
from nnunet_foundation.foundation.lora import (LoRAQKV, MultiClassMaskHead, adaptable_state_dict,  # noqa: E402
                                               apply_lora, load_adaptable_state_dict, trainable_parameter_groups)
from nnunet_foundation.foundation.tiny import build_tiny_sam, save_tiny_sam_checkpoint  # noqa: E402

B, K, D, H, W = 2, 3, 4, 20, 24
ADAPTED = dict(lora_rank=2, lora_alpha=4.0, multiclass_head=True, num_classes=K)


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny_sam.pth", seed=5)


def build(checkpoint, **settings):
    return build_generalist({"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint), **settings})


def specialist():
    probs = torch.zeros(B, K, D, H, W)
    probs[:, 0] = 1.0
    probs[0, :, 1:3, 5:10, 5:12] = torch.tensor([0.02, 0.97, 0.01]).view(K, 1, 1, 1)
    probs[1, :, 2:4, 8:15, 10:20] = torch.tensor([0.05, 0.0, 0.95]).view(K, 1, 1, 1)
    return probs


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, D, H, W, generator=g) * 3 + 1


def randomize_trainable(g, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in g.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def frozen_names(g):
    return {n for n, p in g.named_parameters() if not p.requires_grad}


# ----------------------------------------------------------------------------------------------------- LoRA
def test_fresh_lora_keeps_the_function_and_wraps_every_block(sam_checkpoint):
    plain, adapted = build(sam_checkpoint), build(sam_checkpoint, **ADAPTED)
    blocks = adapted.sam.image_encoder.blocks
    assert all(isinstance(b.attn.qkv, LoRAQKV) for b in blocks)
    # the checkpoint's qkv weights sit under .base, identical to the plain model's
    sd = adapted.state_dict()
    for i in range(len(blocks)):
        torch.testing.assert_close(sd[f"sam.image_encoder.blocks.{i}.attn.qkv.base.weight"],
                                   plain.state_dict()[f"sam.image_encoder.blocks.{i}.attn.qkv.weight"], rtol=0, atol=0)
        assert f"sam.image_encoder.blocks.{i}.attn.qkv.lora_b_v.weight" in sd
    x, probs = images(), specialist()
    out_plain, out_adapted = plain(x, probs), adapted(x, probs)
    assert torch.equal(out_plain.probabilities, out_adapted.probabilities)
    assert torch.equal(out_plain.confidence, out_adapted.confidence)
    # two builds of one configuration are identical (seeded initialisation of LoRA A and the head)
    again = build(sam_checkpoint, **ADAPTED)
    for (n, a), (_, b) in zip(adapted.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="already applied"):
        apply_lora(adapted.sam, 2)


def test_lora_updates_q_and_v_but_not_k():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    qkv = LoRAQKV(copy.deepcopy(base), rank=2, alpha=4.0)
    x = torch.randn(2, 3, 3, 8)
    assert torch.equal(qkv(x), base(x))
    with torch.no_grad():
        qkv.lora_b_q.weight.normal_()
        qkv.lora_b_v.weight.normal_()
        out, ref = qkv(x), base(x)
        expected_q = ref[..., :8] + 2.0 * x @ qkv.lora_a_q.weight.T @ qkv.lora_b_q.weight.T
        expected_v = ref[..., 16:] + 2.0 * x @ qkv.lora_a_v.weight.T @ qkv.lora_b_v.weight.T
    assert torch.equal(out[..., 8:16], ref[..., 8:16])  # k untouched
    assert not torch.allclose(out[..., :8], ref[..., :8]) and not torch.allclose(out[..., 16:], ref[..., 16:])
    torch.testing.assert_close(out[..., :8], expected_q)
    torch.testing.assert_close(out[..., 16:], expected_v)
    sam = build_tiny_sam()
    prefixes = apply_lora(sam, rank=3)
    assert prefixes == [f"image_encoder.blocks.{i}.attn.qkv.lora_" for i in range(len(sam.image_encoder.blocks))]
    lora = [n for n, _ in sam.named_parameters() if n.startswith(tuple(prefixes))]
    assert len(lora) == 4 * len(prefixes) and sam.image_encoder.blocks[0].attn.qkv.lora_a_q.weight.shape == (3, 32)


# ---------------------------------------------------------------------------------------------- freezing
@pytest.mark.parametrize("train_decoder", [False, True])
def test_freeze_selects_exactly_the_adapted_parameters(sam_checkpoint, train_decoder):
    g = build(sam_checkpoint, **ADAPTED, train_decoder=train_decoder)
    trainable = {n for n, p in g.named_parameters() if p.requires_grad}
    for n, _ in g.named_parameters():
        adapted = ".qkv.lora_" in n or n.startswith("multiclass_head.") or (
            train_decoder and n.startswith(("sam.prompt_encoder.", "sam.mask_decoder.")))
        assert (n in trainable) == adapted, n
    assert not any(n.startswith("sam.image_encoder.") and ".lora_" not in n for n in trainable)
    assert not g.sam.image_encoder.blocks[0].attn.qkv.base.weight.requires_grad
    assert g.sam.image_encoder.blocks[0].attn.qkv.lora_b_q.weight.requires_grad
    # AdamW groups: no decay on 1-D parameters (biases, norms)
    groups = trainable_parameter_groups(g, lr=1e-4, weight_decay=0.1)
    assert sum(len(grp["params"]) for grp in groups) == len(trainable)
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="no trainable"):
        trainable_parameter_groups(build(sam_checkpoint))


def test_train_mode_only_for_adapted_modules(sam_checkpoint):
    g = build(sam_checkpoint, **ADAPTED)
    assert not any(m.training for m in g.modules())
    g.train()
    assert g.training  # the flag the forward reads to run with gradients
    assert not g.sam.image_encoder.training and not g.sam.image_encoder.blocks[0].training
    assert not g.sam.image_encoder.blocks[0].mlp.training and not g.sam.mask_decoder.training
    for block in g.sam.image_encoder.blocks:
        assert block.attn.qkv.training and block.attn.qkv.lora_a_q.training and not block.attn.qkv.base.training
    assert g.multiclass_head.training and g.multiclass_head.decoder.transformer.training
    g.train(False)
    assert not any(m.training for m in g.modules())
    # the instance-level overrides follow a deep copy and a pickled round trip (not the original)
    buffer = io.BytesIO()
    torch.save(g, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(g), torch.load(buffer, weights_only=False)):
        other.train()
        assert other.training and other.multiclass_head.training and not g.multiclass_head.training
        assert other.trainable_modules()[-1] is other.multiclass_head
        assert other.is_trainable_parameter("multiclass_head.decoder.iou_token.weight")


# ---------------------------------------------------------------------------------------------- training
def test_one_adamw_step_moves_only_adapted_parameters(sam_checkpoint):
    g = build(sam_checkpoint, **ADAPTED)
    frozen = {n: p.detach().clone() for n, p in g.named_parameters() if not p.requires_grad}
    lora_b = g.sam.image_encoder.blocks[0].attn.qkv.lora_b_v.weight
    assert float(lora_b.detach().abs().max()) == 0
    head_before = {n: p.detach().clone() for n, p in g.multiclass_head.named_parameters()}
    optimizer = torch.optim.AdamW(trainable_parameter_groups(g, lr=1e-3, weight_decay=0.1))
    g.train()
    x, probs = images(), specialist()
    out = g(x, probs)
    assert out.probabilities.requires_grad
    head_logits = g.multiclass_head.segment(g, x[:, 0, 1])  # (B, K, H, W) of one slice per item
    assert head_logits.requires_grad
    loss = (out.probabilities[:, 1:] - probs[:, 1:]).pow(2).mean() + \
        torch.nn.functional.cross_entropy(head_logits, probs[:, :, 1].argmax(1))
    loss.backward()
    assert lora_b.grad is not None and float(lora_b.grad.abs().max()) > 0
    optimizer.step()
    assert float(lora_b.detach().abs().max()) > 0
    for block in g.sam.image_encoder.blocks:
        assert float(block.attn.qkv.lora_b_q.weight.detach().abs().max()) > 0
    changed = [n for n, p in g.multiclass_head.named_parameters() if not torch.equal(p, head_before[n])]
    assert any(n.startswith("decoder.transformer.") for n in changed)
    assert any(n.startswith("decoder.output_hypernetworks_mlps.") for n in changed)
    for n, p in g.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    # evaluation runs without a graph
    g.eval()
    assert not g(x, probs).probabilities.requires_grad
    assert not g.multiclass_head.segment(g, x[:, 0, 1]).requires_grad


def test_multiclass_head_shapes_and_initialisation(sam_checkpoint):
    g = build(sam_checkpoint, multiclass_head=True, num_classes=5)
    head = g.multiclass_head
    assert isinstance(head, MultiClassMaskHead) and head.decoder.num_multimask_outputs == 5
    assert head.decoder.num_mask_tokens == 6
    # pretrained where names and shapes match, random only for the token embedding / IoU output and extra MLPs
    assert any(k.startswith("transformer.") for k in head.pretrained_keys)
    assert "output_hypernetworks_mlps.3.layers.0.weight" in head.pretrained_keys
    assert set(head.random_keys) >= {"mask_tokens.weight", "output_hypernetworks_mlps.5.layers.0.weight"}
    torch.testing.assert_close(head.decoder.output_upscaling[0].weight, g.sam.mask_decoder.output_upscaling[0].weight,
                               rtol=0, atol=0)
    assert head.decoder.transformer is not g.sam.mask_decoder.transformer  # a copy, trained separately
    x = images()
    logits = head.segment(g, x[0, 0, 1:3])  # two (H, W) slices
    assert logits.shape == (2, 5, H, W) and torch.isfinite(logits).all()
    emb = g.encode(g._to_model_input(x[0, 0, 1:3])[0])
    low, iou = head(emb, g.sam.prompt_encoder, return_iou=True)
    assert low.shape == (2, 5, 32, 32) and iou.shape == (2, 5)  # low-res logits: 4x the 8x8 embedding
    patches = head.segment_patches(g, x)
    assert patches.shape == (B, 5, D, H, W)
    torch.testing.assert_close(patches[0, :, 1:3], logits.transpose(0, 1), rtol=1e-5, atol=1e-5)
    flat = head.segment_patches(g, x[:, :, 1])
    assert flat.shape == (B, 5, H, W)
    torch.testing.assert_close(flat, patches[:, :, 1], rtol=1e-5, atol=1e-5)
    # only the head is trainable here; the SAM model stays frozen
    assert {n.split(".")[0] for n, p in g.named_parameters() if p.requires_grad} == {"multiclass_head"}


def test_multiclass_head_segments_colour_patches_slice_by_slice(sam_checkpoint):
    """SynFoC's and SFR's head with ``image_channel: "rgb"``: each slice of the patch reaches the encoder as one
    colour image (channels 0-2), in slice order; a channel index feeds that channel alone."""
    g = build(sam_checkpoint, multiclass_head=True, num_classes=K, image_channel="rgb", axis=0)
    x = torch.randn(B, 4, D, H, W, generator=torch.Generator().manual_seed(2))  # R, G, B and one more channel
    head = g.multiclass_head
    patches = head.segment_patches(g, x)
    assert patches.shape == (B, K, D, H, W)
    slices = x[:, :3].transpose(1, 2).reshape(B * D, 3, H, W)  # slice-major colour slices
    torch.testing.assert_close(patches.transpose(1, 2).reshape(B * D, K, H, W), head.segment(g, slices),
                               rtol=1e-5, atol=1e-5)
    grey = build(sam_checkpoint, multiclass_head=True, num_classes=K, image_channel=1, axis=0)
    grey.multiclass_head.load_state_dict(head.state_dict())
    torch.testing.assert_close(grey.multiclass_head.segment_patches(grey, x)[:, :, 2],
                               head.segment(grey, x[:, 1, 2]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rgb"):
        head.segment_patches(g, x[:, :2])  # two channels are not a colour image


# -------------------------------------------------------------------------------------------- checkpoints
def test_adaptable_state_dict_round_trip_and_mismatch(sam_checkpoint):
    g = build(sam_checkpoint, **ADAPTED)
    randomize_trainable(g)
    state = adaptable_state_dict(g)
    assert set(state) == {n for n, p in g.named_parameters() if p.requires_grad}
    assert not any(".qkv.base." in k for k in state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    fresh = build(sam_checkpoint, **ADAPTED)
    x, probs = images(1), specialist()
    reference = g(x, probs).probabilities
    assert not torch.equal(fresh(x, probs).probabilities, reference)
    load_adaptable_state_dict(fresh, state)
    assert torch.equal(fresh(x, probs).probabilities, reference)
    assert torch.equal(fresh.multiclass_head.segment(fresh, x[0, 0, 1:3]), g.multiclass_head.segment(g, x[0, 0, 1:3]))
    assert frozen_names(fresh) == frozen_names(g)

    with pytest.raises(ValueError, match=r"shape mismatch.*lora_a_q.*LoRA rank"):
        load_adaptable_state_dict(build(sam_checkpoint, **{**ADAPTED, "lora_rank": 4}), state)
    with pytest.raises(ValueError, match=r"unexpected keys: multiclass_head\..*num_classes"):
        load_adaptable_state_dict(build(sam_checkpoint, lora_rank=2, lora_alpha=4.0), state)
    partial = {k: v for k, v in state.items() if not k.startswith("multiclass_head.")}
    with pytest.raises(ValueError, match=r"missing keys: multiclass_head\."):
        load_adaptable_state_dict(fresh, partial)
    assert adaptable_state_dict(build(sam_checkpoint)) == {}


def test_train_decoder_only_trains_prompt_encoder_and_decoder(sam_checkpoint):
    g = build(sam_checkpoint, train_decoder=True)
    trainable = {n.split(".")[1] for n, p in g.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_encoder", "mask_decoder"}
    g.train()
    assert g.sam.mask_decoder.training and g.sam.prompt_encoder.training and not g.sam.image_encoder.training
    encoder_before = {n: p.clone() for n, p in g.sam.image_encoder.named_parameters()}
    out = g(images(), specialist())
    out.probabilities.sum().backward()
    assert g.sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad is not None
    assert all(p.grad is None for p in g.sam.image_encoder.parameters())
    for n, p in g.sam.image_encoder.named_parameters():
        assert torch.equal(p, encoder_before[n])
