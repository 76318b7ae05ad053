"""SAM2 / SAM2.1 (Hiera-T/S/B+/L) as generalists, built from the official ``sam2`` package.

Two modes share one builder, :func:`build_sam2_generalist`:

``backend="sam2"`` (:class:`SAM2ImageGeneralist`)
    Image mode, slice by slice, like SAM: the slices that carry a prompt are min-max scaled, ImageNet-normalised and
    squashed to ``image_size x image_size`` (what ``SAM2Transforms`` does to an RGB image), encoded in batches of
    ``encoder_batch_size`` with ``forward_image`` + ``_prepare_backbone_features`` (plus ``no_mem_embed``, as
    ``SAM2ImagePredictor.set_image`` adds it), and all prompts of the call are decoded in ONE call of SAM2's mask
    decoder. ``SAM2ImagePredictor`` decodes one image at a time and repeats its embedding for every prompt; SAM2's
    ``MaskDecoder`` also accepts one embedding per prompt (``repeat_image=False``), so we gather each prompt's image
    embedding and high-resolution features by its slice index instead. Point sets of different lengths are padded with
    label ``-1`` points (SAM2's "not a point"), boxes become two corner points with labels 2 and 3 placed before the
    points (as ``SAM2ImagePredictor._predict`` and ``SAM2VideoPredictor.add_new_points_or_box`` do), and the output is
    the single-mask output (``multimask_output=False``, with SAM2's stability fallback).

``backend="sam2_video"`` (:class:`SAM2VideoGeneralist`)
    The slices of a 3D patch along the slicing axis are the frames of a video. For every batch item and foreground
    class the specialist's prompt on the key slice (largest confident area, :func:`prompts.volume_prompts`) is added
    with ``SAM2VideoPredictor.add_new_points_or_box`` and propagated forward and backward with
    ``propagate_in_video``. ``SAM2VideoPredictor.init_state`` only reads JPEG folders or MP4 files; we build the same
    inference state from an in-memory ``(S, 3, image_size, image_size)`` frame tensor (:meth:`init_state`), with the
    image features of all frames encoded once in batches and cached, so that all classes of an item share them.

Both run frozen, in eval mode and under ``no_grad`` (bfloat16 autocast on CUDA, as the SAM2 examples do).
"""
from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nnunet_foundation.foundation.checkpoints import load_into, read_state_dict
from nnunet_foundation.foundation.config import GeneralistConfig, GeneralistConfigError, single_image_channel
from nnunet_foundation.foundation.generalist import (Generalist, GeneralistOutput, SliceGeneralist, _synchronize,
                                                     assemble_output, check_inputs)
from nnunet_foundation.foundation.geometry import (ResizeGeometry, choose_slice_axis, compute_resize_geometry,
                                                   patch_to_slices, resize_from_model, resize_to_model,
                                                   to_sam2_intensities, upsample_low_res)
from nnunet_foundation.foundation.prompts import PromptSet, SlicePrompt, generate_prompts, volume_prompts

# model_type -> suffix of the official config files configs/sam2.1/sam2.1_hiera_<suffix>.yaml
_CONFIG_SUFFIX = {"hiera_t": "t", "hiera_s": "s", "hiera_b+": "b+", "hiera_l": "l"}
# labels SAM2's prompt encoder gives to padding points and to the two corners of a box
_PAD_LABEL, _BOX_LABELS = -1, (2, 3)
# one object per tracking run: every class is tracked on its own, so the SAM2 object id is always the same
_OBJECT_ID = 1


# ------------------------------------------------------------------------------------------------------ building
# how to fix a checkpoint / model_type mismatch (completes CheckpointError messages)
_TYPE_HINT = ("set the generalist's model_type to the one the file holds (hiera_t, hiera_s, hiera_b+, hiera_l for the "
              "released SAM2.1/SAM2 checkpoints; 'tiny' for the test models)")


