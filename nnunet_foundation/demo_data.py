"""The demo's generated 2D dataset: few labeled images that do not show how the unlabeled and test images look.

The real problem the package addresses is not "too few pixels of the same picture": it is that a handful of labeled
cases cannot show every appearance the scanner, patient and protocol produce. So the labeled images here are drawn
from a narrow part of the appearance space (high contrast, little noise, medium-sized, evenly bright objects in the
middle half, calm background) and the unlabeled and test images from all of it (contrast down to a third, three times
the noise, objects from half to one and a half times the size, anywhere in the image, a textured background, and
most importantly objects whose core is faint: only a rim of them stands out, like a polyp under a specular highlight
or a lesion with a necrotic centre).

What a network trained on the labeled images alone learns is "bright pixels are lesion, dark pixels are duct": on a
faint-cored object it segments the rim, a ring. A box-prompted medical SAM, given the box of that ring, segments the
whole object, because it has learnt what objects look like from millions of them. That is the knowledge the demo's
SemiSAM row transfers to the specialist through the unlabeled images.

Two foreground classes, each one object per image: ``lesion`` (a lobed blob brighter than the background) and
``duct`` (an elongated, rotated ellipse darker than it). Images are single-slice NIfTI files (shape 1 x H x W),
which nnU-Net's ``2d`` configuration reads as 2D images.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

from nnunet_foundation.synthetic import _write_nifti

DEMO_LABELS = {"background": 0, "lesion": 1, "duct": 2}


@dataclass(frozen=True)
class Appearance:
    """Ranges the per-image appearance is drawn from (uniformly)."""
    contrast: Tuple[float, float]      # object brightness above the background, in background noise-free units
    noise: Tuple[float, float]         # standard deviation of the pixel noise
    size: Tuple[float, float]          # object size relative to the nominal one
    position: float                    # how far from the centre objects may sit (fraction of the half-width)
    texture: Tuple[float, float]       # amplitude of the smooth background structure
    hollow: float = 0.0                # probability that an object has a faint core (a rim around it stays bright)


# the labeled images: what a clinician labeling a few clear cases would pick (no faint cores)
LABELED = Appearance(contrast=(0.9, 1.1), noise=(0.05, 0.1), size=(0.9, 1.1), position=0.5, texture=(0.0, 0.1))
# everything else (unlabeled and test images): the variation the labeled images do not show
WILD = Appearance(contrast=(0.35, 1.1), noise=(0.05, 0.3), size=(0.5, 1.5), position=0.6, texture=(0.0, 0.5),
                  hollow=0.6)


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], waves: int = 4) -> np.ndarray:
    """A sum of random low-frequency waves in [-1, 1]: background structure without edges."""
    yy, xx = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    field = np.zeros(shape, np.float32)
    for _ in range(waves):
        fy, fx = rng.uniform(0.5, 3.0, 2)
        field += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return field / waves


def _lesion(rng, yy, xx, center, radius) -> np.ndarray:
    angle = np.arctan2(yy - center[0], xx - center[1])
    r = np.hypot(yy - center[0], xx - center[1])
    boundary = radius * (1 + sum(rng.uniform(0, 0.12) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                                 for k in (2, 3, 5)))
    return r <= boundary


def _duct(rng, yy, xx, center, radius) -> np.ndarray:
    theta = rng.uniform(0, np.pi)
    dy, dx = yy - center[0], xx - center[1]
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    return (u / (1.8 * radius)) ** 2 + (v / (0.55 * radius)) ** 2 <= 1


def make_demo_image(rng: np.random.Generator, appearance: Appearance, size: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """One image ``(H, W)`` float32 and its label ``(H, W)`` uint8 (0 background, 1 lesion, 2 duct)."""
    shape = (size, size)
    yy, xx = np.meshgrid(np.arange(size, dtype=np.float32), np.arange(size, dtype=np.float32), indexing="ij")
    label = np.zeros(shape, np.uint8)
    nominal = size * 0.11
    for cls, draw in ((1, _lesion), (2, _duct)):
        for _attempt in range(200):  # place the object where it does not touch the other one
            radius = nominal * rng.uniform(*appearance.size)
            reach = (size / 2 - 2.0 * radius) * appearance.position
            center = size / 2 + rng.uniform(-1, 1, 2) * max(reach, 0.0)
            center = np.clip(center, 2.0 * radius, size - 2.0 * radius)
            mask = draw(rng, yy, xx, center, radius)
            grown = np.zeros_like(mask)
            grown[1:-1, 1:-1] = mask[1:-1, 1:-1] | mask[:-2, 1:-1] | mask[2:, 1:-1] | mask[1:-1, :-2] | mask[1:-1, 2:]
            if not (grown & (label > 0)).any():
                break
        label[mask & (label == 0)] = cls
    image = 0.2 + rng.uniform(*appearance.texture) * 0.5 * _smooth_field(rng, shape)
    for cls, sign in ((1, 1.0), (2, -1.0)):  # lesions brighter than the background, ducts darker
        inside = label == cls
        # each object has its own brightness and a gentle internal gradient, like tissue, not a flat stamp
        shading = 1 + 0.15 * _smooth_field(rng, shape, waves=2)
        if rng.uniform() < appearance.hollow:
            # a faint core: everything deeper than 30-45% of the object's largest depth keeps 0-25% of its contrast
            depth = ndimage.distance_transform_edt(inside)
            core = depth > rng.uniform(0.3, 0.45) * depth.max()
            shading = np.where(core, rng.uniform(0.0, 0.25), shading)
        image = np.where(inside, image + sign * rng.uniform(*appearance.contrast) * shading, image)
    image = image + rng.normal(0, rng.uniform(*appearance.noise), shape).astype(np.float32)
    scale = rng.uniform(80, 300)  # per-image intensity scale, as in MRI: per-image normalisation is needed
    return (image * scale).astype(np.float32), label


def write_demo_dataset(raw_folder: str, dataset_id: int, name: str, num_labeled: int, num_validation: int,
                       num_unlabeled: int, num_test: int, seed: int = 0, size: int = 128) -> Dict[str, list]:
    """Write the dataset in nnU-Net's raw layout; return the case names per role.

    ``imagesTr``/``labelsTr``: ``num_labeled`` narrow-appearance images (``<name>_l###``) then ``num_validation``
    validation images of the full range (``<name>_v###``; nnU-Net's validation, so checkpoints and the printed
    pseudo Dice reflect the test conditions). ``imagesUnlabeled`` and ``imagesTs``/``labelsTs`` (the latter not an
    nnU-Net folder; the demo scores predictions with it) hold images of the full range.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_folder, f"Dataset{dataset_id:03d}_{name}")
    prefix = name.lower()
    roles = {"labeled": [], "validation": [], "unlabeled": [], "test": []}

    def write(role: str, case: str, appearance: Appearance, image_dir: str, label_dir=None):
        image, label = make_demo_image(rng, appearance, size)
        os.makedirs(os.path.join(folder, image_dir), exist_ok=True)
        _write_nifti(image[None], os.path.join(folder, image_dir, f"{case}_0000.nii.gz"), (1.0, 1.0, 1.0))
        if label_dir is not None:
            os.makedirs(os.path.join(folder, label_dir), exist_ok=True)
            _write_nifti(label[None], os.path.join(folder, label_dir, f"{case}.nii.gz"), (1.0, 1.0, 1.0))
        roles[role].append(case)

    for i in range(num_labeled):
        write("labeled", f"{prefix}_l{i:03d}", LABELED, "imagesTr", "labelsTr")
    for i in range(num_validation):
        write("validation", f"{prefix}_v{i:03d}", WILD, "imagesTr", "labelsTr")
    for i in range(num_unlabeled):
        write("unlabeled", f"{prefix}_u{i:03d}", WILD, "imagesUnlabeled")
    for i in range(num_test):
        write("test", f"{prefix}_t{i:03d}", WILD, "imagesTs", "labelsTs")
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": DEMO_LABELS,
        "numTraining": num_labeled + num_validation,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Generated 2D demo dataset (nnunet_foundation.demo_data): labeled images of a narrow "
                       "appearance, unlabeled and test images of the full range",
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return roles
