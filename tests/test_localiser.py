"""The fine-tuned localiser (foundation/localiser.py, issue 22 lever 4) on a tiny real SAM: it learns from labeled
slices through LoRA, decoder and head only, and serves as a prompting model with nnU-Net's data layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("segment_anything")

from nnunet_foundation.foundation.localiser import (LocaliserPrompted, fine_tune_localiser,  # noqa: E402
                                                    labeled_slices, localiser_prompting_model)
from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint  # noqa: E402


def case(seed: int, channels: int = 2):
    """A 2d case as nnU-Net preprocesses it, (C, 1, H, W) and (1, H, W): a bright square in channel 1 only."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((1, 32, 40), dtype=np.int64)
    y, x = rng.integers(4, 16), rng.integers(4, 22)
    seg[0, y:y + 12, x:x + 14] = 1
    data = rng.normal(0, 0.3, (channels, 1, 32, 40)).astype(np.float32)
    data[1] += 2.0 * seg
    return f"case{seed}", data, seg


def test_labeled_slices_keep_objects_and_some_background():
    _, data, seg = case(0)
    empty = ("empty", data.copy(), np.zeros_like(seg))
    slices = labeled_slices([case(0), case(1), empty], axis=0, image_channel=1, max_background_fraction=0.5)
    assert len(slices) == 3 and sum(bool((label > 0).any()) for _, label in slices) == 2
    assert torch.equal(slices[0][0], torch.from_numpy(data[1, 0]))  # the configured channel, not channel 0
    with pytest.raises(ValueError, match="no object"):
        labeled_slices([empty], axis=0)


def test_fine_tuning_trains_only_the_adapted_parts_and_lowers_the_loss(tmp_path):
    from nnunet_foundation.training.losses import ce_dice

    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny.pth", seed=3)
    config = {"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint), "image_channel": 1, "axis": 0}
    cases = [case(s) for s in range(4)]
    slices = labeled_slices(cases, axis=0, image_channel=1)
    before = fine_tune_localiser(config, slices, 2, steps=0, progress=lambda _: None)
    after = fine_tune_localiser(config, slices, 2, steps=25, lr=2e-3, progress=lambda _: None)
    frozen = [n for n, p in after.named_parameters() if not p.requires_grad]
    assert any(n.startswith("sam.image_encoder.") for n in frozen)
    before_state, after_state = before.state_dict(), after.state_dict()
    assert all(torch.equal(before_state[n], after_state[n]) for n in frozen)
    assert any(not torch.equal(before_state[n], after_state[n]) for n in after_state if "lora_b" in n)

    def loss(model):
        predict = localiser_prompting_model(model)
        return float(sum(ce_dice(torch.log(predict(d)[None, :, 0].clamp_min(1e-6)), torch.from_numpy(s))
                         for _, d, s in cases))

    assert loss(after) < 0.8 * loss(before)
    # it reads the configured channel of nnU-Net's (C, D, H, W) data and answers like a trained nnU-Net would
    probs = localiser_prompting_model(after)(cases[0][1])
    assert probs.shape == (2, 1, 32, 40) and torch.allclose(probs.sum(0), torch.ones(1, 32, 40), atol=1e-5)
    alone = LocaliserPrompted(None, localiser_prompting_model(after), alone=True)(torch.from_numpy(cases[0][1])[None])
    assert torch.equal(alone.probabilities[0], probs)
