"""The one interface between trainers and foundation models: :class:`Generalist`.

A trainer hands over a batch of nnU-Net-preprocessed patches and its own softmax; the generalist derives prompts from
that softmax (never from labels), runs the foundation model slice by slice (or volume-wise) and returns per-class
probabilities aligned voxel for voxel with the patch::

    out = generalist(images, specialist_probs)          # (B, C, [D,] H, W), (B, K, [D,] H, W)
    out.probabilities                                   # (B, K, [D,] H, W), channel 0 = background
    out.prompted                                        # (B, K) bool: which classes got a prompt anywhere
    out.confidence                                      # (B, K, [D,] H, W): the model's own score where prompted

Backends subclass :class:`SliceGeneralist` and implement one method, :meth:`SliceGeneralist.segment_slices`, which
maps 2D slices plus their prompts to mask logits at slice resolution; slicing, prompt generation, skipping slices
without prompts, assembling classes and the background, and timing are done here once for all backends.

Frozen by default: parameters do not require gradients, the module stays in eval mode even when the trainer calls
``.train()`` (frozen encoders must not update BatchNorm/dropout state), and inference runs under ``no_grad`` unless a
backend was configured with trainable parts (LoRA, decoder, multi-class head).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from nnunet_foundation.foundation.config import RGB, GeneralistConfig
from nnunet_foundation.foundation.geometry import choose_slice_axis, patch_to_slices, slices_to_patch
from nnunet_foundation.foundation.prompts import PromptSet, SlicePrompt, generate_prompts

COMBINATIONS = ("mean", "agreement")


@dataclass
class GeneralistOutput:
    """What every generalist returns.

    Attributes:
        probabilities: ``(B, K, [D,] H, W)`` per-class probabilities (channel 0 background); a class without any
            prompt in an image has a zero map there (and the background absorbs it).
        prompted: ``(B, K)`` bool, True where the class received at least one prompt (background: always True).
        confidence: ``(B, K, [D,] H, W)`` the model's own quality score (SAM/SAM2 predicted IoU; SAM2 video: object score) of the slice
            prediction that produced each voxel, 0 where the class was not prompted (background: the best
            foreground score at that voxel); ``None`` if the model has none.
        seconds: wall time of the call (synchronised on CUDA), for the trainers' cost logging.
        num_encoded: number of 2D images the image encoder processed (slices, or mosaics when stitching).
        covered: ``(B, 1, [D,] H, W)`` bool, True on the slices the model segmented (at least one prompt there, or
            reached by propagation). Elsewhere ``probabilities`` is "background" only because nothing was asked: a
            trainer must not teach it as background (``None``: everything covered).
    """

    probabilities: torch.Tensor
    prompted: torch.Tensor
    confidence: Optional[torch.Tensor] = None
    seconds: float = 0.0
    num_encoded: int = 0
    covered: Optional[torch.Tensor] = None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def combine_background(foreground: torch.Tensor, mode: str) -> torch.Tensor:
    """``(B, K-1, ...)`` independent per-class foreground probabilities -> ``(B, K, ...)`` with a background map.

    ``max``: background = 1 - max_k p_k (classes are not renormalised: overlapping SAM masks stay as they are);
    ``union``: background = prod_k (1 - p_k); ``renormalize``: ``max`` followed by dividing all maps by their sum,
    which makes the K maps a distribution (what a soft pseudo-label for a softmax network needs).
    """
    if foreground.shape[1] == 0:
        return torch.ones_like(foreground[:, :1].expand(-1, 1, *foreground.shape[2:]))
    if mode == "union":
        background = torch.prod(1.0 - foreground, dim=1, keepdim=True)
    else:
        background = 1.0 - foreground.max(dim=1, keepdim=True).values
    probs = torch.cat([background, foreground], dim=1)
    if mode == "renormalize":
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-6)
    return probs


def assemble_output(foreground: torch.Tensor, confidence: torch.Tensor, prompted: torch.Tensor, has_scores: bool,
                    background: str, is_2d: bool, axis: int, device: torch.device, t0: float, num_encoded: int,
                    covered_slices: torch.Tensor) -> GeneralistOutput:
    """Sliced ``(B, K, S, h, w)`` foreground maps and scores (channel 0 unused) and the ``(B, S)`` slices that were
    segmented -> the patch-aligned output of every slice-based backend: background from the foreground maps, slices
    moved back to the patch layout, timing."""
    probabilities = combine_background(foreground[:, 1:], background)
    if has_scores and foreground.shape[1] > 1:  # the background is defined by the foreground masks: their best score
        confidence[:, 0] = confidence[:, 1:].max(1).values
    covered = covered_slices.to(device)[:, None, :, None, None].expand(-1, 1, -1, *foreground.shape[-2:])
    if is_2d:
        probabilities, confidence, covered = probabilities[:, :, 0], confidence[:, :, 0], covered[:, :, 0]
    else:
        probabilities, confidence, covered = (slices_to_patch(t, axis) for t in (probabilities, confidence, covered))
    _synchronize(device)
    return GeneralistOutput(probabilities=probabilities, prompted=prompted,
                            confidence=confidence if has_scores else None,
                            seconds=time.perf_counter() - t0, num_encoded=num_encoded, covered=covered)


def _index_amax(maps: torch.Tensor, flat_index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``maps`` ``(B, K, S, h, w)`` with ``values`` ``(P, h, w)`` merged in by their maximum at the flat (b, k, s)
    positions ``flat_index`` (several prompts of one class and slice: one per component)."""
    with warnings.catch_warnings():  # index_reduce is marked beta; its amax semantics are what we need
        warnings.simplefilter("ignore", UserWarning)
        return maps.reshape(-1, *maps.shape[-2:]).index_reduce(0, flat_index, values, "amax").view_as(maps)


