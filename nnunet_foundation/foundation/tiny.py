"""Tiny, randomly initialised SAM / SAM2 models built from the *real* classes of ``segment_anything`` and ``sam2``.

They exist so that the whole foundation-model layer (checkpoint loading, slicing, prompting, decoding, video
propagation, LoRA) can be exercised on a CPU in seconds without downloading pretrained weights. They produce
meaningless masks, but every tensor goes through exactly the code path that a real checkpoint takes: the backends
accept ``model_type="tiny"`` and then load the checkpoint file written by :func:`save_tiny_sam_checkpoint` /
:func:`save_tiny_sam2_checkpoint` in the official on-disk formats (SAM: a plain ``state_dict``; SAM2:
``{"model": state_dict}``).

The dimensions are recorded in :data:`TINY_SAM_CONFIG` / :data:`TINY_SAM2_CONFIG` so that a checkpoint saved by one
process is loadable by another.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Dict, Union

import torch

# Small enough that an encoder call on a 64x64 input takes milliseconds on one CPU core, large enough that every
# architectural feature is active (windowed + global attention, relative positions, two-way decoder, 3 multimask
# outputs). The image embedding is img_size / patch_size = 8x8, the low-res masks are 32x32.
TINY_SAM_CONFIG: Dict[str, Any] = dict(
    img_size=64,
    patch_size=8,
    encoder_embed_dim=32,
    encoder_depth=2,
    encoder_num_heads=2,
    encoder_global_attn_indexes=(1,),
    window_size=4,
    prompt_embed_dim=32,
    decoder_depth=2,
    decoder_mlp_dim=64,
    decoder_num_heads=2,
    iou_head_hidden_dim=32,
)

# SAM2 hard-codes some decoder sizes (8 heads, mlp 2048); d_model must be divisible by 8 and by 4 for the axial RoPE.
# image_size 128 gives the stride-16 embedding of 8x8 and high-resolution features of 32x32 and 16x16.
TINY_SAM2_CONFIG: Dict[str, Any] = dict(
    image_size=128,
    trunk_embed_dim=8,
    trunk_stages=(1, 1, 2, 1),
    trunk_window_spec=(4, 4, 4, 2),
    trunk_global_att_blocks=(3,),
    d_model=32,
    mem_dim=16,
    memory_attention_layers=1,
    num_maskmem=7,
)


def build_tiny_sam(**overrides: Any):
    """A randomly initialised ``segment_anything.modeling.Sam`` with the dimensions of :data:`TINY_SAM_CONFIG`.

    ``overrides`` replace entries of the tiny config (e.g. ``img_size=128``); a checkpoint is only loadable into a
    model built with the same dimensions.
    """
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    unknown = set(overrides) - set(TINY_SAM_CONFIG)
    if unknown:
        raise ValueError(f"unknown tiny SAM setting(s) {sorted(unknown)}; valid: {sorted(TINY_SAM_CONFIG)}")
    c = {**TINY_SAM_CONFIG, **overrides}
    embedding_size = c["img_size"] // c["patch_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=c["img_size"],
            patch_size=c["patch_size"],
            embed_dim=c["encoder_embed_dim"],
            depth=c["encoder_depth"],
            num_heads=c["encoder_num_heads"],
            mlp_ratio=4,
            out_chans=c["prompt_embed_dim"],
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            window_size=c["window_size"],
            global_attn_indexes=tuple(c["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_embed_dim"],
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(c["img_size"], c["img_size"]),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=c["decoder_depth"],
                embedding_dim=c["prompt_embed_dim"],
                mlp_dim=c["decoder_mlp_dim"],
                num_heads=c["decoder_num_heads"],
            ),
            transformer_dim=c["prompt_embed_dim"],
            iou_head_depth=3,
            iou_head_hidden_dim=c["iou_head_hidden_dim"],
        ),
    ).eval()


def build_tiny_sam2(video: bool = False, **overrides: Any):
    """A randomly initialised SAM2 model (``SAM2Base``, or ``SAM2VideoPredictor`` if ``video``) from the real classes.

    The flags mirror ``configs/sam2.1/sam2.1_hiera_t.yaml`` (high-res decoder features, object pointers, object
    score prediction, multimask tracking, ...) and the post-processing overrides that ``sam2.build_sam`` applies,
    so the tiny model exercises the same branches as Hiera-T. Image and video variants share their state-dict keys.
    """
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention

    unknown = set(overrides) - set(TINY_SAM2_CONFIG)
    if unknown:
        raise ValueError(f"unknown tiny SAM2 setting(s) {sorted(unknown)}; valid: {sorted(TINY_SAM2_CONFIG)}")
    c = {**TINY_SAM2_CONFIG, **overrides}
    d_model, mem_dim, image_size = c["d_model"], c["mem_dim"], c["image_size"]
    feat = image_size // 16

    trunk = Hiera(
        embed_dim=c["trunk_embed_dim"],
        num_heads=1,
        stages=tuple(c["trunk_stages"]),
        window_spec=tuple(c["trunk_window_spec"]),
        global_att_blocks=tuple(c["trunk_global_att_blocks"]),
        window_pos_embed_bkg_spatial_size=(4, 4),
    )
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, image_size=image_size),
        d_model=d_model,
        backbone_channel_list=list(trunk.channel_list),
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    image_encoder = ImageEncoder(trunk=trunk, neck=neck, scalp=1)

    def rope_attention(**extra):
        return RoPEAttention(rope_theta=10000.0, feat_sizes=(feat, feat), embedding_dim=d_model, num_heads=1,
                             downsample_rate=1, dropout=0.0, **extra)

    memory_attention = MemoryAttention(
        d_model=d_model,
        pos_enc_at_input=True,
        layer=MemoryAttentionLayer(
            activation="relu", d_model=d_model, dim_feedforward=2 * d_model, dropout=0.0, pos_enc_at_attn=False,
            self_attention=rope_attention(),
            cross_attention=rope_attention(rope_k_repeat=True, kv_in_dim=mem_dim),
            pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False,
        ),
        num_layers=c["memory_attention_layers"],
    )
    memory_encoder = MemoryEncoder(
        out_dim=mem_dim,
        in_dim=d_model,
        position_encoding=PositionEmbeddingSine(num_pos_feats=mem_dim, normalize=True, image_size=image_size),
        mask_downsampler=MaskDownSampler(embed_dim=d_model, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=d_model, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True),
                    num_layers=1),
    )
    kwargs = dict(
        image_encoder=image_encoder,
        memory_attention=memory_attention,
        memory_encoder=memory_encoder,
        num_maskmem=c["num_maskmem"],
        image_size=image_size,
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True,
        multimask_output_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True,
        multimask_min_pt_num=0,
        multimask_max_pt_num=1,
        use_mlp_for_obj_ptr_proj=True,
        # the post-processing that sam2.build_sam applies by default
        sam_mask_decoder_extra_args=dict(dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
                                         dynamic_multimask_stability_thresh=0.98),
    )
    if video:
        from sam2.sam2_video_predictor import SAM2VideoPredictor

        model = SAM2VideoPredictor(binarize_mask_from_pts_for_mem_enc=True, **kwargs)
    else:
        from sam2.modeling.sam2_base import SAM2Base

        model = SAM2Base(**kwargs)
    return model.eval()


def save_tiny_sam_checkpoint(path: Union[str, Path], seed: int = 0) -> Path:
    """Build a tiny SAM with a fixed seed and save it like the official SAM files: a plain ``state_dict``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_sam()
    torch.save(model.state_dict(), path)
    return path


def save_tiny_sam2_checkpoint(path: Union[str, Path], seed: int = 0) -> Path:
    """Build a tiny SAM2 with a fixed seed and save it like the official SAM2 files: ``{"model": state_dict}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_tiny_sam2(video=False)
    torch.save({"model": model.state_dict()}, path)
    return path
