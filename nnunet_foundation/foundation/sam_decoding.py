"""SAM's mask decoder run on a batch of prompts that belong to different images, shared by the prompted generalists
(sam_backend) and the prompt-free multi-class head (lora)."""
from __future__ import annotations

from typing import Tuple

import torch


def decode_masks(mask_decoder, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                 sparse: torch.Tensor, dense: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` with one image embedding per prompt: ``(P, C, h, w)`` embeddings, ``(P, T, C)``
    sparse and ``(P, C, h, w)`` dense prompt embeddings -> all ``(P, M, 4h, 4w)`` mask logits and ``(P, M)`` IoU
    predictions (M = 1 + number of multimask outputs; index 0 is the single-mask output)."""
    d = mask_decoder
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse), dim=1)
    src = image_embeddings + dense
    pos_src = image_pe.expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = d.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1:1 + d.num_mask_tokens, :]
    upscaled = d.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], 1)
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    return masks, d.iou_prediction_head(iou_token_out)