def check_inputs(images: torch.Tensor, specialist_probs: torch.Tensor, image_channel) -> None:
    """The shapes every generalist's ``forward`` accepts; errors say which."""
    if images.ndim not in (4, 5) or specialist_probs.ndim != images.ndim:
        raise ValueError(f"expected images (B, C, [D,] H, W) and specialist probabilities of the same rank, got "
                         f"{tuple(images.shape)} and {tuple(specialist_probs.shape)}")
    if images.shape[0] != specialist_probs.shape[0] or images.shape[2:] != specialist_probs.shape[2:]:
        raise ValueError(f"images {tuple(images.shape)} and specialist probabilities "
                         f"{tuple(specialist_probs.shape)} differ in batch or spatial size")
    if image_channel == RGB:
        if images.shape[1] < 3:
            raise ValueError(f"image_channel 'rgb' needs the 3 colour channels of a natural image, the input has "
                             f"{images.shape[1]}: give a channel index instead")
    elif not 0 <= image_channel < images.shape[1]:
        raise ValueError(f"image_channel {image_channel} is not one of the {images.shape[1]} input channels")


class Generalist(nn.Module):
    """Base class: freezing, device placement and the ``forward`` contract. See the module docstring."""

    def __init__(self, config: GeneralistConfig):
        super().__init__()
        self.config = config

    # ---------------------------------------------------------------------------------------- freezing
    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def freeze(self) -> "Generalist":
        """Freeze everything except what :meth:`is_trainable_parameter` selects (nothing by default)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_parameter(name))
        return self.train(False)

    #: parameter-name prefixes and sub-module names that learn (set by ``lora.make_adaptable``; empty = frozen)
    _adaptable_prefixes: Tuple[str, ...] = ()
    _adaptable_module_names: Tuple[str, ...] = ()

    def is_trainable_parameter(self, name: str) -> bool:
        return bool(self._adaptable_prefixes) and name.startswith(self._adaptable_prefixes)

    def train(self, mode: bool = True):
        # Only trainable sub-modules may switch to training mode; a frozen encoder always runs in eval mode.
        super().train(False)
        if mode and self.config.trainable:
            for module in self.trainable_modules():
                module.train(True)
        # "training" of the generalist itself means: its trainable parts learn (forward then keeps gradients)
        self.training = bool(mode and self.config.trainable)
        return self

    def trainable_modules(self) -> List[nn.Module]:
        return [self.get_submodule(n) for n in self._adaptable_module_names]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def forward(self, images: torch.Tensor, specialist_probs: torch.Tensor,
                prompts: Optional[PromptSet] = None) -> GeneralistOutput:
        raise NotImplementedError


class SliceGeneralist(Generalist):
    """A 2D promptable model applied slice by slice to 3D patches (2D patches are one slice).

    Subclasses implement :meth:`segment_slices`.
    """

    def __init__(self, config: GeneralistConfig):
        super().__init__(config)
        self._generator = torch.Generator().manual_seed(int(config.seed))
        self._slice_cache_keys = None

    def slice_axis(self) -> int:
        return self.config.axis if self.config.axis is not None else choose_slice_axis(self.config.spacing)

    def segment_slices(self, slices: torch.Tensor, prompts: Sequence[SlicePrompt], image_index: Sequence[int]
                       ) -> Tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """Mask logits for each prompt.

        Args:
            slices: ``(N, h, w)`` nnU-Net intensities of the slices that have at least one prompt, or ``(N, 3, h, w)``
                colour slices with ``image_channel: "rgb"``.
            prompts: ``P`` prompts in slice pixel coordinates.
            image_index: for each prompt, the index into ``slices`` of its slice.

        Returns:
            ``(P, h, w)`` logits at slice resolution, ``(P,)`` scores (or None), number of encoder images.
        """
        raise NotImplementedError

    @staticmethod
    def prompt_scores(probs: torch.Tensor, scores: Optional[torch.Tensor], prob_slices: torch.Tensor,
                      bi: torch.Tensor, ki: torch.Tensor, si: torch.Tensor) -> torch.Tensor:
        """How much to trust each prompt's mask ``(P, h, w)``: the model's own quality estimate (SAM's predicted
        IoU; 1 without one) times the specialist's mean probability of the class inside that mask. A component the
        specialist fired on but that the generalist segments as something else, or only hesitantly, scores low."""
        inside = probs > 0.5
        specialist = prob_slices.to(probs.device)[bi, ki, si]
        agreement = (specialist * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1)
        agreement = torch.where(inside.flatten(1).any(1), agreement, torch.zeros_like(agreement))
        own = scores.float().clamp(0, 1) if scores is not None else torch.ones_like(agreement)
        return own * agreement

    def forward(self, images: torch.Tensor, specialist_probs: torch.Tensor,
                prompts: Optional[PromptSet] = None, cache_keys: Optional[Sequence[str]] = None
                ) -> GeneralistOutput:
        """``cache_keys``: one string per batch item naming its exact, un-augmented content (e.g. case id + crop);
        with ``cache_embeddings`` the backend reuses encoder outputs of slices it has seen under the same key."""
        if cache_keys is not None and len(cache_keys) != images.shape[0]:
            raise ValueError(f"{len(cache_keys)} cache keys for a batch of {images.shape[0]}")
        check_inputs(images, specialist_probs, self.config.image_channel)
        is_2d = images.ndim == 4
        axis = 0 if is_2d else self.slice_axis()
        device = self.device
        _synchronize(device)
        t0 = time.perf_counter()
        # (B, C, S, h, w) image slices of the chosen channel (C = 1) or colours (C = 3), (B, K, S, h, w) specialist
        channel = self.config.image_channel
        image_slices = images[:, :3] if channel == RGB else images[:, channel:channel + 1]
        image_slices = image_slices.unsqueeze(2) if is_2d else patch_to_slices(image_slices, axis)
        prob_slices = specialist_probs.unsqueeze(2) if is_2d else patch_to_slices(specialist_probs, axis)
        b_count, k_count, s_count, h, w = prob_slices.shape
        if prompts is None:
            prompts = generate_prompts(prob_slices, self.config.prompt_settings(), self._generator)

        foreground = torch.zeros((b_count, k_count, s_count, h, w), device=device, dtype=torch.float32)
        confidence = torch.zeros_like(foreground)
        prompted = torch.zeros((b_count, k_count), dtype=torch.bool, device=device)
        prompted[:, 0] = True
        prompt_list = [p for p in prompts if p.class_index > 0]
        num_encoded, has_scores = 0, False
        covered_slices = torch.zeros((b_count, s_count), dtype=torch.bool)
        if prompt_list:
            # encode only slices that carry a prompt: with a confident specialist most slices of a patch are empty
            keys: Dict[Tuple[int, int], int] = {}
            for p in prompt_list:
                keys.setdefault((p.batch_index, p.slice_index), len(keys))
            index = torch.tensor(list(keys), dtype=torch.long)
            slices = image_slices[index[:, 0], :, index[:, 1]]  # (N, C, h, w)
            slices = (slices if channel == RGB else slices[:, 0]).to(device)
            image_index = [keys[(p.batch_index, p.slice_index)] for p in prompt_list]
            # per encoded slice: (caller's key, axis, slice) when the caller named its items, else None
            self._slice_cache_keys = None if cache_keys is None else \
                [(str(cache_keys[b]), axis, s) for b, s in keys]
            grad = torch.enable_grad() if (self.training and self.config.trainable) else torch.no_grad()
            with grad:
                logits, scores, num_encoded = self.segment_slices(slices, prompt_list, image_index)
            probs = torch.sigmoid(logits.float())
            bi = torch.tensor([p.batch_index for p in prompt_list], device=device)
            ki = torch.tensor([p.class_index for p in prompt_list], device=device)
            si = torch.tensor([p.slice_index for p in prompt_list], device=device)
            keep = torch.ones(len(prompt_list), dtype=torch.bool, device=device)
            if self.config.min_prompt_score > 0:
                keep = self.prompt_scores(probs, scores, prob_slices, bi, ki, si) >= self.config.min_prompt_score
            # a slice is segmented where a kept prompt lies: a rejected prompt says nothing
            covered_slices[bi[keep].cpu(), si[keep].cpu()] = True
            probs = probs * keep.view(-1, 1, 1)
            # several prompts of one (item, class, slice) - one per component - are merged by their maximum
            flat = (bi * k_count + ki) * s_count + si
            foreground = _index_amax(foreground, flat, probs)
            prompted[bi[keep], ki[keep]] = True
            if scores is not None:
                has_scores = True
                score_maps = (scores.float() * keep).view(-1, 1, 1).expand(-1, h, w)
                confidence = _index_amax(confidence, flat, score_maps)
        return assemble_output(foreground, confidence, prompted, has_scores, self.config.background, is_2d, axis,
                               device, t0, num_encoded, covered_slices)


class GeneralistEnsemble(nn.Module):
    """Several generalists (SemiSAM+): each is prompted by the same specialist prediction; their probabilities are
    combined by ``mean`` or ``agreement`` (each model weighted, per voxel, by how much it agrees with the others'
    mean: ``1 - |p_m - mean_{others}|`` averaged over classes, so an outlier model counts less where it disagrees).
    """

    def __init__(self, members: Sequence[Generalist], combination: str = "mean"):
        super().__init__()
        if combination not in COMBINATIONS:
            raise ValueError(f"generalist combination must be one of {COMBINATIONS}, got {combination!r}")
        self.members = nn.ModuleList(members)
        self.combination = combination

    def forward(self, images: torch.Tensor, specialist_probs: torch.Tensor,
                prompts: Optional[PromptSet] = None, cache_keys: Optional[Sequence[str]] = None
                ) -> GeneralistOutput:
        outputs = [m(images, specialist_probs, prompts, cache_keys=cache_keys) for m in self.members]
        return combine_outputs(outputs, self.combination)

    def train(self, mode: bool = True):
        for m in self.members:
            m.train(mode)
        self.training = mode
        return self


def combine_outputs(outputs: Sequence[GeneralistOutput], combination: str = "mean") -> GeneralistOutput:
    """Combine several generalists' outputs (see :class:`GeneralistEnsemble`)."""
    if len(outputs) == 1:
        return outputs[0]
    stacked = torch.stack([o.probabilities for o in outputs])  # (M, B, K, ...)
    if combination == "agreement":
        m = stacked.shape[0]
        others = (stacked.sum(0, keepdim=True) - stacked) / (m - 1)
        weights = (1.0 - (stacked - others).abs().mean(2, keepdim=True)).clamp_min(1e-3)  # (M, B, 1, ...)
        probabilities = (weights * stacked).sum(0) / weights.sum(0)
    else:
        probabilities = stacked.mean(0)
    confidences = [o.confidence for o in outputs if o.confidence is not None]
    confidence = torch.stack(confidences).mean(0) if confidences else None
    prompted = torch.stack([o.prompted for o in outputs]).any(0)
    coverages = [o.covered for o in outputs if o.covered is not None]
    covered = torch.stack(coverages).any(0) if len(coverages) == len(outputs) else None
    return GeneralistOutput(probabilities=probabilities, prompted=prompted, confidence=confidence,
                            seconds=sum(o.seconds for o in outputs), num_encoded=sum(o.num_encoded for o in outputs),
                            covered=covered)


