"""Prompt Affinity Mining: a uniform grid of single-point prompts, the pixel affinity their summed masks imply, and
the random walk that spreads a CAM along it (WeakMedSAM, TMI 2025, Sec. III-C; written from the paper's description).

Everything here works on one image at a time on the image-embedding grid (LiteMedSAM: 64 x 64): the affinity matrix
is dense (4096^2 floats, 64 MiB), which is cheaper on a CPU than sparse indexing and exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uniform_point_grid(height: float, width: float, points_per_side: int) -> torch.Tensor:
    """``(points_per_side^2, 2)`` (x, y) points at the centres of a ``points_per_side`` x ``points_per_side`` tiling
    of a ``height`` x ``width`` image (SAM's point frame: x = column). Every tile holds one point, so the prompts cover
    the whole image (the released code's grid spans only its top-left 16 px; the paper asks for a uniform grid)."""
    if points_per_side < 1:
        raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
    steps = (torch.arange(points_per_side, dtype=torch.float32) + 0.5) / points_per_side
    ys, xs = torch.meshgrid(steps * float(height), steps * float(width), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)


def neighbourhood(height: int, width: int, radius: float) -> torch.Tensor:
    """``(N, N)`` bool, N = height * width: True where two grid cells lie closer than ``radius`` (Euclidean, in cells;
    a cell is its own neighbour). The paper's radius 5 is the released search window: offsets with dy^2 + dx^2 < r^2."""
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    coords = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).float()
    return torch.cdist(coords, coords) < float(radius)


PROMPT_MAPS = ("probabilities", "logits")


def prompt_response_map(point_logits: torch.Tensor, kind: str = "probabilities") -> torch.Tensor:
    """The map the affinity compares, from ``(P, ...)`` mask logits of P single-point prompts: the sum of their
    sigmoid probabilities (``"probabilities"``) or of their raw logits (``"logits"``, the released code).

    Why probabilities by default: a box-trained model (LiteMedSAM) answers single points with logits of -15 to -25
    almost everywhere, so the sum of 16 logit maps differs by several logits between neighbouring cells wherever no
    mask responds - affinities ~1e-4 at the median, a walk that stays where it starts. Probabilities are ~0 there (affinity ~1) and
    change only where a prompt's mask has an edge; measured on Kvasir-SEG in docs/benchmarks/weakmedsam_affinity."""
    if kind == "probabilities":
        return torch.sigmoid(point_logits.float()).sum(0)
    if kind == "logits":
        return point_logits.float().sum(0)
    raise ValueError(f"prompt map must be one of {PROMPT_MAPS}, got {kind!r}")


def affinity_matrix(mask_logits: torch.Tensor, radius: float = 5.0) -> torch.Tensor:
    """Affinity of every pair of cells of a ``(C, h, w)`` (or ``(h, w)``) prompt response map
    (:func:`prompt_response_map`):
    ``a_ij = exp(-mean_c |m_i - m_j|)`` for cells within ``radius``, 0 elsewhere. Symmetric, 1 on the diagonal."""
    m = mask_logits if mask_logits.dim() == 3 else mask_logits[None]
    c, h, w = m.shape
    flat = m.reshape(c, h * w).float()
    distance = (flat[:, :, None] - flat[:, None, :]).abs().mean(0)
    return torch.exp(-distance) * neighbourhood(h, w, radius).to(flat.device)


def transition_matrix(affinity: torch.Tensor, beta: float = 4.0) -> torch.Tensor:
    """``affinity ** beta`` with every column divided by its sum (each column is a distribution over where the mass
    of that cell goes). The power sharpens the affinity, so a strong edge in the prompt masks almost stops the walk."""
    powered = affinity.pow(beta)
    return powered / powered.sum(dim=0, keepdim=True).clamp_min(1e-12)


def min_max(maps: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-map min-max normalisation over the last two axes (a constant map becomes ~0)."""
    flat = maps.reshape(*maps.shape[:-2], -1)
    low = flat.min(dim=-1, keepdim=True).values
    high = flat.max(dim=-1, keepdim=True).values
    return ((flat - low + eps) / (high - low + eps)).reshape(maps.shape)


def random_walk(cam: torch.Tensor, transition: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Spread a ``(K, h, w)`` CAM with ``steps`` multiplications by the transition matrix, min-max after each."""
    k, h, w = cam.shape
    flat = cam.reshape(k, h * w).float()
    for _ in range(steps):
        flat = min_max((transition @ flat.T).T.reshape(k, h, w)).reshape(k, h * w)
    return flat.reshape(k, h, w)


def refine_on_content(cam_logits: torch.Tensor, prompt_map: torch.Tensor, rows: int, cols: int,
                      radius: float = 5.0, beta: float = 4.0, steps: int = 4) -> torch.Tensor:
    """The CAM refined by the prompt-affinity walk on the embedding cells that cover image content only.

    ``cam_logits (K, eh, ew)`` and ``prompt_map (eh, ew)`` are on the whole embedding grid; SAM-family encoders pad
    the image bottom/right, and the cells beyond ``rows x cols`` encode that padding. Min-max over them would scale
    the content's CAM by whatever the padding scored, and the walk would carry mass into and out of cells with no
    image. Returns ``(K, eh, ew)``: the walked content map, its edge repeated over the padding cells so that
    upsampling and blurring near the border see image values (the padding is cropped afterwards)."""
    eh, ew = cam_logits.shape[-2:]
    cam = min_max(cam_logits[:, :rows, :cols])
    transition = transition_matrix(affinity_matrix(prompt_map[None, :rows, :cols], radius), beta)
    walked = random_walk(cam, transition, steps)
    return F.pad(walked[None], (0, ew - cols, 0, eh - rows), mode="replicate")[0]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(K, h, w)`` maps (edge values repeated); sigma in pixels, 0 = none."""
    if sigma <= 0:
        return maps
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    out = maps[:, None].float()
    # replicate, not reflect: reflect padding cannot be wider than the map, and maps can be smaller than the kernel
    out = F.pad(out, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel[None, None, :, None])
    out = F.conv2d(out, kernel[None, None, None, :])
    return out[:, 0]


def masks_from_maps(maps: torch.Tensor, present: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``(K, h, w)`` per-class maps and ``(K,)`` image-level gate -> ``(h, w)`` label (0 background, k+1 class k):
    the gated maps above ``threshold``, the strongest class where several are."""
    gated = maps * present.to(maps.dtype)[:, None, None]
    best, index = gated.max(dim=0)
    return torch.where(best > threshold, index + 1, torch.zeros_like(index))


