"""The image-level classifier on a SAM-family image encoder, and the class activation maps it yields.

Two 1x1 heads on the encoder's image embedding, as in the paper: the parent head (one logit per class) and the
sub-class head (``num_classes * K + 1`` logits, see :mod:`.subclasses`); both see the embedding averaged over the image
content (not over the padding that LiteMedSAM and SAM add bottom/right), and the CAM is the parent head applied to
every cell of the embedding, min-max normalised per image and class. Because the heads are linear, the pooled logit is
exactly the CAM's mean: the map explains the decision.

What learns (``trainable``): ``"lora"`` (the paper's choice, adapted to what this package has) LoRA on the encoder's
attention q/v projections (``foundation/lora.py``) plus the heads; ``"heads"`` the heads alone on a frozen encoder, so
the pooled embeddings are computed once and a CPU can afford the training (one encoder pass per slice instead of one
per step). Everything else of the generalist stays frozen: bit-identical before and after training.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Tuple

import torch
from torch import nn

from nnunet_foundation.methods.weakmedsam.affinity import min_max

TRAINABLE_MODES = ("lora", "heads")


def build_encoder_generalist(generalist_config: dict, trainable: str, lora_rank: int = 4):
    """The generalist whose encoder classifies: the user's configuration plus LoRA when ``trainable == "lora"``."""
    from nnunet_foundation.foundation.config import build_generalist

    if trainable not in TRAINABLE_MODES:
        raise ValueError(f"trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")
    config = dict(generalist_config)
    if trainable == "lora":
        config["lora_rank"] = int(lora_rank)
    generalist = build_generalist(config)
    if not hasattr(generalist, "sam"):
        raise ValueError(f"WeakMedSAM needs a SAM-family generalist with an image encoder, prompt encoder and mask "
                         f"decoder (backends litemedsam, sam, medsam); got backend {generalist_config.get('backend')!r}")
    return generalist


@contextlib.contextmanager
def lora_disabled(generalist) -> Iterator[None]:
    """The frozen checkpoint's encoder for the duration: every LoRA update scaled by 0 (exactly the base output).
    The prompt-affinity masks come from the frozen SAM, as in the paper, even after the classifier adapted it."""
    from nnunet_foundation.foundation.lora import LoRAQKV

    wrapped = [m for m in generalist.modules() if isinstance(m, LoRAQKV)]
    saved = [m.scaling for m in wrapped]
    try:
        for m in wrapped:
            m.scaling = 0.0
        yield
    finally:
        for m, s in zip(wrapped, saved):
            m.scaling = s


def content_cells(geometry, embedding_hw: Tuple[int, int]) -> Tuple[int, int]:
    """How many embedding rows / columns cover image content (the rest encodes padding only)."""
    h, w = embedding_hw
    rows = max(1, min(h, math.ceil(geometry.resized_hw[0] / geometry.target * h)))
    cols = max(1, min(w, math.ceil(geometry.resized_hw[1] / geometry.target * w)))
    return rows, cols


class WeakClassifier(nn.Module):
    """Parent and sub-class heads on a generalist's image embedding (see the module docstring)."""

    def __init__(self, generalist, num_classes: int, num_subclasses: int, seed: int = 0):
        super().__init__()
        self.generalist = generalist
        self.num_classes = int(num_classes)
        self.num_subclasses = int(num_subclasses)
        channels = int(generalist.sam.prompt_encoder.embed_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.parent_head = nn.Conv2d(channels, self.num_classes, 1, bias=False)
            self.subclass_head = nn.Conv2d(channels, self.num_classes * self.num_subclasses + 1, 1, bias=False)

    def head_parameters(self):
        return list(self.parent_head.parameters()) + list(self.subclass_head.parameters())

    def trainable_parameters(self):
        return self.head_parameters() + self.generalist.trainable_parameters()

    def embed(self, slices: torch.Tensor):
        """``(N, h, w)`` slices of one size -> ``(N, C, eh, ew)`` embeddings and their resize geometry."""
        inputs, geometry = self.generalist._to_model_input(slices.to(self.generalist.device))
        return self.generalist.encode(inputs), geometry

    @staticmethod
    def pool(embeddings: torch.Tensor, geometry) -> torch.Tensor:
        rows, cols = content_cells(geometry, embeddings.shape[-2:])
        return embeddings[..., :rows, :cols].mean(dim=(-2, -1))

    def logits(self, pooled: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(N, C)`` pooled embeddings -> parent ``(N, K)`` and sub-class ``(N, K * S + 1)`` logits."""
        x = pooled[:, :, None, None]
        return self.parent_head(x).flatten(1), self.subclass_head(x).flatten(1)

    def cams(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N, K, eh, ew)`` class activation maps, min-max per image and class."""
        return min_max(self.parent_head(embeddings))

    def trained_state(self) -> dict:
        from nnunet_foundation.foundation.lora import adaptable_state_dict

        return {"parent_head": self.parent_head.state_dict(), "subclass_head": self.subclass_head.state_dict(),
                "adapted": adaptable_state_dict(self.generalist)}

    def load_trained_state(self, state: dict) -> None:
        from nnunet_foundation.foundation.lora import load_adaptable_state_dict

        self.parent_head.load_state_dict(state["parent_head"])
        self.subclass_head.load_state_dict(state["subclass_head"])
        if state["adapted"]:
            load_adaptable_state_dict(self.generalist, state["adapted"])
