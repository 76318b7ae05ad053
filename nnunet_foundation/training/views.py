"""Views of unlabeled patches made on the training device: strong photometric views and CutMix box mixing.

The unlabeled stream delivers the *weak* view (nnU-Net's geometric transforms only) of each crop; a method that asks
for strong views (``num_strong_views``) gets that many independent perturbations of the same weak view, made here in
torch on the device, so two or more strong views (UniMatch-style methods) cost a few element-wise operations and one
small separable blur instead of another pass through the CPU augmentation pipeline.

The perturbation is always on, at the strength of the semi-supervised references (FixMatch's RandAugment, UniMatch's
colour jitter + blur) carried over to z-scored medical intensities: per sample, brightness and contrast factors from
U(0.5, 1.5), a gamma from U(0.7, 1.5) on the intensity range, a Gaussian blur of sigma U(0.1, 1.5) voxels, and
Gaussian noise of variance U(0, 0.1) (nnU-Net's noise range). Geometry is left alone, so a pseudo-label of the weak
view is a voxel-wise target for every strong view. A method may ask for other ranges (``strong_view_strength``):
SynFoC uses its reference's :data:`SYNFOC_STRENGTH`.

Feature perturbation (UniMatch's third stream) is a view too, made inside the network: :func:`feature_dropout_stream`
runs the student once and returns its outputs for the clean features and for channel-dropped-out copies of the
encoder's features (every skip connection and the bottleneck), via a forward hook on nnU-Net's encoder, so nnU-Net's
network class is used as it is.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_foundation.training.networks import unwrap_network


@dataclass(frozen=True)
class StrongViewStrength:
    """Ranges of the per-sample random factors of :func:`strong_view` (uniform in [low, high])."""
    brightness: Tuple[float, float] = (0.5, 1.5)
    contrast: Tuple[float, float] = (0.5, 1.5)
    gamma: Tuple[float, float] = (0.7, 1.5)
    blur_sigma: Tuple[float, float] = (0.1, 1.5)
    noise_variance: Tuple[float, float] = (0.0, 0.1)


REFERENCE_STRENGTH = StrongViewStrength()
#: SynFoC's strong view (MQinghe/SynFoC ``train.py``, grayscale datasets): brightness and contrast from U(0.1, 2) and
#: a Gaussian blur, always on, no gamma and no noise. Its blur is SimCLR's (kernel 10% of the image, sigma
#: U(0.1, 2.0) pixels); here sigma U(0.1, 2.0) voxels with a kernel of +-3 sigma.
SYNFOC_STRENGTH = StrongViewStrength(brightness=(0.1, 2.0), contrast=(0.1, 2.0), gamma=(1.0, 1.0),
                                     blur_sigma=(0.1, 2.0), noise_variance=(0.0, 0.0))


def _uniform(low_high: Tuple[float, float], shape, like: torch.Tensor) -> torch.Tensor:
    low, high = low_high
    return torch.rand(shape, device=like.device, dtype=like.dtype) * (high - low) + low


def _per_sample(x: torch.Tensor, low_high: Tuple[float, float]) -> torch.Tensor:
    """One random factor per sample, shaped to broadcast over (C, *spatial)."""
    return _uniform(low_high, (x.shape[0],) + (1,) * (x.ndim - 1), x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of ``(B, C, *spatial)`` (2D or 3D) with one sigma (in voxels) per sample."""
    b, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
    radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigma.view(-1, 1)) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K): one per channel
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    out = x.reshape(1, b * c, *spatial)  # the batch as channels: a grouped convolution blurs each with its kernel
    for axis in range(len(spatial)):
        shape = [1] * len(spatial)
        shape[axis] = kernels.shape[1]
        padding = [0, 0] * len(spatial)
        padding[2 * (len(spatial) - 1 - axis)] = padding[2 * (len(spatial) - 1 - axis) + 1] = radius
        out = conv(F.pad(out, padding, mode="replicate"), kernels.view(b * c, 1, *shape), groups=b * c)
    return out.reshape(x.shape)


def strong_view(x: torch.Tensor, strength: StrongViewStrength = REFERENCE_STRENGTH) -> torch.Tensor:
    """A strong photometric perturbation of the (z-scored) weak view ``x (B, C, *spatial)``, new random factors per
    sample: brightness, contrast, gamma, blur, noise, in that order."""
    x = x.float() * _per_sample(x, strength.brightness)
    mean = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
    x = (x - mean) * _per_sample(x, strength.contrast) + mean
    # gamma on the intensity range of each image and channel, which is restored afterwards
    if strength.gamma != (1.0, 1.0):
        low = x.amin(dim=tuple(range(2, x.ndim)), keepdim=True)
        span = (x.amax(dim=tuple(range(2, x.ndim)), keepdim=True) - low).clamp_min(1e-6)
        x = ((x - low) / span).clamp(0, 1) ** _per_sample(x, strength.gamma) * span + low
    x = gaussian_blur(x, _uniform(strength.blur_sigma, (x.shape[0],), x))
    if strength.noise_variance == (0.0, 0.0):
        return x
    return x + torch.randn_like(x) * _per_sample(x, strength.noise_variance).sqrt()