def segment_with_clicks(members: Sequence[SliceGeneralist], images: torch.Tensor, specialist_probs: torch.Tensor,
                        clicks: int, combination: str = "mean") -> GeneralistOutput:
    """Interactive-style prompting from the specialist alone: the first prompts from its softmax (the first member's
    prompt settings), then ``clicks - 1`` rounds that each add a click where the generalists' combined answer and
    the specialist disagree most (labelled by the specialist there), all members answering the same prompts."""
    from nnunet_foundation.foundation.prompts import add_disagreement_clicks

    first = members[0]
    is_2d = specialist_probs.ndim == 4
    axis = 0 if is_2d else first.slice_axis()

    def sliced(t):
        return t.unsqueeze(2) if is_2d else patch_to_slices(t, axis)

    def answer(prompts):
        return combine_outputs([m(images, specialist_probs, prompts) for m in members], combination)

    prompts = generate_prompts(sliced(specialist_probs), first.config.prompt_settings(), first._generator)
    out = answer(prompts)
    seconds = out.seconds
    for _ in range(1, clicks):
        prompts = add_disagreement_clicks(prompts, sliced(out.probabilities), sliced(specialist_probs))
        out = answer(prompts)
        seconds += out.seconds
    out.seconds = seconds
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of voxels where two probability maps ``(B, K, ...)`` have the same argmax (for logging)."""
    return float((a.argmax(1) == b.argmax(1)).float().mean())
