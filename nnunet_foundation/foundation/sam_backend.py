"""SAM (ViT-B/L/H) and MedSAM as slice-wise generalists, built from the official ``segment_anything`` package.

Per call: the slices that carry a prompt are mapped to the model's intensities (SAM: per-slice min-max to [0, 255],
grey to RGB, the checkpoint's ``pixel_mean``/``pixel_std``; MedSAM: min-max to [0, 1]) and size (SAM: longest side
to 1024 and zero padding, as ``ResizeLongestSide``; MedSAM: squashed to 1024 x 1024, as MedSAM was trained),
encoded in batches of ``encoder_batch_size`` (autocast to bfloat16 on CUDA), and all prompts are decoded in one
batched call of SAM's mask decoder. Optional SFR-style stitching tiles several small slices into one mosaic so that
one encoder call serves them all; the prompts of a slice are then confined to its tile (coordinates shifted, the mask
prompt placed in the tile, the output cropped from it).

Batched decoding: ``MaskDecoder.predict_masks`` expects one image and repeats its embedding for every prompt, so a
batch of prompts on different slices would need one call per slice. :func:`decode_masks` runs the same layers in the
same order with one embedding per prompt instead; ``tests/test_foundation_sam.py`` checks it against
``MaskDecoder.forward`` prompt by prompt.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from nnunet_foundation.foundation.checkpoints import load_checkpoint
from nnunet_foundation.foundation.config import GeneralistConfig
from nnunet_foundation.foundation.generalist import SliceGeneralist
from nnunet_foundation.foundation.geometry import (StitchLayout, auto_stitch_grid, boxes_to_model,
                                                   compute_resize_geometry, points_to_model, resize_from_model,
                                                   resize_to_model, stitch, to_medsam_intensities,
                                                   to_sam_intensities, upsample_low_res)
from nnunet_foundation.foundation.prompts import SlicePrompt
from nnunet_foundation.foundation.sam_decoding import decode_masks

def cpu_has_bfloat16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX): there autocast halves the encoder time
    (LiteMedSAM: 2x on this project's EPYC machine) at a 4% embedding error; elsewhere it would be emulated, slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def use_bfloat16(precision: str, device: torch.device) -> bool:
    """``precision`` ``auto``: bfloat16 autocast on CUDA and on CPUs with native bfloat16, float32 elsewhere."""
    if precision == "float32":
        return False
    if precision == "bfloat16":
        return True
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bfloat16())


# logit given to the part of a mosaic's mask prompt outside a slice's tile: "surely not this object"
_OUTSIDE_TILE_LOGIT = -20.0


def build_sam_model(config: GeneralistConfig):
    """The ``segment_anything`` ``Sam`` module for ``config.model_type``, with the checkpoint loaded strictly."""
    from segment_anything import sam_model_registry

    from nnunet_foundation.foundation.tiny import build_tiny_sam

    family = "MedSAM" if config.backend == "medsam" else "SAM"
    if config.model_type == "tiny":
        model = build_tiny_sam()
    else:
        # the registry builders only read a checkpoint when given one; we load it ourselves (weights_only, strict)
        model = sam_model_registry[config.model_type](checkpoint=None)
    if config.checkpoint is not None:
        valid = "vit_b" if config.backend == "medsam" else "vit_b, vit_l, vit_h"
        load_checkpoint(model, config.checkpoint, expected=f"{family} {config.model_type}",
                        type_hint=f"set the generalist's model_type to the one the file holds ({valid}; 'tiny' "
                                  f"for the test models)")
    return model


def build_sam_generalist(config: GeneralistConfig) -> "SAMGeneralist":
    return adapt_and_freeze(SAMGeneralist(config, build_sam_model(config)))


def adapt_and_freeze(generalist: "SAMGeneralist") -> "SAMGeneralist":
    """The last step of building a SAM-family generalist: the LoRA / decoder / head its config asks for, then
    everything else frozen."""
    if generalist.config.trainable:
        from nnunet_foundation.foundation.lora import make_adaptable

        make_adaptable(generalist)
    return generalist.freeze()


class SAMGeneralist(SliceGeneralist):
    """SAM / MedSAM applied to the slices of nnU-Net patches. ``self.sam`` is the official ``Sam`` module."""

    def __init__(self, config: GeneralistConfig, sam):
        super().__init__(config)
        self.sam = sam
        self.img_size = int(sam.image_encoder.img_size)
        # MedSAM was trained on squashed 1024 x 1024 inputs; SAM keeps the aspect ratio (ResizeLongestSide)
        self.keep_aspect = config.backend != "medsam"
        self.multiclass_head = None  # set by lora.make_adaptable for prompt-free multi-class decoding
        # least recently used first; embeddings kept on their device (see cached_encode)
        self._embedding_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._cache_bytes = 0
        self.cache_hits = 0
        # stitched mosaics encoded ahead of their prompts (prefetch_stitched): key -> (mosaic index, tile offset)
        self._prefetched: dict = {}
        self._prefetched_mosaics: Optional[torch.Tensor] = None
        self._prefetched_tile = 0

    # ------------------------------------------------------------------------------------ image side
    def to_model_intensities(self, slices: torch.Tensor) -> torch.Tensor:
        """``(N, h, w)`` nnU-Net intensities -> ``(N, 3, h, w)`` in the units the encoder was trained on."""
        if self.config.backend == "medsam":
            return to_medsam_intensities(slices)
        return to_sam_intensities(slices, self.sam.pixel_mean.flatten(), self.sam.pixel_std.flatten())

    def _to_model_input(self, slices: torch.Tensor, size: Optional[int] = None) -> Tuple[torch.Tensor, object]:
        """``(N, h, w)`` nnU-Net intensities -> ``(N, 3, S, S)`` encoder input (or stitching tiles of ``size``)
        and its resize geometry."""
        geometry = compute_resize_geometry(slices.shape[-2:], size or self.img_size, keep_aspect=self.keep_aspect)
        # SAM pads after normalisation, so the padding is 0 in normalised units
        return resize_to_model(self.to_model_intensities(slices), geometry), geometry

    def _autocast(self):
        if use_bfloat16(self.config.precision, self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def encode(self, model_inputs: torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, C, T/16, T/16)`` in batches of ``encoder_batch_size``."""
        chunks = []
        # channels-last lets the CPU's convolution kernels (oneDNN) skip layout conversions in the patch embedding
        if self.device.type == "cpu":
            model_inputs = model_inputs.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            for start in range(0, model_inputs.shape[0], self.config.encoder_batch_size):
                chunks.append(self.sam.image_encoder(model_inputs[start:start + self.config.encoder_batch_size]))
        return torch.cat(chunks).float()

    def cached_encode(self, model_inputs: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """:meth:`encode`, reusing embeddings of slices seen before under the same cache key (``cache_embeddings``,
        frozen encoder only: LoRA changes the embeddings). Returns embeddings and images encoded."""
        keys = self._slice_cache_keys
        # an adapted (LoRA) encoder changes with every step: its old embeddings are stale
        if not (self.config.cache_embeddings and keys is not None and self.config.lora_rank == 0):
            return self.encode(model_inputs), model_inputs.shape[0]
        missing = [i for i, k in enumerate(keys) if k not in self._embedding_cache]
        self.cache_hits += len(keys) - len(missing)
        fresh = self.encode(model_inputs[missing]) if missing else None
        limit = self.config.cache_size_mb * 2 ** 20
        for j, i in enumerate(missing):
            self._embedding_cache[keys[i]] = fresh[j]
            self._cache_bytes += fresh[j].numel() * fresh[j].element_size()
        out = []
        for k in keys:
            self._embedding_cache.move_to_end(k)
            out.append(self._embedding_cache[k])
        embeddings = torch.stack(out)
        while self._cache_bytes > limit and len(self._embedding_cache) > len(keys):
            _, dropped = self._embedding_cache.popitem(last=False)
            self._cache_bytes -= dropped.numel() * dropped.element_size()
        return embeddings, len(missing)

    def _stitch_grid(self, hw) -> int:
        return self.config.stitch_grid or auto_stitch_grid(hw, self.img_size)

    def stitches(self, slice_hw) -> bool:
        """Whether slices of this in-plane size are encoded in mosaics (``stitch`` on and room for 2 x 2 tiles)."""
        return bool(self.config.stitch) and self._stitch_grid(tuple(slice_hw)) > 1

    def prefetch_stitched(self, slices: torch.Tensor, keys: Sequence) -> int:
        """Encode ``slices`` ``(N, h, w)`` (or colour ``(N, 3, h, w)``) in mosaics now, for prompts that come one
        slice at a time later (IFL's walk decides each slice's box from the previous slice's mask): a later
        :meth:`segment_slices` whose ``_slice_cache_keys`` are among ``keys`` decodes on its slice's tile of these
        mosaics instead of encoding a mosaic holding that slice alone. Replaces the previous prefetch (one case at a
        time). Returns the number of encoder images (mosaics)."""
        if not self.stitches(slices.shape[-2:]):
            raise ValueError("prefetch_stitched needs stitching: set 'stitch': true for slices of at most half the "
                             "model input")
        if len(keys) != slices.shape[0]:
            raise ValueError(f"{len(keys)} keys for {slices.shape[0]} slices")
        layout = StitchLayout(slices.shape[0], self._stitch_grid(slices.shape[-2:]), self.img_size)
        tiles, _ = self._to_model_input(slices.to(self.device), layout.tile)
        self._prefetched_mosaics = self.encode(stitch(tiles, layout))
        self._prefetched = {key: (layout.location(i)[0], layout.offset_xy(i)) for i, key in enumerate(keys)}
        self._prefetched_tile = layout.tile
        return layout.num_mosaics

    # ------------------------------------------------------------------------------------ prompts
    def _prompt_tensors(self, prompts: Sequence[SlicePrompt], geometry, offsets: Optional[List[Tuple[float, float]]],
                        tile_geometry=None):
        """Points (padded with label -1, SAM's "not a point"), boxes and dense mask prompts in the model frame."""
        device = self.device
        geo = tile_geometry or geometry
        offsets = offsets or [(0.0, 0.0)] * len(prompts)
        max_points = max(p.num_points for p in prompts)
        points = labels = None
        if max_points > 0:
            points = torch.zeros((len(prompts), max_points, 2), device=device)
            labels = torch.full((len(prompts), max_points), -1, dtype=torch.int64, device=device)
            for i, p in enumerate(prompts):
                if p.num_points:
                    points[i, :p.num_points] = points_to_model(p.points.to(device), geo, offsets[i])
                    labels[i, :p.num_points] = p.labels.to(device)
        boxes = None
        if all(p.box is not None for p in prompts):
            boxes = torch.stack([boxes_to_model(p.box.to(device), geo, offsets[i]) for i, p in enumerate(prompts)])
        elif any(p.box is not None for p in prompts):
            raise ValueError("either every prompt of a call has a box or none has (SAM encodes them batched)")
        masks = None
        if all(p.mask is not None for p in prompts):
            low = 4 * self.sam.prompt_encoder.image_embedding_size[0]
            masks = torch.stack([self._mask_prompt(p.mask.to(device).float(), geo, offsets[i], low)
                                 for i, p in enumerate(prompts)])
        if points is None and boxes is None and masks is None:
            raise ValueError("a prompt without points, box or mask cannot be decoded")
        return points, labels, boxes, masks

    def _mask_prompt(self, logit: torch.Tensor, geometry, offset: Tuple[float, float], low: int) -> torch.Tensor:
        """A slice-resolution logit map -> SAM's ``(1, low, low)`` mask input (model frame / 4)."""
        placed = resize_to_model(logit[None, None], geometry, pad_value=_OUTSIDE_TILE_LOGIT)
        if placed.shape[-1] != self.img_size:  # a tile of a mosaic: put it at its offset
            canvas = placed.new_full((1, 1, self.img_size, self.img_size), _OUTSIDE_TILE_LOGIT)
            left, top = int(offset[0]), int(offset[1])
            canvas[..., top:top + placed.shape[-2], left:left + placed.shape[-1]] = placed
            placed = canvas
        return F.interpolate(placed, size=(low, low), mode="bilinear", align_corners=False)[0]

    # ------------------------------------------------------------------------------------ the backend method
    def segment_slices(self, slices: torch.Tensor, prompts: Sequence[SlicePrompt], image_index: Sequence[int]
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        h, w = slices.shape[-2:]
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
        if self.stitches((h, w)):
            keys = self._slice_cache_keys
            if keys is not None and all(k in self._prefetched for k in keys):  # tiles of prefetched mosaics
                tile, encoded = self._prefetched_tile, 0
                embeddings = self._prefetched_mosaics
                mosaic_of = [self._prefetched[k][0] for k in keys]
                slice_offsets = [self._prefetched[k][1] for k in keys]
                tile_geometry = compute_resize_geometry((h, w), tile, keep_aspect=self.keep_aspect)
            else:
                layout = StitchLayout(slices.shape[0], self._stitch_grid((h, w)), self.img_size)
                tile, encoded = layout.tile, layout.num_mosaics
                tiles, tile_geometry = self._to_model_input(slices, tile)
                embeddings = self.encode(stitch(tiles, layout))
                mosaic_of = [layout.location(i)[0] for i in range(slices.shape[0])]
                slice_offsets = [layout.offset_xy(i) for i in range(slices.shape[0])]
            offsets = [slice_offsets[i] for i in image_index]
            points, labels, boxes, masks = self._prompt_tensors(prompts, None, offsets, tile_geometry)
            emb = embeddings[torch.as_tensor(mosaic_of, device=self.device)[index]]
            low_res, iou = self._decode(emb, points, labels, boxes, masks)
            full = upsample_low_res(low_res, self.img_size)
            crops = torch.stack([full[i, :, int(o[1]):int(o[1]) + tile, int(o[0]):int(o[0]) + tile]
                                 for i, o in enumerate(offsets)])
            logits = resize_from_model(crops, tile_geometry)
            return logits[:, 0], iou, encoded
        model_inputs, geometry = self._to_model_input(slices)
        embeddings, encoded = self.cached_encode(model_inputs)
        points, labels, boxes, masks = self._prompt_tensors(prompts, geometry, None)
        low_res, iou = self._decode(embeddings[index], points, labels, boxes, masks)
        logits = resize_from_model(upsample_low_res(low_res, self.img_size), geometry)
        return logits[:, 0], iou, encoded

    def _decode(self, embeddings, points, labels, boxes, masks):
        pe = self.sam.prompt_encoder
        sparse, dense = pe(points=(points, labels) if points is not None else None, boxes=boxes, masks=masks)
        if dense.shape[0] != embeddings.shape[0]:  # no mask prompt: one shared "no mask" embedding
            dense = dense.expand(embeddings.shape[0], -1, -1, -1)
        with self._autocast():
            masks_out, iou = decode_masks(self.sam.mask_decoder, embeddings, pe.get_dense_pe(), sparse, dense)
        # single-mask output (SAM's multimask_output=False): index 0
        return masks_out[:, :1].float(), iou[:, 0].float()
