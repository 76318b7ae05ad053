"""The demo's generated images show what the demo is about: labeled images with evenly bright objects, unlabeled and
test images where many objects have a faint core (the specialist's blind spot), and classes told apart by polarity."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnunet_foundation.demo_data import LABELED, WILD, make_demo_image


def _core_and_rim_contrast(image: np.ndarray, label: np.ndarray, cls: int, background: float):
    """Mean distance from the background intensity of the object's core (deep half) and rim (outer pixels)."""
    depth = ndimage.distance_transform_edt(label == cls)
    core = depth > 0.6 * depth.max()
    rim = (depth > 0) & (depth <= 2)
    return abs(image[core].mean() - background), abs(image[rim].mean() - background)


def _faint_core_fraction(appearance, count: int = 40) -> float:
    rng = np.random.default_rng(1)
    faint = total = 0
    for _ in range(count):
        image, label = make_demo_image(rng, appearance)
        background = np.median(image[label == 0])
        for cls in (1, 2):
            core, rim = _core_and_rim_contrast(image, label, cls, background)
            faint += core < 0.5 * rim
            total += 1
    return faint / total


def test_labeled_objects_are_evenly_bright_and_most_others_have_a_faint_core():
    assert _faint_core_fraction(LABELED) == 0.0
    assert 0.4 <= _faint_core_fraction(WILD) <= 0.8


def test_lesions_are_brighter_and_ducts_darker_than_the_background():
    rng = np.random.default_rng(2)
    for appearance in (LABELED, WILD):
        for _ in range(10):
            image, label = make_demo_image(rng, appearance)
            assert set(np.unique(label)) == {0, 1, 2}
            background = np.median(image[label == 0])
            rim = lambda cls: image[(ndimage.distance_transform_edt(label == cls) > 0) &
                                    (ndimage.distance_transform_edt(label == cls) <= 2)].mean()
            assert rim(1) > background > rim(2)
