"""SC-SAM's SAM side: point prompts from the specialist's argmax, learned prompt tokens, and the prompted multi-class
forward of a SAM-family generalist, as pure functions and one module, shared by training (trainer.py) and prediction
(sam_network.py).

Per slice and per class k (background included), SAM gets ``num_points`` positive points drawn uniformly inside the
specialist's argmax region of k and ``num_points`` negative points outside it (SAM's "not a point", label -1, where a
region has fewer pixels), in SAM's (x, y) = (column, row) convention and mapped into the model frame like any prompt of
this package (``geometry.points_to_model``), plus ``num_tokens`` learned tokens of that class computed from the image
embedding (:class:`PromptTokens`, the reference's "super prompt"). The decoder's single-mask output of each class is
one channel of a K-class logit map; a softmax over those channels is SAM's segmentation.

Shapes: slices ``(N, h, w)``, class maps ``(N, h, w)`` int, logits ``(N, K, h, w)``; patches ``(B, C, [D,] H, W)``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

PROMPT_TOKENS_KEY = "prompt_tokens"  # the generalist's sub-module holding the learned tokens


def sample_points(region: torch.Tensor, num_points: int, generator: Optional[torch.Generator] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Points drawn without replacement, uniformly, inside and outside each slice's ``region`` ``(N, h, w)`` bool.

    Returns ``(points, labels)``: ``(N, 2 num_points, 2)`` float pixel coordinates (x, y) = (column, row) in the
    slice, the positives first, and ``(N, 2 num_points)`` long labels: 1 inside, 0 outside, -1 (SAM's padding, its
    coordinates 0) where the region or its complement has fewer than ``num_points`` pixels.
    """
    n, h, w = region.shape
    flat = region.reshape(n, h * w)
    # one uniform key per pixel; the largest keys among a set's pixels are a uniform sample without replacement
    keys = torch.rand((n, h * w), generator=generator).to(region.device)
    points, labels = [], []
    for inside, label in ((flat, 1), (~flat, 0)):
        k = min(num_points, h * w)
        value, index = torch.where(inside, keys, torch.full_like(keys, -1.0)).topk(k, dim=1)
        valid = value >= 0
        xy = torch.stack((index % w, torch.div(index, w, rounding_mode="floor")), -1).float()
        xy = torch.where(valid[..., None], xy, torch.zeros_like(xy))
        lab = torch.where(valid, torch.full_like(index, label), torch.full_like(index, -1))
        if k < num_points:  # a slice with fewer pixels than points
            xy = torch.cat((xy, xy.new_zeros(n, num_points - k, 2)), 1)
            lab = torch.cat((lab, lab.new_full((n, num_points - k), -1)), 1)
        points.append(xy)
        labels.append(lab)
    return torch.cat(points, 1), torch.cat(labels, 1)


class _ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with batch norm and leaky ReLU, dropout between them (the reference's ConvBlock)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU(), nn.Dropout(dropout),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels),
                         nn.LeakyReLU())


class PromptTokens(nn.Module):
    """Learned prompt tokens per class from the image embedding (SC-SAM's "super prompt").

    Per class, as the reference: conv block, max-pool + conv block, conv block, max-pool + conv block, 1x1 conv,
    global average pooling, and an MLP (hidden width 4 x ``channels``, dropout 0.1) to ``num_tokens`` tokens of the
    prompt encoder's width. The reference's width is the embedding's (256); ``channels`` can be smaller (tests).
    ``(N, E, h, w)`` embeddings -> ``(N, K, num_tokens, E)`` tokens.
    """

    def __init__(self, embed_dim: int, num_classes: int, num_tokens: int = 2, channels: Optional[int] = None,
                 dropout: float = 0.1):
        super().__init__()
        c = int(channels or embed_dim)
        self.num_tokens, self.embed_dim = int(num_tokens), int(embed_dim)
        self.per_class = nn.ModuleList(nn.Sequential(
            _ConvBlock(embed_dim, c, dropout), nn.MaxPool2d(2), _ConvBlock(c, c, dropout),
            _ConvBlock(c, c, dropout), nn.MaxPool2d(2), _ConvBlock(c, c, dropout),
            nn.Conv2d(c, c, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(c, 4 * c), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * c, self.num_tokens * self.embed_dim),
            nn.Dropout(dropout)) for _ in range(num_classes))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        n = embeddings.shape[0]
        return torch.stack([head(embeddings).view(n, self.num_tokens, self.embed_dim) for head in self.per_class], 1)


