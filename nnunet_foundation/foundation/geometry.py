"""Pure tensor geometry between nnU-Net patches and the square inputs of SAM-family models.

Conventions
-----------
* Patches are ``(B, C, D, H, W)`` (3D) or ``(B, C, H, W)`` (2D). A 3D patch is cut into 2D slices along one spatial
  axis (``0`` = D, ``1`` = H, ``2`` = W); the slice index is then moved to dimension 2: ``(B, C, S, h, w)``.
* Points are ``(x, y)`` = (column, row) in pixel units, as SAM expects. Boxes are ``(x0, y0, x1, y1)``.
* A slice of size ``(h, w)`` reaches the model as a ``(T, T)`` square (``T = image_encoder.img_size``). With
  ``keep_aspect`` (SAM's ``ResizeLongestSide``) the longest side is scaled to ``T`` and the short side is padded at
  the bottom/right; without it (MedSAM, SAM2) the slice is squashed to ``T x T``. :func:`resize_to_model` and
  :func:`resize_from_model` are exact inverses for the padding and, for integer scale factors, round-trip binary
  masks exactly (after thresholding at 0.5).
* Stitching (SFR-style): ``g x g`` slices, each resized into a ``T//g`` tile, form one ``T x T`` mosaic, so that one
  encoder call serves ``g**2`` slices. :func:`stitch` / :func:`unstitch` are pure indexing and bit-exact inverses.
* SFR's own mosaics (:class:`MosaicLayout`, :func:`stitch_native` / :func:`unstitch_native`) keep every slice at its
  native size in ``(T // h) x (T // w)`` cells and tile patches with more slices into several mosaics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# ImageNet statistics used by SAM2 (in [0, 1] units) and SAM (in [0, 255] units, Sam.pixel_mean / pixel_std)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------- slicing axis
def choose_slice_axis(spacing: Optional[Sequence[float]] = None) -> int:
    """The spatial axis to slice along: the lowest-resolution (largest spacing) one, else axis 0 (D).

    Slicing across the coarse axis keeps every 2D slice at its native in-plane resolution, which is what 2D
    foundation models were trained on. Ties (isotropic data) resolve to the first axis.
    """
    if spacing is None or len(spacing) < 3:
        return 0
    spacing = [float(s) for s in spacing]
    return max(range(len(spacing)), key=lambda i: (spacing[i], -i))


def patch_to_slices(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``(B, C, D, H, W)`` -> ``(B, C, S, h, w)`` with the slicing ``axis`` (0, 1 or 2) moved to dimension 2."""
    if x.ndim != 5:
        raise ValueError(f"expected a (B, C, D, H, W) tensor, got shape {tuple(x.shape)}")
    if axis not in (0, 1, 2):
        raise ValueError(f"slicing axis must be 0 (D), 1 (H) or 2 (W), got {axis}")
    return x.movedim(2 + axis, 2)


