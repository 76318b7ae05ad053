"""SFR stages 1-2 (and SFR+): fine-tune the generalist on stitched labeled patches, save it for re-training.

* Sampling (:class:`LabeledPatchSampler`): a 3d configuration crops the plan's patch from a labeled case (a third
  of the crops centred on a labeled object, as nnU-Net oversamples foreground) and stitches every slice along the
  generalist's slicing axis; a 2d configuration fills each mosaic with that many 2D patches of random slices. Random
  flips (and 90-degree rotations of square slices) per crop.
* Fine-tuning (:func:`fine_tune`): LoRA (rank 4) on q/v of every image-encoder block, the decoder and the prompt-free
  multi-class head learn (``foundation/lora.py``); loss 0.5 (CE + Dice) on the mosaic pixels that hold a labeled
  voxel; AdamW (lr 1e-3, weight decay 0.1, none on biases and norms), poly schedule
  ``lr (1 - t/T)^0.9`` per iteration, as the reference.
* Saved state: the trainable tensors only (:func:`~nnunet_foundation.foundation.lora.adaptable_state_dict`), the
  generalist configuration that rebuilds the frozen rest from its checkpoint, the optimiser and sampler state (for
  resuming), under ``$nnUNet_results/<dataset>/SFR_generalist__<plans>__<configuration>/fold_<f>/`` with
  ``manifest.json``.
* SFR+ (ours; not in the released code): after the first round, every unlabeled case is segmented; cases whose mean
  max-softmax reaches ``plus_threshold`` (0.985) join the labeled set with the generalist's hard labels for a second
  round of the same length, continued from the first round's weights with a fresh optimiser and schedule.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from nnunet_foundation.foundation.config import RGB
from nnunet_foundation.foundation.geometry import mosaic_layout, patch_to_slices, slices_to_patch
from nnunet_foundation.methods.sfr.stitching import IGNORE, mosaic_loss, tiled_slice_logits

MANIFEST = "manifest.json"
STATE_FILE = "fine_tuning_state.pth"
FINAL_FILE = "generalist_final.pth"
CONFIDENCE_FILE = "sfr_plus_confidence.json"
PLUS_LABELS = "sfr_plus_labels"
#: the reference's fine-tuning length (6000 iterations at batch 2 on LA with 8 labeled volumes: 750 per case);
#: ``iterations = 0`` means min(MAX_AUTO_ITERATIONS, ITERATIONS_PER_CASE x labeled cases)
ITERATIONS_PER_CASE = 750
MAX_AUTO_ITERATIONS = 6000
FOREGROUND_OVERSAMPLING = 1 / 3


class SFRError(RuntimeError):
    """SFR input or state that cannot be used; the message names the file and the fix."""


def generalist_folder(results_dataset_folder: str, plans_identifier: str, configuration: str, fold) -> str:
    """Where ``nnunet-foundation sfr`` writes the fine-tuned generalist of one fold and ``nnUNetTrainerSFR`` reads
    it: beside the trained models of the dataset."""
    return os.path.join(results_dataset_folder, f"SFR_generalist__{plans_identifier}__{configuration}",
                        f"fold_{fold}")


def auto_iterations(num_labeled_cases: int) -> int:
    return int(min(MAX_AUTO_ITERATIONS, ITERATIONS_PER_CASE * max(1, num_labeled_cases)))


def sfr_generalist_config(setting, owner: str, configuration_manager, num_classes: int, lora_rank: int = 4,
                          dataset_json: Optional[dict] = None) -> dict:
    """The one generalist SFR fine-tunes (``generalists`` setting, default LiteMedSAM) with LoRA on q/v (scaling
    alpha / rank = 1, as the reference's LoRA adds B(A(x)) unscaled), trainable decoder and a multi-class head. An
    R, G, B dataset (``dataset_json``) is shown to it in colour unless the setting names an ``image_channel``."""
    from nnunet_foundation.foundation.config import colour_defaults
    from nnunet_foundation.foundation.cotrained_sam import resolve_cotrained_generalist

    config = resolve_cotrained_generalist(setting, owner, configuration_manager,
                                          implied=colour_defaults(dataset_json or {}))
    if len(configuration_manager.patch_size) == 2:
        config["axis"] = 0  # nnU-Net's 2d slices along the first axis
    return {**config, "image_channel": 0 if config.get("image_channel") is None else config["image_channel"],
            "lora_rank": int(lora_rank), "lora_alpha": float(lora_rank), "train_decoder": True,
            "multiclass_head": True, "num_classes": int(num_classes)}


def build_sfr_generalist(config: dict, adapted: Optional[dict] = None, device: torch.device = torch.device("cpu")):
    """The generalist of ``config`` (frozen backbone from its checkpoint), with ``adapted`` tensors loaded."""
    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.foundation.lora import load_adaptable_state_dict

    generalist = build_generalist(config).to(device)
    if adapted is not None:
        load_adaptable_state_dict(generalist, {k: v.to(device) for k, v in adapted.items()})
    return generalist.train(False)


def slice_axis(config: dict, is_2d: bool) -> int:
    from nnunet_foundation.foundation.geometry import choose_slice_axis

    if is_2d:
        return 0
    return config["axis"] if config.get("axis") is not None else choose_slice_axis(config.get("spacing"))


def in_plane(patch_size: Sequence[int], axis: int, is_2d: bool) -> Tuple[int, int]:
    """The in-plane size of a configuration's patch when sliced along ``axis``."""
    if is_2d:
        return int(patch_size[0]), int(patch_size[1])
    rest = [int(s) for i, s in enumerate(patch_size) if i != axis]
    return rest[0], rest[1]


# ------------------------------------------------------------------------------------------------ sampling
def labels_for_training(seg: np.ndarray, ignore_label: Optional[int]) -> np.ndarray:
    """nnU-Net's preprocessed segmentation -> labels with :data:`IGNORE` where nothing is known (nnU-Net's -1 outside
    the normalisation mask, the dataset's ignore label)."""
    labels = np.asarray(seg).astype(np.int64)
    labels = labels[0] if labels.ndim == 4 else labels
    unknown = labels < 0
    if ignore_label is not None:
        unknown |= labels == ignore_label
    labels[unknown] = IGNORE
    return labels


class LabeledPatchSampler:
    """Random labeled crops as slices for the mosaics (see the module docstring). ``cases``: ``(data (C, D, H, W),
    labels (D, H, W))`` with :data:`IGNORE` where unknown."""

    def __init__(self, cases: List[Tuple[np.ndarray, np.ndarray]], patch_size: Sequence[int], axis: int,
                 is_2d: bool, channel, target: int, seed: int = 0):
        if not cases:
            raise SFRError("SFR fine-tuning needs at least one labeled case")
        self.cases = cases
        self.patch_size = tuple(int(p) for p in patch_size)
        self.axis, self.is_2d, self.channel = axis, is_2d, channel
        self.generator = torch.Generator().manual_seed(int(seed))
        # a few foreground voxels per case for the oversampled crops
        self.foreground = []
        for _, labels in cases:
            fg = np.argwhere((labels > 0) & (labels != IGNORE))
            if len(fg) > 4096:
                fg = fg[np.linspace(0, len(fg) - 1, 4096).astype(int)]
            self.foreground.append(fg)
        self.slices_per_item = mosaic_layout(1, in_plane(self.patch_size, axis, is_2d), target).per_mosaic \
            if is_2d else None

    def _randint(self, high: int) -> int:
        return int(torch.randint(max(int(high), 1), (1,), generator=self.generator))

    def _crop(self, case: int, size: Sequence[int], centre: Optional[Sequence[int]]) -> Tuple[np.ndarray, np.ndarray]:
        """A crop of ``size`` (over the last len(size) axes of the case's (D, H, W)); padded where the case is
        smaller (image 0, label IGNORE)."""
        data, labels = self.cases[case]
        image = data[:3] if self.channel == RGB else data[self.channel]  # (3, D, H, W) colour or (D, H, W)
        shape = image.shape[-len(size):]
        starts = []
        for d, (extent, s) in enumerate(zip(shape, size)):
            if extent < s:  # centred, padded
                starts.append(-((s - extent) // 2))
            elif centre is not None:
                starts.append(min(max(int(centre[d]) - s // 2, 0), extent - s))
            else:
                starts.append(self._randint(extent - s + 1))
        src = tuple(slice(max(st, 0), min(st + s, extent)) for st, s, extent in zip(starts, size, shape))
        dst = tuple(slice(max(-st, 0), max(-st, 0) + (sl.stop - sl.start)) for st, sl in zip(starts, src))
        lead, label_lead = (slice(None),) * (image.ndim - len(size)), (slice(None),) * (labels.ndim - len(size))
        out_image = np.zeros(image.shape[:image.ndim - len(size)] + tuple(size), dtype=np.float32)
        out_label = np.full(labels.shape[:labels.ndim - len(size)] + tuple(size), IGNORE, dtype=np.int64)
        out_image[lead + dst] = image[lead + src]
        out_label[label_lead + dst] = labels[label_lead + src]
        return out_image, out_label

    def _augment(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The same random flips (and rotation by a multiple of 90 degrees, square slices only) for all slices of
        one crop ``(S, h, w)``."""
        for dim in (-1, -2):
            if self._randint(2):
                image, label = image.flip(dim), label.flip(dim)
        if image.shape[-1] == image.shape[-2]:
            k = self._randint(4)
            image, label = torch.rot90(image, k, (-2, -1)), torch.rot90(label, k, (-2, -1))
        return image, label

    def _pick(self) -> Tuple[int, Optional[np.ndarray]]:
        case = self._randint(len(self.cases))
        fg = self.foreground[case]
        if len(fg) and float(torch.rand((), generator=self.generator)) < FOREGROUND_OVERSAMPLING:
            return case, fg[self._randint(len(fg))]
        return case, None

    def sample(self, batch_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` crops -> slices ``(N, h, w)`` float (colour: ``(N, 3, h, w)``) and labels ``(N, h, w)``
        long."""
        colour = self.channel == RGB
        images, labels = [], []
        for _ in range(batch_size):
            if self.is_2d:  # one mosaic of 2D patches from random slices of random cases
                for _ in range(self.slices_per_item):
                    case, centre = self._pick()
                    depth = self.cases[case][1].shape[0]
                    z = int(centre[0]) if centre is not None else self._randint(depth)
                    image, label = self._crop(case, self.patch_size, None if centre is None else centre[1:])
                    image = image[:, z][None] if colour else image[z:z + 1]
                    image, label = self._augment(torch.from_numpy(image), torch.from_numpy(label[z:z + 1]))
                    images.append(image)
                    labels.append(label)
            else:
                case, centre = self._pick()
                image, label = self._crop(case, self.patch_size, centre)
                image = torch.from_numpy(image)[None] if colour else torch.from_numpy(image)[None, None]
                image = patch_to_slices(image, self.axis)[0].transpose(0, 1)  # (S, C', h, w)
                image = image if colour else image[:, 0]
                label = patch_to_slices(torch.from_numpy(label)[None, None], self.axis)[0, 0]
                image, label = self._augment(image, label)
                images.append(image)
                labels.append(label)
        return torch.cat(images), torch.cat(labels)

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


# ------------------------------------------------------------------------------------------------ fine-tuning
def poly_lr(lr: float, iteration: int, iterations: int) -> float:
    return lr * (1.0 - iteration / max(iterations, 1)) ** 0.9


def fine_tune(generalist, sampler: LabeledPatchSampler, iterations: int, batch_size: int = 2, lr: float = 1e-3,
              weight_decay: float = 0.1, resume: Optional[dict] = None,
              save: Optional[Callable[[dict], None]] = None, save_every: int = 25, tag: str = "fine-tuning",
              progress: Callable[[str], None] = print) -> List[float]:
    """Train the generalist's adapted parts for ``iterations`` AdamW steps on stitched labeled slices; returns the
    loss of every step. ``resume``: a state that ``save`` received (continues exactly: tensors, optimiser, sampler
    RNG, losses); ``save`` gets ``{"adapted", "optimizer", "sampler", "iteration", "losses"}`` every ``save_every``
    steps and after the last."""
    from nnunet_foundation.foundation.lora import (adaptable_state_dict, load_adaptable_state_dict,
                                                   trainable_parameter_groups)

    optimiser = torch.optim.AdamW(trainable_parameter_groups(generalist, lr, weight_decay))
    start, losses = 0, []
    if resume is not None:
        load_adaptable_state_dict(generalist, resume["adapted"])
        optimiser.load_state_dict(resume["optimizer"])
        sampler.set_state(resume["sampler"])
        start, losses = int(resume["iteration"]), list(resume["losses"])
        progress(f"SFR {tag}: resuming at iteration {start}/{iterations}")

    def snapshot(iteration: int) -> dict:
        return {"adapted": {k: v.detach().cpu().clone() for k, v in adaptable_state_dict(generalist).items()},
                "optimizer": optimiser.state_dict(), "sampler": sampler.state(), "iteration": iteration,
                "losses": list(losses)}

    generalist.train(True)
    started, done_here = time.perf_counter(), 0
    try:
        for iteration in range(start, iterations):
            for group in optimiser.param_groups:
                group["lr"] = poly_lr(lr, iteration, iterations)
            slices, labels = sampler.sample(batch_size)
            with torch.enable_grad():
                loss = mosaic_loss(generalist, slices, labels)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
            losses.append(float(loss.detach()))
            done_here += 1
            step = iteration + 1
            if save is not None and (step % save_every == 0 or step == iterations):
                save(snapshot(step))
            if step == start + 1 or step % 10 == 0 or step == iterations:
                per_it = (time.perf_counter() - started) / done_here
                recent = losses[-10:]
                progress(f"SFR {tag}: iteration {step}/{iterations}, loss {losses[-1]:.4f} (last {len(recent)}: "
                         f"{sum(recent) / len(recent):.4f}), {per_it:.2f} s/it, about "
                         f"{_duration(per_it * (iterations - step))} left")
    finally:
        generalist.train(False)
    return losses


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------------ prediction
@torch.no_grad()
def predict_case(generalist, data: np.ndarray, axis: int, channel, tile_hw: Sequence[int]) -> torch.Tensor:
    """A preprocessed case ``(C, D, H, W)`` -> the generalist's softmax ``(K, D, H, W)``: every slice along
    ``axis``, in tiles of the training patch's in-plane size, through mosaics (``channel="rgb"``: in colour)."""
    colour = channel == RGB
    # a copy: the case may be a read-only map
    image = torch.from_numpy(np.array(data[:3] if colour else data[channel][None], dtype=np.float32))
    slices = patch_to_slices(image[None], axis)[0].transpose(0, 1)  # (S, C', h, w)
    slices = slices if colour else slices[:, 0]
    probs = torch.softmax(tiled_slice_logits(generalist, slices, tile_hw).float(), 1)  # (S, K, h, w)
    return slices_to_patch(probs.transpose(0, 1)[None], axis)[0]


def mean_max_softmax(probs: torch.Tensor) -> float:
    """SFR+'s confidence of a case: the mean over its voxels of the largest class probability."""
    return float(probs.max(0).values.mean())


# ------------------------------------------------------------------------------------------------ files
def read_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_final(folder: str) -> dict:
    """The finished fine-tuned generalist of ``folder``: ``{"config", "adapted", "rounds", ...}``."""
    path = os.path.join(folder, FINAL_FILE)
    if not os.path.isfile(path):
        raise SFRError(f"{path} does not exist: the SFR fine-tuning in {folder} has not finished")
    return torch.load(path, map_location="cpu", weights_only=True)


__all__ = ["SFRError", "generalist_folder", "auto_iterations", "sfr_generalist_config", "build_sfr_generalist",
           "LabeledPatchSampler", "fine_tune", "predict_case", "mean_max_softmax", "read_manifest", "load_final"]
