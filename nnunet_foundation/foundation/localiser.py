"""A localiser fine-tuned on the labeled cases: the generalist learns *where* the target is (issue 22, lever 4).

With a handful of labels a frozen generalist only redraws the outlines it is pointed at, and the specialist that
points is weak. Here the generalist itself is adapted, briefly, on the labeled cases with the machinery SynFoC
uses: LoRA on its image encoder, its decoder, and the prompt-free multi-class head (``foundation/lora.py``), trained
with cross-entropy + Dice on the labeled slices (random flips and 90-degree rotations). Its pretrained encoder has
seen a million medical images, so a few labeled ones may teach it the target's appearance better than they teach a
network trained from scratch. The fine-tuned model then serves as the *prompting model* (``data -> probabilities``,
the same contract as :func:`nnunet_foundation.specialist.load_specialist`): the frozen generalist is prompted from
its components, or its own map is used directly.

Only labeled cases are read with labels. On a CPU this costs a forward and backward pass of the image encoder per
slice and step (TinyViT: a few seconds per 256-px image on two cores): keep ``steps`` small.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Tuple

import numpy as np
import torch

from nnunet_foundation.foundation.geometry import patch_to_slices


def labeled_slices(cases: Iterable[Tuple[str, np.ndarray, np.ndarray]], axis: int, image_channel: int = 0,
                   max_background_fraction: float = 0.25) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(image (h, w), label (h, w))`` slices of nnU-Net-preprocessed labeled cases ``(id, data (C, D, H, W), seg
    (D, H, W))``: every slice with a labeled object, plus up to ``max_background_fraction`` as many without (so the
    localiser also learns to say "nothing here"). Ignore labels (< 0) become background."""
    with_object, without = [], []
    for _, data, seg in cases:
        images = patch_to_slices(torch.from_numpy(np.asarray(data, dtype=np.float32))[None], axis)[0, image_channel]
        labels = patch_to_slices(torch.from_numpy(np.asarray(seg).astype(np.int64))[None, None], axis)[0, 0]
        for image, label in zip(images, labels.clamp_min(0)):
            (with_object if (label > 0).any() else without).append((image, label))
    if not with_object:
        raise ValueError("the labeled cases hold no object to fine-tune a localiser on")
    keep = int(max_background_fraction * len(with_object))
    return with_object + without[::max(1, len(without) // max(keep, 1))][:keep] if keep else with_object


def fine_tune_localiser(config: dict, slices: List[Tuple[torch.Tensor, torch.Tensor]], num_classes: int,
                        steps: int = 60, batch_size: int = 4, lr: float = 5e-4, lora_rank: int = 4, seed: int = 0,
                        device: torch.device = torch.device("cpu"), progress: Callable[[str], None] = print):
    """A copy of the generalist ``config`` with LoRA (rank ``lora_rank``), trainable decoder and a prompt-free
    ``num_classes`` head, trained for ``steps`` AdamW steps on ``slices``; returned in eval mode."""
    from nnunet_foundation.foundation.config import build_generalist, single_image_channel
    from nnunet_foundation.training.losses import ce_dice

    # trained on single-channel slices: the configured image channel is picked from the data at prediction
    source_channel = single_image_channel(config, "the localiser")
    generalist = build_generalist({**config, "image_channel": 0, "lora_rank": lora_rank,
                                   "lora_alpha": float(lora_rank), "train_decoder": True, "multiclass_head": True,
                                   "num_classes": num_classes}).to(device)
    generalist.source_channel = source_channel
    parameters = generalist.trainable_parameters()
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-2)
    generator = torch.Generator().manual_seed(seed)
    generalist.train(True)
    for step in range(1, steps + 1):
        picks = torch.randint(len(slices), (batch_size,), generator=generator).tolist()
        images, labels = [], []
        for i in picks:
            image, label = slices[i]
            # flips and rotations by 90 degrees keep image and label aligned (square-agnostic: rot90 swaps h, w, so
            # it is used only on square slices)
            k = int(torch.randint(4, (1,), generator=generator)) if image.shape[0] == image.shape[1] else 0
            flip = bool(torch.randint(2, (1,), generator=generator))
            image, label = torch.rot90(image, k), torch.rot90(label, k)
            if flip:
                image, label = image.flip(-1), label.flip(-1)
            images.append(image)
            labels.append(label)
        with torch.enable_grad():
            # one slice at a time: slices of one dataset may differ in size (2D images); the encoder resizes each
            # to its own input size anyway, so batching would save nothing but the Python loop
            loss = sum(ce_dice(generalist.multiclass_head.segment_patches(generalist, x[None, None].to(device))
                               .float(), y[None].to(device)) for x, y in zip(images, labels)) / len(images)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if step == 1 or step % 10 == 0 or step == steps:
            progress(f"  localiser step {step}/{steps}: CE + Dice {float(loss.detach()):.3f}")
    return generalist.train(False)


def localiser_prompting_model(localiser) -> Callable[[np.ndarray], torch.Tensor]:
    """``data (C, D, H, W) -> softmax (K, D, H, W)`` of a fine-tuned localiser, slice-wise (the contract of
    :func:`nnunet_foundation.specialist.load_specialist`, so it can prompt a generalist or be scored alone)."""

    @torch.no_grad()
    def predict(data: np.ndarray) -> torch.Tensor:
        channel = localiser.source_channel
        x = torch.from_numpy(np.ascontiguousarray(data[channel:channel + 1], dtype=np.float32))[None]
        x = x.to(localiser.device)
        return torch.softmax(localiser.multiclass_head.segment_patches(localiser, x).float(), 1)[0].cpu()

    return predict


class LocaliserPrompted:
    """A segmenter for ``generalist-quality`` / ``pseudo-label``: the frozen ``generalist`` prompted from the
    localiser's prediction (``alone=True``: the localiser's own map), ignoring the specialist's."""

    def __init__(self, generalist, localiser_predict: Callable[[np.ndarray], torch.Tensor], alone: bool = False):
        self.generalist = generalist
        self.predict = localiser_predict
        self.alone = alone

    def __call__(self, images: torch.Tensor, specialist_probs: Optional[torch.Tensor] = None, cache_keys=None):
        from nnunet_foundation.foundation.generalist import GeneralistOutput

        probs = torch.stack([self.predict(image.cpu().numpy()) for image in images])
        if self.alone:
            return GeneralistOutput(probabilities=probs, prompted=torch.ones(probs.shape[:2], dtype=torch.bool))
        return self.generalist(images, probs, cache_keys=cache_keys)