def _is_sam2_0_checkpoint(state_dict: Dict[str, torch.Tensor]) -> bool:
    """SAM 2.0 files have the Hiera keys but not the SAM2.1 additions (spatial no-object embedding, projected temporal
    encoding of object pointers); they need the configs/sam2/ model definition."""
    return ("image_encoder.trunk.patch_embed.proj.weight" in state_dict
            and "no_obj_embed_spatial" not in state_dict and "obj_ptr_tpos_proj.weight" not in state_dict)


def build_sam2_model(config: GeneralistConfig, video: bool):
    """The official SAM2 module (``SAM2Base``, or ``SAM2VideoPredictor`` if ``video``) with the checkpoint loaded.

    Released types are instantiated from sam2's own config files through ``sam2.build_sam`` (hydra) on the CPU and
    without a checkpoint: we load the file ourselves, safely (``weights_only``) and strictly, with errors that name
    the file and the model it seems to hold. Nothing is downloaded.
    """
    expected = f"SAM2 {config.model_type}"
    state_dict = read_state_dict(config.checkpoint, expected) if config.checkpoint is not None else None
    if config.model_type == "tiny":
        from nnunet_foundation.foundation.tiny import build_tiny_sam2

        model = build_tiny_sam2(video=video)
    else:
        from sam2.build_sam import build_sam2, build_sam2_video_predictor

        version = "sam2" if state_dict is not None and _is_sam2_0_checkpoint(state_dict) else "sam2.1"
        config_file = f"configs/{version}/{version}_hiera_{_CONFIG_SUFFIX[config.model_type]}.yaml"
        builder = build_sam2_video_predictor if video else build_sam2
        model = builder(config_file, ckpt_path=None, device="cpu", mode="eval")
    if state_dict is not None:
        load_into(model, state_dict, config.checkpoint, expected, _TYPE_HINT)
    return model.eval()


def build_sam2_generalist(config: GeneralistConfig) -> Generalist:
    """Registry entry of ``"sam2"`` (image mode) and ``"sam2_video"`` (propagation): a frozen generalist."""
    if config.trainable:
        # no adaptation (LoRA, decoder training, multi-class head) is implemented for SAM2's modules; ignoring the
        # settings would silently train nothing
        raise GeneralistConfigError(f"generalist backend {config.backend!r} runs SAM2 frozen: lora_rank, "
                                    f"train_decoder and multiclass_head are not supported for SAM2")
    if config.stitch:
        raise GeneralistConfigError(f"stitch is not implemented for backend {config.backend!r} (only 'sam' and "
                                    f"'medsam'); remove it from the generalist configuration")
    video = config.backend == "sam2_video"
    model = build_sam2_model(config, video=video)
    generalist = SAM2VideoGeneralist(config, model) if video else SAM2ImageGeneralist(config, model)
    return generalist.freeze()


# ------------------------------------------------------------------------------------------------------ helpers
def _autocast(device: torch.device):
    """bfloat16 autocast on CUDA (how SAM2 is meant to run there); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _flat_to_maps(feats: Sequence[torch.Tensor], sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """SAM2's flattened ``(HW, N, C)`` features -> ``(N, C, H, W)`` maps."""
    return [f.permute(1, 2, 0).reshape(f.shape[1], f.shape[2], *s) for f, s in zip(feats, sizes)]


def to_sam2_frames(slices: torch.Tensor, image_size: int) -> Tuple[torch.Tensor, ResizeGeometry]:
    """``(N, h, w)`` nnU-Net intensities -> ``(N, 3, T, T)`` SAM2 inputs and the (squashing) resize geometry.

    Normalising before resizing equals ``SAM2Transforms`` (resize, then normalise): both are per-pixel affine / linear.
    """
    geometry = compute_resize_geometry(slices.shape[-2:], image_size, keep_aspect=False)
    return resize_to_model(to_sam2_intensities(slices), geometry), geometry


