"""IFL's rounds: per unlabeled case, the previous round's nnU-Net prediction (kept per round: the history), key
slices from that history (keyframes.py), the generalist's propagation from them (propagation.py), and the round's
pseudo-label written to the offline cache that ``nnUNetTrainerIFLRound<r>`` learns from.

The pseudo-label of a case (ours; IFL publishes no code):

* on the slices a class's walk reached, the generalist's mask decides that class (that is what it adds: nnU-Net's
  misses along the structure, sharper outlines); several classes meet only in :func:`combine_classes`;
* elsewhere nnU-Net's own prediction is kept where it says background (no walk claims the voxel, and a
  propagation that stopped is no evidence of an object), and ignored where it says a class no walk confirmed;
* voxels whose confidence (the generalist's probability, or nnU-Net's for its background) is below
  ``min_confidence`` are ignored: the round trainer weighs a pseudo-labelled voxel 1 or 0 by its confidence.

Files of one fold (``work_folder``): ``round<r>/softmax/<case>.npz`` (round r's nnU-Net softmax of the case, uint8
quantised; only the last ``history`` rounds are kept), ``round<r>/stats/<case>.json`` (agreement of the round's
pseudo-label with nnU-Net), ``ifl_log.json`` and ``ifl_progress.png``. Every file is written atomically, so a killed
round continues at the case it stopped at.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunet_foundation.atomic_files import write_atomically, write_json_atomically
from nnunet_foundation.foundation.config import RGB, GeneralistConfigError
from nnunet_foundation.methods.ifl.keyframes import KeySliceSettings, key_slices, mask_dice
from nnunet_foundation.methods.ifl.propagation import (PropagationSettings, combine_classes, propagate_class,
                                                      propagate_class_video, video_state)
from nnunet_foundation.pseudo_labels import IGNORE, save_case

LOG_FILE = "ifl_log.json"
PLOT_FILE = "ifl_progress.png"


@dataclass(frozen=True)
class RoundSettings:
    #: rounds of predictions the key-slice uncertainty looks back over (the latest included)
    history: int = 2
    min_confidence: float = 0.5
    key: KeySliceSettings = field(default_factory=KeySliceSettings)
    propagation: PropagationSettings = field(default_factory=PropagationSettings)


def work_folder(results_dataset_folder: str, plans_identifier: str, configuration: str, fold: int) -> str:
    return os.path.join(results_dataset_folder, f"IFL__{plans_identifier}__{configuration}", f"fold_{fold}")


# ---------------------------------------------------------------------------------------------- history of rounds
def softmax_file(work: str, round_index: int, case: str) -> str:
    return os.path.join(work, f"round{round_index}", "softmax", f"{case}.npz")


def save_softmax(path: str, softmax: np.ndarray) -> None:
    quantised = np.round(np.clip(softmax, 0, 1) * 255).astype(np.uint8)  # 1/510 error; a quarter of float32's disk

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, softmax=quantised)

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, write)


def load_softmax(path: str) -> np.ndarray:
    with np.load(path) as npz:
        return npz["softmax"].astype(np.float32) / 255


def forget_old_rounds(work: str, next_round: int, history: int) -> None:
    """Delete the softmax maps that round ``next_round`` and later no longer look back at (before
    ``next_round - history``)."""
    for r in range(0, next_round - history):
        shutil.rmtree(os.path.join(work, f"round{r}", "softmax"), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- one case
def pseudo_label_from_history(image: np.ndarray, history: Sequence[np.ndarray], generalist, axis: int,
                              channel, settings: RoundSettings) -> Dict[str, np.ndarray]:
    """One case's round pseudo-label from its preprocessed image ``(C, D, H, W)`` and the rounds' softmax maps
    ``(K, D, H, W)`` (oldest first), slicing along spatial ``axis`` (0 for nnU-Net's 2d configuration); returns the
    cache arrays (``probabilities``, ``covered``, ``label``) and ``agreement`` (per foreground class, Dice between
    the pseudo-label and nnU-Net's latest prediction). ``channel``: the image channel the generalist sees, or
    ``"rgb"`` (channels 0-2 as colour: natural images such as endoscopy, where one channel loses the hue)."""
    if channel == RGB:
        volume = np.moveaxis(image[:3], axis + 1, 0)  # (Z, 3, h, w): colour slices along the propagation axis
        if hasattr(generalist, "track"):
            raise GeneralistConfigError("IFL's SAM2 video propagation takes one image channel: give image_channel as "
                                        "a channel index (colour is supported by the LiteMedSAM/SAM slice walk)")
    else:
        volume = np.moveaxis(image[channel], axis, 0)  # (Z, h, w): slices along the propagation axis
    maps = [np.moveaxis(h, axis + 1, 1) for h in history]
    latest = maps[-1].argmax(0)
    num_classes = maps[-1].shape[0]
    starts = key_slices(maps, settings.key)
    video = video_state(generalist, volume) if starts and hasattr(generalist, "track") else None  # SAM2 video
    grid = latest.shape  # (Z, h, w)
    probabilities, reached = [], []
    case_key = object()  # this call's slices, for the generalist's embedding cache: shared by the classes' walks
    if video is None and starts and getattr(generalist, "stitches", lambda hw: False)(volume.shape[-2:]):
        # small slices (SFR-style stitching): the whole volume in a few mosaics now, each walk step a decoder call
        generalist.prefetch_stitched(torch.from_numpy(np.ascontiguousarray(volume)).float(),
                                     [(case_key, z) for z in range(volume.shape[0])])
    for c in range(1, num_classes):
        if c in starts:  # each class walks on its own: no class's masks seed another's (semantic-aware memory)
            p, r = propagate_class(generalist, volume, latest == c, starts[c], settings.propagation, case_key) \
                if video is None else propagate_class_video(generalist, video, latest == c, starts[c],
                                                            settings.propagation)
        else:
            p, r = np.zeros(grid, np.float32), np.zeros(grid[0], bool)
        probabilities.append(p)
        reached.append(r)
    label, confidence = combine_classes(probabilities)
    walked = np.any(reached, 0)[:, None, None]  # slices some walk reached: the generalist has an opinion there
    # nnU-Net's class c on a slice no walk of c reached, and not claimed by the generalist: unconfirmed
    confirmed = np.zeros(grid, bool)
    for c, r in enumerate(reached, 1):
        confirmed |= (latest == c) & r[:, None, None]
    unconfirmed = (latest > 0) & ~confirmed & (label == 0)
    # background where no walk went is nnU-Net's, as confident as nnU-Net is
    confidence = np.where((label == 0) & ~walked, maps[-1][0], confidence)
    label[unconfirmed | (confidence < settings.min_confidence)] = IGNORE
    stacked = np.stack(probabilities)
    full = np.concatenate([np.clip(1 - stacked.max(0, keepdims=True), 0, 1), stacked]).astype(np.float16)
    agreement = np.array([mask_dice(label == c, latest == c) for c in range(1, num_classes)], np.float32)
    covered = np.broadcast_to(walked, grid) | (label != IGNORE)
    return {"probabilities": np.moveaxis(full, 1, 1 + axis), "covered": np.moveaxis(covered, 0, axis),
            "label": np.moveaxis(label, 0, axis), "agreement": agreement}


def run_round_cases(work: str, cache: str, round_index: int, cases: Sequence[str],
                    load_image: Callable[[str], np.ndarray], specialist: Callable[[np.ndarray], torch.Tensor],
                    generalist, axis: int, channel, settings: RoundSettings,
                    progress: Callable[[str], None] = print) -> Dict[str, int]:
    """Pseudo-label ``cases`` for round ``round_index`` (its specialist: round ``round_index - 1``'s model), skipping
    finished ones (their cache file exists)."""
    import time

    todo = [c for c in cases if not os.path.isfile(os.path.join(cache, f"{c}.npz"))]
    progress(f"round {round_index}: {len(cases)} case(s) in this part, {len(cases) - len(todo)} already done, "
             f"{len(todo)} to do")
    started = time.perf_counter()
    for index, case in enumerate(todo, 1):
        image = load_image(case)
        latest_file = softmax_file(work, round_index - 1, case)
        if not os.path.isfile(latest_file):
            save_softmax(latest_file, specialist(image).numpy())
        history = [load_softmax(softmax_file(work, r, case))
                   for r in range(max(0, round_index - settings.history), round_index)
                   if os.path.isfile(softmax_file(work, r, case))]
        arrays = pseudo_label_from_history(image, history, generalist, axis, channel, settings)
        stats = {"agreement": [float(a) for a in arrays.pop("agreement")],
                 "labelled_fraction": float((arrays["label"] != IGNORE).mean())}
        os.makedirs(os.path.join(work, f"round{round_index}", "stats"), exist_ok=True)
        write_json_atomically(stats, os.path.join(work, f"round{round_index}", "stats", f"{case}.json"))
        save_case(cache, case, arrays)  # last: the case counts as finished once this file exists
        elapsed = time.perf_counter() - started
        progress(f"  [{index}/{len(todo)}] {case}: {stats['labelled_fraction']:.0%} of voxels labelled, agreement "
                 f"with nnU-Net {np.mean(stats['agreement']) if stats['agreement'] else float('nan'):.2f}; "
                 f"{elapsed:.0f} s elapsed, about {elapsed / index * (len(todo) - index):.0f} s left")
    return {"done": len(todo), "skipped": len(cases) - len(todo)}


# ---------------------------------------------------------------------------------------------- round summaries
def pseudo_label_change(previous_cache: str, cache: str, cases: Sequence[str], num_classes: int) -> float:
    """Mean over cases and foreground classes of the Dice between two rounds' pseudo-labels (ignored voxels count as
    no class): 1 = the round changed nothing."""
    from nnunet_foundation.pseudo_labels import load_case

    values = []
    for case in cases:
        a, b = load_case(previous_cache, case)["label"], load_case(cache, case)["label"]
        values += [mask_dice(a == c, b == c) for c in range(1, num_classes)]
    return float(np.mean(values)) if values else float("nan")


def round_agreement(work: str, round_index: int, cases: Sequence[str]) -> float:
    values = []
    for case in cases:
        path = os.path.join(work, f"round{round_index}", "stats", f"{case}.json")
        if os.path.isfile(path):
            with open(path) as f:
                values += json.load(f)["agreement"]
    return float(np.mean(values)) if values else float("nan")


def validation_dice(training_fold_folder: str) -> Optional[float]:
    """nnU-Net's validation Dice (foreground mean) of a finished round, from its validation/summary.json."""
    path = os.path.join(training_fold_folder, "validation", "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return float(json.load(f)["foreground_mean"]["Dice"])


def read_log(work: str) -> List[dict]:
    path = os.path.join(work, LOG_FILE)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return json.load(f)["rounds"]


def write_log(work: str, rounds: List[dict], header: dict) -> None:
    write_json_atomically({**header, "rounds": rounds}, os.path.join(work, LOG_FILE), indent=2)
    plot_rounds(rounds, os.path.join(work, PLOT_FILE))


def plot_rounds(rounds: List[dict], path: str) -> None:
    """Per round: pseudo-label change, generalist / nnU-Net agreement and validation Dice, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("validation_dice", "validation Dice (nnU-Net of the round)"),
              ("agreement", "pseudo-label vs nnU-Net (Dice)"),
              ("pseudo_label_change", "pseudo-labels vs previous round (Dice)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        xs = [r["round"] for r in rounds if r.get(key) is not None and not np.isnan(r[key])]
        ys = [r[key] for r in rounds if r.get(key) is not None and not np.isnan(r[key])]
        ax.plot(xs, ys, "o-")
        if not xs:
            ax.text(0.5, 0.5, "no value yet" if key != "pseudo_label_change" else "from round 2 on",
                    transform=ax.transAxes, ha="center", color="grey")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.set_xticks(range(0, max([r["round"] for r in rounds] + [1]) + 1))
        ax.grid(alpha=0.3)
    fig.suptitle("IFL rounds")
    fig.tight_layout()

    def write(tmp: str) -> None:
        fig.savefig(tmp, format="png", dpi=110)

    write_atomically(path, write)
    plt.close(fig)