def slices_to_patch(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Inverse of :func:`patch_to_slices`."""
    return x.movedim(2, 2 + axis)


# ------------------------------------------------------------------------------------------------- intensities
def min_max_scale(slices: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each 2D slice of ``(N, h, w)`` (or colour slice ``(N, 3, h, w)``, its channels together, so colours
    keep their balance) to ``[0, 1]`` by its own min and max (constant slices become 0).

    nnU-Net's z-scored or CT-clipped intensities have no fixed range; per-slice min-max is what MedSAM and the SAM
    medical adaptations use to reach the 8-bit-like range the encoders were trained on.
    """
    flat = slices.flatten(1).float()
    shape = (-1,) + (1,) * (slices.ndim - 1)
    low = flat.min(1).values.view(shape)
    high = flat.max(1).values.view(shape)
    return (slices.float() - low) / (high - low).clamp_min(eps)


def as_three_channels(scaled: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` grey -> ``(N, 3, h, w)`` replicated; ``(N, 3, h, w)`` colour (``image_channel: "rgb"``) as is."""
    return scaled if scaled.ndim == 4 else scaled.unsqueeze(1).expand(-1, 3, -1, -1)


def to_sam_intensities(slices: torch.Tensor, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` nnU-Net intensities -> ``(N, 3, h, w)`` as ``Sam.preprocess`` normalises an RGB uint8 image.

    Per-slice min-max to ``[0, 255]``, grey replicated to three channels, then ``(x - pixel_mean) / pixel_std``.
    """
    rgb = as_three_channels(min_max_scale(slices) * 255.0)
    return (rgb - pixel_mean.view(1, 3, 1, 1).to(rgb)) / pixel_std.view(1, 3, 1, 1).to(rgb)


def to_medsam_intensities(slices: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, 3, h, w)`` in ``[0, 1]``: MedSAM feeds min-max scaled images without mean/std."""
    return as_three_channels(min_max_scale(slices)).contiguous()


def to_sam2_intensities(slices: torch.Tensor) -> torch.Tensor:
    """``(N, h, w)`` -> ``(N, 3, h, w)``: ``[0, 1]`` then ImageNet mean/std, as SAM2's ``SAM2Transforms`` does."""
    rgb = as_three_channels(min_max_scale(slices))
    mean = torch.tensor(IMAGENET_MEAN, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


# ------------------------------------------------------------------------------------------------ resize + pad
@dataclass(frozen=True)
class ResizeGeometry:
    """How a ``(h, w)`` slice maps into a ``(target, target)`` square.

    ``resized_hw`` is the size of the image content inside the square; the rest (bottom/right) is padding.
    """

    original_hw: Tuple[int, int]
    resized_hw: Tuple[int, int]
    target: int

    @property
    def scale_xy(self) -> Tuple[float, float]:
        """Factors that map slice pixel coordinates (x, y) to model pixel coordinates."""
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]


def compute_resize_geometry(original_hw: Sequence[int], target: int, keep_aspect: bool = True) -> ResizeGeometry:
    """Resize rule of SAM's ``ResizeLongestSide`` (``keep_aspect``) or a plain squash to ``target x target``."""
    h, w = int(original_hw[0]), int(original_hw[1])
    if keep_aspect:
        scale = target / max(h, w)
        resized = (int(h * scale + 0.5), int(w * scale + 0.5))  # SAM's rounding
    else:
        resized = (target, target)
    return ResizeGeometry((h, w), resized, int(target))


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    downsampling = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    # antialias only matters (and is only supported for bilinear) when shrinking
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=downsampling)


def resize_to_model(x: torch.Tensor, geometry: ResizeGeometry, pad_value: float = 0.0) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, C, T, T)``: bilinear resize to ``geometry.resized_hw``, pad bottom/right."""
    if tuple(x.shape[-2:]) != geometry.original_hw:
        raise ValueError(f"expected slices of size {geometry.original_hw}, got {tuple(x.shape[-2:])}")
    x = _resize(x.float(), geometry.resized_hw)
    pad_h = geometry.target - geometry.resized_hw[0]
    pad_w = geometry.target - geometry.resized_hw[1]
    return F.pad(x, (0, pad_w, 0, pad_h), value=pad_value) if (pad_h or pad_w) else x


def resize_from_model(y: torch.Tensor, geometry: ResizeGeometry) -> torch.Tensor:
    """Exact inverse mapping of :func:`resize_to_model` for model outputs ``(N, C, T, T)`` -> ``(N, C, h, w)``.

    Crops the padding, then resizes bilinearly (as ``Sam.postprocess_masks``). Apply it to logits, not to
    thresholded masks, and take the sigmoid afterwards.
    """
    if tuple(y.shape[-2:]) != (geometry.target, geometry.target):
        raise ValueError(f"expected model outputs of size {(geometry.target,) * 2}, got {tuple(y.shape[-2:])}")
    y = y[..., : geometry.resized_hw[0], : geometry.resized_hw[1]]
    return _resize(y, geometry.original_hw)


def points_to_model(points: torch.Tensor, geometry: ResizeGeometry, offset_xy: Tuple[float, float] = (0.0, 0.0)
                    ) -> torch.Tensor:
    """Map ``(..., 2)`` slice coordinates (x, y) into the model frame (``ResizeLongestSide.apply_coords``), plus an
    optional tile offset when the slice sits in a stitched mosaic."""
    sx, sy = geometry.scale_xy
    scale = torch.tensor([sx, sy], dtype=torch.float32, device=points.device)
    offset = torch.tensor(offset_xy, dtype=torch.float32, device=points.device)
    return points.float() * scale + offset


def boxes_to_model(boxes: torch.Tensor, geometry: ResizeGeometry, offset_xy: Tuple[float, float] = (0.0, 0.0)
                   ) -> torch.Tensor:
    """Map ``(..., 4)`` boxes (x0, y0, x1, y1) into the model frame."""
    corners = points_to_model(boxes.reshape(*boxes.shape[:-1], 2, 2), geometry, offset_xy)
    return corners.reshape(*boxes.shape)


def upsample_low_res(low_res: torch.Tensor, target: int) -> torch.Tensor:
    """Decoder low-res logits ``(N, C, T/4, T/4)`` -> ``(N, C, T, T)`` (first step of ``Sam.postprocess_masks``)."""
    return F.interpolate(low_res.float(), size=(target, target), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------------ stitching
@dataclass(frozen=True)
class StitchLayout:
    """``grid x grid`` tiles of ``tile = target // grid`` pixels per mosaic; slice ``i`` goes to mosaic
    ``i // grid**2``, row ``(i % grid**2) // grid``, column ``i % grid``."""

    num_slices: int
    grid: int
    target: int

    @property
    def tile(self) -> int:
        return self.target // self.grid

    @property
    def per_mosaic(self) -> int:
        return self.grid * self.grid

    @property
    def num_mosaics(self) -> int:
        return math.ceil(self.num_slices / self.per_mosaic)

    def location(self, index: int) -> Tuple[int, int, int]:
        """``(mosaic index, top row, left column)`` of slice ``index`` in model pixels."""
        mosaic, cell = divmod(index, self.per_mosaic)
        row, col = divmod(cell, self.grid)
        return mosaic, row * self.tile, col * self.tile

    def offset_xy(self, index: int) -> Tuple[float, float]:
        _, top, left = self.location(index)
        return float(left), float(top)