# ------------------------------------------------------------------------------------------------------ image mode
class SAM2ImageGeneralist(SliceGeneralist):
    """SAM2 in image mode applied to the slices of nnU-Net patches. ``self.sam2`` is the official ``SAM2Base``."""

    def __init__(self, config: GeneralistConfig, sam2_model):
        super().__init__(config)
        self.sam2 = sam2_model
        self.image_size = int(sam2_model.image_size)

    # ------------------------------------------------------------------------------------ image side
    def encode(self, model_inputs: torch.Tensor) -> Dict[str, object]:
        """``(N, 3, T, T)`` -> ``{"image_embed": (N, C, T/16, T/16), "high_res_feats": [(N, C/8, T/4, T/4),
        (N, C/4, T/8, T/8)] or None}``, the features ``SAM2ImagePredictor.set_image_batch`` computes."""
        model = self.sam2
        levels: List[List[torch.Tensor]] = []
        with _autocast(self.device):
            for start in range(0, model_inputs.shape[0], self.config.encoder_batch_size):
                backbone_out = model.forward_image(model_inputs[start:start + self.config.encoder_batch_size])
                _, feats, _, sizes = model._prepare_backbone_features(backbone_out)
                if model.directly_add_no_mem_embed:
                    # an image is a video's first frame without memory: SAM2 was trained with this embedding there
                    feats[-1] = feats[-1] + model.no_mem_embed
                levels.append(_flat_to_maps(feats, sizes))
        maps = [torch.cat(level) for level in zip(*levels)]
        return {"image_embed": maps[-1], "high_res_feats": maps[:-1] or None}

    # ------------------------------------------------------------------------------------ prompts
    def prompt_inputs(self, prompts: Sequence[SlicePrompt], geometry: ResizeGeometry
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
                                 Optional[torch.Tensor]]:
        """Model-frame prompt tensors for a batch of prompts.

        Returns:
            ``(P, n, 2)`` coordinates and ``(P, n)`` int32 labels of box corners (labels 2, 3, first) and points,
            padded with label -1 (``None`` when no prompt has points or a box); ``(M, 1, m, m)`` mask inputs at the
            prompt encoder's mask size for the ``M`` prompts with a mask and the ``(P,)`` bool selecting them
            (``None, None`` without mask prompts).
        """
        device = self.device
        sx, sy = geometry.scale_xy
        scale = torch.tensor([sx, sy], dtype=torch.float32, device=device)
        with_box = any(p.box is not None for p in prompts)
        width = (2 if with_box else 0) + max(p.num_points for p in prompts)
        coords = labels = None
        if width > 0:
            coords = torch.zeros((len(prompts), width, 2), dtype=torch.float32, device=device)
            labels = torch.full((len(prompts), width), _PAD_LABEL, dtype=torch.int32, device=device)
            for i, p in enumerate(prompts):
                if p.box is not None:
                    coords[i, :2] = p.box.to(device).float().view(2, 2) * scale
                    labels[i, :2] = torch.tensor(_BOX_LABELS, dtype=torch.int32, device=device)
                offset = 2 if with_box else 0
                if p.num_points:
                    coords[i, offset:offset + p.num_points] = p.points.to(device).float() * scale
                    labels[i, offset:offset + p.num_points] = p.labels.to(device=device, dtype=torch.int32)
        has_mask = torch.tensor([p.mask is not None for p in prompts], dtype=torch.bool, device=device)
        masks = None
        if bool(has_mask.any()):
            size = self.sam2.sam_prompt_encoder.mask_input_size
            mask_geometry = compute_resize_geometry(geometry.original_hw, size[0], keep_aspect=False)
            masks = torch.cat([resize_to_model(p.mask.to(device).float()[None, None], mask_geometry)
                               for p in prompts if p.mask is not None])
        return coords, labels, masks, (has_mask if masks is not None else None)

    # ------------------------------------------------------------------------------------ decoder
    def decode(self, features: Dict[str, object], image_index: Sequence[int], prompts: Sequence[SlicePrompt],
               geometry: ResizeGeometry) -> Tuple[torch.Tensor, torch.Tensor]:
        """All prompts in one mask-decoder call: ``(P, 1, T/4, T/4)`` low-res logits and ``(P,)`` predicted IoU."""
        pe = self.sam2.sam_prompt_encoder
        index = torch.as_tensor(list(image_index), dtype=torch.long, device=self.device)
        coords, labels, masks, has_mask = self.prompt_inputs(prompts, geometry)
        if coords is None:
            if has_mask is None or not bool(has_mask.all()):
                raise ValueError("a prompt without points, box or mask cannot be decoded")
            sparse, dense = pe(points=None, boxes=None, masks=masks)
        else:
            sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
            if masks is not None:
                # prompts with a mask get its embedding, the others keep SAM2's learned "no mask" embedding
                dense = dense.clone()
                dense[has_mask] = pe(points=None, boxes=None, masks=masks)[1]
        high_res = features["high_res_feats"]
        with _autocast(self.device):
            low_res, iou, _, _ = self.sam2.sam_mask_decoder(
                image_embeddings=features["image_embed"][index],
                image_pe=pe.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
                repeat_image=False,  # one (gathered) image embedding per prompt
                high_res_features=[f[index] for f in high_res] if high_res is not None else None,
            )
        return low_res.float(), iou[:, 0].float()

    # ------------------------------------------------------------------------------------ the backend method
    def segment_slices(self, slices: torch.Tensor, prompts: Sequence[SlicePrompt], image_index: Sequence[int]
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        model_inputs, geometry = to_sam2_frames(slices.to(self.device), self.image_size)
        features = self.encode(model_inputs)
        low_res, iou = self.decode(features, image_index, prompts, geometry)
        logits = resize_from_model(upsample_low_res(low_res, self.image_size), geometry)
        return logits[:, 0], iou, slices.shape[0]


# ------------------------------------------------------------------------------------------------------ video mode
@contextlib.contextmanager
def _quiet_propagation():
    """``propagate_in_video`` wraps its frame loop in a tqdm bar; called for every class of every training batch it
    would flood the logs, so the bar is replaced by the bare iterable for the duration of the call."""
    import sam2.sam2_video_predictor as video_module

    original = video_module.tqdm
    video_module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        video_module.tqdm = original


def _has_connected_components_kernel() -> bool:
    """Whether sam2 was built with its CUDA extension (``SAM2_BUILD_CUDA=0`` installs skip it)."""
    try:
        from sam2 import _C  # noqa: F401
    except ImportError:
        return False
    return True


class SAM2VideoGeneralist(Generalist):
    """SAM2's video predictor propagating specialist prompts through the slices of a volume.

    ``self.sam2`` is the official ``SAM2VideoPredictor``. Per batch item all frames are encoded once (batched);
    per foreground class the tracking state is reset, the key-slice prompt is added and propagated in both
    directions. Confidence is SAM2's object score (sigmoid of its object-score logit) of each frame.

    SAM2's video predictor takes either clicks/a box or a mask on a frame: a prompt's mask is used only when it has
    neither points nor a box.
    """

    def __init__(self, config: GeneralistConfig, predictor):
        super().__init__(config)
        self.sam2 = predictor
        self.image_size = int(predictor.image_size)
        self._generator = torch.Generator().manual_seed(int(config.seed))
        # the hole filling of build_sam2_video_predictor needs sam2's CUDA kernel; without it (or on the CPU) SAM2
        # skips it with a warning on every frame, so it is switched off there, with the same result
        self._fill_hole_area = int(getattr(predictor, "fill_hole_area", 0))

    def slice_axis(self) -> int:
        return self.config.axis if self.config.axis is not None else choose_slice_axis(self.config.spacing)

    def configure_hole_filling(self) -> None:
        """SAM2's hole filling where its CUDA kernel is there; off elsewhere (same result, no warning per frame)."""
        self.sam2.fill_hole_area = self._fill_hole_area if (
            self.device.type == "cuda" and _has_connected_components_kernel()) else 0

    # ------------------------------------------------------------------------------------ inference state
    def encode_frames(self, frames: torch.Tensor) -> List[Dict[str, List[torch.Tensor]]]:
        """``forward_image`` of every frame, batched by ``encoder_batch_size``, split into per-frame backbone outputs
        shaped like a single-frame ``forward_image`` (batch dimension 1)."""
        per_frame: List[Dict[str, List[torch.Tensor]]] = []
        shared_pos: Optional[List[torch.Tensor]] = None
        for start in range(0, frames.shape[0], self.config.encoder_batch_size):
            out = self.sam2.forward_image(frames[start:start + self.config.encoder_batch_size])
            if shared_pos is None:
                # the sine position encoding depends on the feature size only: one copy serves every frame
                shared_pos = [pos[:1].clone() for pos in out["vision_pos_enc"]]
            for i in range(out["backbone_fpn"][0].shape[0]):
                per_frame.append({"backbone_fpn": [feat[i:i + 1] for feat in out["backbone_fpn"]],
                                  "vision_pos_enc": list(shared_pos)})
        return per_frame

    def init_state(self, frames: torch.Tensor, video_hw: Tuple[int, int]) -> Dict[str, object]:
        """The inference state of ``SAM2VideoPredictor.init_state``, built from in-memory frames.

        Args:
            frames: ``(S, 3, T, T)`` preprocessed frames (see :func:`to_sam2_frames`), on the model's device.
            video_hw: ``(h, w)`` of the slices: prompts are given and masks returned in slice pixels.

        ``init_state`` loads the frames from files and caches the features of frame 0 only (any other frame is
        encoded when visited, again in every propagation pass); here the features of all frames are computed up front
        and cached, and SAM2 looks a frame up in that cache before encoding it.
        """
        device = self.device
        cached = {f: (frames[f:f + 1], backbone_out) for f, backbone_out in enumerate(self.encode_frames(frames))}
        return {
            "images": frames,
            "num_frames": int(frames.shape[0]),
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": int(video_hw[0]),
            "video_width": int(video_hw[1]),
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": cached,
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    # ------------------------------------------------------------------------------------ tracking
    def track(self, state: Dict[str, object], prompts: Sequence[SlicePrompt]
              ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Segment one object through the video from its key-frame prompt(s).

        Returns:
            ``(S, h, w)`` mask logits at slice resolution (frames the object is judged absent on hold SAM2's
            no-object score, -1024) and ``(S,)`` object scores in [0, 1] (``None`` if the model predicts none).
        """
        predictor = self.sam2
        predictor.reset_state(state)  # keeps the cached frame features, clears objects, prompts and memories
        for p in prompts:
            if p.num_points == 0 and p.box is None:
                if p.mask is None:
                    raise ValueError("a prompt without points, box or mask cannot be tracked")
                predictor.add_new_mask(state, p.slice_index, _OBJECT_ID, p.mask > 0)
                continue
            predictor.add_new_points_or_box(
                state, p.slice_index, _OBJECT_ID,
                points=p.points.float() if p.num_points else None,
                labels=p.labels.to(torch.int32) if p.num_points else None,
                box=p.box.float() if p.box is not None else None,
                normalize_coords=True,  # slice pixels -> [0, 1] -> model pixels, by SAM2 itself
            )
        from sam2.modeling.sam2_base import NO_OBJ_SCORE

        start = min(p.slice_index for p in prompts)
        num_frames, h, w = state["num_frames"], state["video_height"], state["video_width"]
        logits = torch.full((num_frames, h, w), float(NO_OBJ_SCORE), device=self.device)
        with _quiet_propagation():
            for reverse in (False, True):
                for frame, _, masks in predictor.propagate_in_video(state, start_frame_idx=start, reverse=reverse):
                    logits[frame] = masks[0, 0].float()
        scores = None
        if predictor.pred_obj_scores:
            outputs = state["output_dict_per_obj"][0]  # index 0: the only object of this run
            scores = torch.zeros(num_frames, device=self.device)
            for frame in range(num_frames):
                out = outputs["cond_frame_outputs"].get(frame)
                if out is None:
                    out = outputs["non_cond_frame_outputs"].get(frame)
                if out is not None:
                    scores[frame] = torch.sigmoid(out["object_score_logits"].float()).flatten()[0]
        return logits, scores

    def key_prompts(self, prob_slices: torch.Tensor, prompts: Optional[PromptSet]
                    ) -> Dict[Tuple[int, int], List[SlicePrompt]]:
        """The conditioning prompts per (batch item, foreground class).

        Generated: the specialist's 2D prompt on the class's key slice (largest confident area of its 3D components);
        if 2D filtering left nothing there (``min_component_size``), its largest 2D prompt on any slice.
        Given a :class:`PromptSet`: all its prompts of the class, each slice becoming a conditioning frame.
        """
        grouped: Dict[Tuple[int, int], List[SlicePrompt]] = {}
        if prompts is not None:
            for p in prompts:
                if p.class_index > 0:
                    grouped.setdefault((p.batch_index, p.class_index), []).append(p)
            return grouped
        settings = self.config.prompt_settings()
        keys = volume_prompts(prob_slices, settings)
        if not keys:
            return grouped
        on_key_slices = generate_prompts(prob_slices, settings, self._generator,
                                         slice_indices=sorted({vp.key_slice for vp in keys}))
        by_slice = {(p.batch_index, p.class_index, p.slice_index): p for p in on_key_slices}
        for vp in keys:
            prompt = by_slice.get((vp.batch_index, vp.class_index, vp.key_slice))
            if prompt is None:
                candidates = [p for p in generate_prompts(prob_slices[vp.batch_index:vp.batch_index + 1], settings,
                                                          self._generator) if p.class_index == vp.class_index]
                if not candidates:
                    continue
                prompt = max(candidates, key=lambda p: p.area)
                prompt.batch_index = vp.batch_index
            grouped[(vp.batch_index, vp.class_index)] = [prompt]
        return grouped

    # ------------------------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, specialist_probs: torch.Tensor,
                prompts: Optional[PromptSet] = None, cache_keys: Optional[Sequence[str]] = None
                ) -> GeneralistOutput:
        # cache_keys: accepted for the common interface; a video state encodes each item's frames once anyway
        check_inputs(images, specialist_probs, self.config.image_channel)
        is_2d = images.ndim == 4
        axis = 0 if is_2d else self.slice_axis()
        device = self.device
        _synchronize(device)
        t0 = time.perf_counter()
        channel = single_image_channel(self.config, "SAM2's video propagation")
        image_slices = images[:, channel:channel + 1]
        image_slices = image_slices.unsqueeze(2) if is_2d else patch_to_slices(image_slices, axis)
        prob_slices = specialist_probs.unsqueeze(2) if is_2d else patch_to_slices(specialist_probs, axis)
        b_count, k_count, s_count, h, w = prob_slices.shape

        conditioning = self.key_prompts(prob_slices, prompts)
        foreground = torch.zeros((b_count, k_count, s_count, h, w), device=device, dtype=torch.float32)
        confidence = torch.zeros_like(foreground)
        prompted = torch.zeros((b_count, k_count), dtype=torch.bool, device=device)
        prompted[:, 0] = True
        has_scores = bool(self.sam2.pred_obj_scores)
        self.configure_hole_filling()
        num_encoded = 0
        covered_slices = torch.zeros((b_count, s_count), dtype=torch.bool)
        with torch.no_grad(), _autocast(device):
            for b in range(b_count):
                classes = sorted(k for (bb, k) in conditioning if bb == b)
                if not classes:
                    continue  # nothing to segment: the item's frames are not encoded at all
                covered_slices[b] = True  # propagation segments every frame of the item
                frames, _ = to_sam2_frames(image_slices[b, 0].to(device), self.image_size)
                state = self.init_state(frames, (h, w))
                num_encoded += s_count
                for k in classes:
                    logits, scores = self.track(state, conditioning[(b, k)])
                    foreground[b, k] = torch.sigmoid(logits)
                    prompted[b, k] = True
                    if scores is not None:
                        confidence[b, k] = scores.view(-1, 1, 1).expand(-1, h, w)
                del state
        return assemble_output(foreground, confidence, prompted, has_scores, self.config.background, is_2d, axis,
                               device, t0, num_encoded, covered_slices)