def add_prompt_tokens(generalist, num_classes: int, num_tokens: int = 2, channels: Optional[int] = None):
    """Give an adapted SAM generalist (LoRA / trainable decoder, ``adapt_and_freeze`` done) trainable prompt tokens:
    they become one of its adapted parts, so freezing, ``.train()``, the checkpoint's adapted tensors
    (``lora.adaptable_state_dict``) and their loading cover them like the LoRA matrices. Returns the generalist."""
    if not generalist.config.trainable:
        raise ValueError("prompt tokens are trained with the SAM they prompt: configure lora_rank or train_decoder")
    with torch.random.fork_rng(devices=[]):  # the same start for the same seed (trainer and prediction)
        torch.manual_seed(int(generalist.config.seed))
        tokens = PromptTokens(generalist.sam.prompt_encoder.embed_dim, num_classes, num_tokens, channels)
    generalist.add_module(PROMPT_TOKENS_KEY, tokens.to(generalist.device))
    generalist._adaptable_prefixes = (*generalist._adaptable_prefixes, PROMPT_TOKENS_KEY + ".")
    generalist._adaptable_module_names = (*generalist._adaptable_module_names, PROMPT_TOKENS_KEY)
    return generalist.freeze()


def prompted_slice_logits(generalist, slices: torch.Tensor, class_map: torch.Tensor, num_classes: int,
                          num_points: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """SAM's ``(N, K, h, w)`` logits for ``(N, h, w)`` slices (nnU-Net intensities; ``(N, 3, h, w)`` in colour),
    prompted per class by the ``(N, h, w)`` specialist argmax ``class_map`` (points) and by the learned tokens.
    Gradients reach the generalist's adapted parts when the caller's grad mode is on; ``class_map`` carries none (it
    is a hard map)."""
    from nnunet_foundation.foundation.geometry import points_to_model, resize_from_model, upsample_low_res
    from nnunet_foundation.foundation.sam_decoding import decode_masks

    n, k = slices.shape[0], num_classes
    model_inputs, geometry = generalist._to_model_input(slices.to(generalist.device))
    embeddings = generalist.encode(model_inputs)
    tokens = getattr(generalist, PROMPT_TOKENS_KEY)(embeddings)  # (N, K, T, E)
    # prompts of every (slice, class) pair, slice-major, so that pair p = i K + c decodes slice i for class c
    class_map = class_map.to(generalist.device)
    regions = class_map[:, None] == torch.arange(k, device=class_map.device).view(1, k, 1, 1)
    points, labels = sample_points(regions.reshape(n * k, *slices.shape[-2:]), num_points, generator)
    points = points_to_model(points, geometry)
    prompt_encoder = generalist.sam.prompt_encoder
    # no padding point: the tokens follow the points, as a box would (SAM pads only prompts without a box)
    sparse = torch.cat((prompt_encoder._embed_points(points, labels, pad=False),
                        tokens.reshape(n * k, -1, tokens.shape[-1]).to(embeddings.dtype)), 1)
    dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
        n * k, -1, *prompt_encoder.image_embedding_size)
    with generalist._autocast():
        masks, _ = decode_masks(generalist.sam.mask_decoder, embeddings.repeat_interleave(k, 0),
                                prompt_encoder.get_dense_pe(), sparse, dense)
    low_res = masks[:, :1].float().reshape(n, k, *masks.shape[-2:])  # single-mask output (multimask off)
    return resize_from_model(upsample_low_res(low_res, generalist.img_size), geometry)


def prompted_patch_logits(generalist, images: torch.Tensor, class_map: torch.Tensor, num_classes: int,
                          num_points: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """:func:`prompted_slice_logits` on nnU-Net patches: ``(B, C, [D,] H, W)`` images and ``(B, [D,] H, W)``
    specialist argmax -> ``(B, K, [D,] H, W)`` logits, every slice along the generalist's slicing axis (2D: the
    patch itself), input channel ``config.image_channel`` (``"rgb"``: channels 0-2 as one colour image)."""
    from nnunet_foundation.foundation.config import RGB
    from nnunet_foundation.foundation.generalist import check_inputs
    from nnunet_foundation.foundation.geometry import patch_to_slices, slices_to_patch

    channel = generalist.config.image_channel
    channel = 0 if channel is None else channel
    check_inputs(images, images[:, :1], channel)  # shapes, and a channel (or the 3 colour ones) the input has
    x = images[:, :3] if channel == RGB else images[:, int(channel):int(channel) + 1]
    labels = class_map[:, None].float()
    is_2d = images.ndim == 4
    axis = 0 if is_2d else generalist.slice_axis()
    x, labels = (t.unsqueeze(2) if is_2d else patch_to_slices(t, axis) for t in (x, labels))  # (B, C', S, h, w)
    b, c, s, h, w = x.shape
    slices = x.transpose(1, 2).reshape(b * s, c, h, w)  # slice-major, like the labels
    logits = prompted_slice_logits(generalist, slices[:, 0] if c == 1 else slices,
                                   labels.reshape(b * s, h, w).long(), num_classes, num_points, generator)
    logits = logits.reshape(b, s, num_classes, h, w).transpose(1, 2)  # (B, K, S, h, w)
    return logits[:, :, 0] if is_2d else slices_to_patch(logits, axis)


__all__ = ["PROMPT_TOKENS_KEY", "sample_points", "PromptTokens", "add_prompt_tokens", "prompted_slice_logits",
           "prompted_patch_logits"]