def auto_stitch_grid(slice_hw: Sequence[int], target: int, max_grid: int = 4) -> int:
    """Largest grid (<= ``max_grid``) whose tiles are still at least as large as the slice, so stitching never
    throws away resolution; 1 (no stitching) when the slice is larger than half the model input."""
    longest = max(int(slice_hw[0]), int(slice_hw[1]))
    return max(1, min(max_grid, target // max(longest, 1)))


def stitch(tiles: torch.Tensor, layout: StitchLayout, pad_value: float = 0.0) -> torch.Tensor:
    """``(N, C, tile, tile)`` -> ``(M, C, T, T)`` mosaics; unused cells hold ``pad_value``."""
    n, c, th, tw = tiles.shape
    if n != layout.num_slices or th != layout.tile or tw != layout.tile:
        raise ValueError(f"expected {layout.num_slices} tiles of {layout.tile}x{layout.tile}, got {tuple(tiles.shape)}")
    mosaics = tiles.new_full((layout.num_mosaics, c, layout.target, layout.target), pad_value)
    for i in range(n):
        m, top, left = layout.location(i)
        mosaics[m, :, top:top + th, left:left + tw] = tiles[i]
    return mosaics


def unstitch(mosaics: torch.Tensor, layout: StitchLayout) -> torch.Tensor:
    """``(M, C, T, T)`` -> ``(N, C, tile, tile)``: the exact inverse of :func:`stitch`."""
    t = layout.tile
    out = []
    for i in range(layout.num_slices):
        m, top, left = layout.location(i)
        out.append(mosaics[m, :, top:top + t, left:left + t])
    return torch.stack(out, 0)


def crop_tile(model_space: torch.Tensor, layout: StitchLayout, index: int) -> torch.Tensor:
    """Cut slice ``index``'s tile out of a ``(..., T, T)`` model-space map that belongs to its mosaic."""
    _, top, left = layout.location(index)
    return model_space[..., top:top + layout.tile, left:left + layout.tile]


# ------------------------------------------------------------------------------------- native-size mosaics (SFR)
@dataclass(frozen=True)
class MosaicLayout:
    """SFR's stitching: slices at their *native* in-plane size, laid out row-major in ``rows x cols`` cells of a
    ``target x target`` mosaic (``rows = target // h``, ``cols = target // w``), each slice centred in its cell; the
    rest of the cell and the unused cells are padding. Slice ``i`` goes to mosaic ``i // (rows * cols)``: a patch
    with more slices than cells is cut into consecutive sub-volumes, one mosaic each, so no slice is ever dropped.

    A slice larger than the mosaic is first shrunk (longest side to ``target``, one slice per mosaic); ``scale`` is
    then below 1 and the round trip is no longer bit-exact. At ``scale == 1`` :func:`stitch_native` and
    :func:`unstitch_native` are pure indexing and exact inverses.
    """

    num_slices: int
    slice_hw: Tuple[int, int]
    target: int

    @property
    def scale(self) -> float:
        return min(1.0, self.target / max(self.slice_hw))

    @property
    def content_hw(self) -> Tuple[int, int]:
        """Size of a slice inside the mosaic (its native size unless it had to shrink)."""
        if self.scale == 1.0:
            return int(self.slice_hw[0]), int(self.slice_hw[1])
        return (max(1, min(self.target, int(self.slice_hw[0] * self.scale + 0.5))),
                max(1, min(self.target, int(self.slice_hw[1] * self.scale + 0.5))))

    @property
    def rows(self) -> int:
        return max(1, self.target // self.content_hw[0])

    @property
    def cols(self) -> int:
        return max(1, self.target // self.content_hw[1])

    @property
    def cell_hw(self) -> Tuple[int, int]:
        return self.target // self.rows, self.target // self.cols

    @property
    def per_mosaic(self) -> int:
        return self.rows * self.cols

    @property
    def num_mosaics(self) -> int:
        return math.ceil(self.num_slices / self.per_mosaic)

    def location(self, index: int) -> Tuple[int, int, int]:
        """``(mosaic index, top row, left column)`` of slice ``index``'s content in model pixels."""
        if not 0 <= index < self.num_slices:
            raise IndexError(f"slice {index} of a {self.num_slices}-slice layout")
        mosaic, cell = divmod(index, self.per_mosaic)
        row, col = divmod(cell, self.cols)
        (cell_h, cell_w), (h, w) = self.cell_hw, self.content_hw
        return mosaic, row * cell_h + (cell_h - h) // 2, col * cell_w + (cell_w - w) // 2

    def content_mask(self) -> torch.Tensor:
        """``(M, T, T)`` bool: True on the pixels that hold a slice (False on padding, which a loss must ignore)."""
        mask = torch.zeros((self.num_mosaics, self.target, self.target), dtype=torch.bool)
        h, w = self.content_hw
        for i in range(self.num_slices):
            m, top, left = self.location(i)
            mask[m, top:top + h, left:left + w] = True
        return mask


def mosaic_layout(num_slices: int, slice_hw: Sequence[int], target: int) -> MosaicLayout:
    if num_slices < 1:
        raise ValueError(f"a mosaic needs at least one slice, got {num_slices}")
    return MosaicLayout(int(num_slices), (int(slice_hw[0]), int(slice_hw[1])), int(target))


def _fit_content(x: torch.Tensor, size: Tuple[int, int], labels: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if labels:  # nearest neighbour keeps label values (and the ignore value) intact
        return F.interpolate(x.float(), size=size, mode="nearest").to(x.dtype)
    return _resize(x.float(), size).to(x.dtype)


def stitch_native(slices: torch.Tensor, layout: MosaicLayout, pad_value: float = 0.0,
                  labels: bool = False) -> torch.Tensor:
    """``(N, C, h, w)`` slices -> ``(M, C, T, T)`` mosaics (see :class:`MosaicLayout`); padding holds ``pad_value``
    (an ignore label for label maps). ``labels``: integer maps, shrunk by nearest neighbour where they must shrink."""
    n, c, h, w = slices.shape
    if n != layout.num_slices or (h, w) != layout.slice_hw:
        raise ValueError(f"expected {layout.num_slices} slices of {layout.slice_hw}, got {tuple(slices.shape)}")
    content = _fit_content(slices, layout.content_hw, labels)
    ch, cw = layout.content_hw
    mosaics = slices.new_full((layout.num_mosaics, c, layout.target, layout.target), pad_value)
    for i in range(n):
        m, top, left = layout.location(i)
        mosaics[m, :, top:top + ch, left:left + cw] = content[i]
    return mosaics


def unstitch_native(mosaics: torch.Tensor, layout: MosaicLayout, labels: bool = False) -> torch.Tensor:
    """``(M, C, T, T)`` -> ``(N, C, h, w)``: every slice's content cut out of its mosaic (resized back to the slice
    size where it had to shrink; apply to logits, not to thresholded masks). The exact inverse of
    :func:`stitch_native` at ``scale == 1``."""
    if mosaics.shape[0] != layout.num_mosaics or tuple(mosaics.shape[-2:]) != (layout.target, layout.target):
        raise ValueError(f"expected {layout.num_mosaics} mosaics of {layout.target}x{layout.target}, got "
                         f"{tuple(mosaics.shape)}")
    ch, cw = layout.content_hw
    out = torch.stack([mosaics[m, :, top:top + ch, left:left + cw]
                       for m, top, left in (layout.location(i) for i in range(layout.num_slices))])
    return _fit_content(out, layout.slice_hw, labels)