def strong_views(x: torch.Tensor, count: int, strength: StrongViewStrength = REFERENCE_STRENGTH) -> List[torch.Tensor]:
    """``count`` independent strong views of the same weak view."""
    return [strong_view(x, strength) for _ in range(count)]


def channel_dropout(features: torch.Tensor, p: float) -> torch.Tensor:
    """``nn.Dropout2d``/``Dropout3d`` in training mode for ``(B, C, *spatial)``: each channel of each sample is zeroed
    with probability ``p``, the others scaled by 1 / (1 - p) (UniMatch's feature perturbation)."""
    keep = torch.rand(features.shape[:2] + (1,) * (features.ndim - 2), device=features.device) >= p
    return features * keep.to(features.dtype) / (1.0 - p)


@contextlib.contextmanager
def _encoder_features_dropped_out(network: nn.Module, p: float, first: int):
    """While active, nnU-Net's encoder returns each of its features (skips and bottleneck) ``f`` as
    ``cat(f, channel_dropout(f[first:]))``: the decoder then decodes the clean batch and a perturbed copy of its
    samples from ``first`` on in one pass. A hook on the unwrapped network's ``encoder`` (the attribute of nnU-Net's
    PlainConvUNet / ResidualEncoderUNet) leaves the network class, DDP and its weights alone."""
    encoder = unwrap_network(network).encoder

    def perturb(module, inputs, output):
        features = list(output) if isinstance(output, (list, tuple)) else [output]
        perturbed = [torch.cat((f, channel_dropout(f[first:], p))) for f in features]
        return perturbed if isinstance(output, (list, tuple)) else perturbed[0]

    handle = encoder.register_forward_hook(perturb)
    try:
        yield
    finally:
        handle.remove()


def feature_dropout_stream(network: nn.Module, x: torch.Tensor, p: float = 0.5, first: int = 0
                           ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One pass of ``network`` over ``x`` with one encoder pass: (outputs for ``x``, outputs for ``x[first:]`` decoded
    from encoder features with channel dropout ``p``), each a list over deep-supervision scales. UniMatch's
    feature-perturbation stream (its official code drops out every encoder feature with ``Dropout2d(0.5)``)."""
    with _encoder_features_dropped_out(network, p, first):
        outputs = network(x)
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    n = x.shape[0]
    return [o[:n] for o in outputs], [o[n:] for o in outputs]


def random_boxes(shape: Tuple[int, ...], batch: int, generator: Optional[torch.Generator] = None,
                 min_area: float = 0.02, max_area: float = 0.4, device=None) -> torch.Tensor:
    """One random axis-aligned box per image covering ``min_area``..``max_area`` of the patch (by volume), as a
    boolean mask ``(B, *shape)``: the region that CutMix / copy-paste takes from the other image."""
    masks = torch.zeros((batch, *shape), dtype=torch.bool, device=device)
    ndim = len(shape)
    for i in range(batch):
        area = float(torch.empty(1).uniform_(min_area, max_area, generator=generator))
        # equal relative side lengths give the requested volume fraction
        fraction = area ** (1.0 / ndim)
        index = []
        for size in shape:
            side = max(1, min(size, int(round(size * fraction))))
            start = int(torch.randint(0, size - side + 1, (1,), generator=generator))
            index.append(slice(start, start + side))
        masks[(i, *index)] = True
    return masks


def paste_boxes(box: torch.Tensor, background: torch.Tensor, pasted: torch.Tensor) -> torch.Tensor:
    """CutMix: ``pasted`` inside ``box (B, *spatial)``, ``background`` elsewhere. Works alike for images
    ``(B, C, *spatial)`` and for per-voxel maps ``(B, *spatial)`` (labels, confidence masks), so an image and its
    targets are mixed with the same call."""
    inside = box if background.ndim == box.ndim else box.unsqueeze(1)
    return torch.where(inside, pasted, background)


__all__ = ["StrongViewStrength", "REFERENCE_STRENGTH", "SYNFOC_STRENGTH", "gaussian_blur", "strong_view",
           "strong_views", "channel_dropout", "feature_dropout_stream", "random_boxes", "paste_boxes"]
