"""How good is a generalist on a dataset, before it guides any training: ``nnunet-foundation generalist-quality``.

On a dataset's labeled training cases, as nnU-Net preprocessed them (the intensities a trainer hands the
generalist), each generalist segments every slice of the case, prompted in up to two ways:

``oracle``
    boxes (or whatever the generalist's prompt settings derive) from the ground truth: the ceiling of prompting,
    what the model can do when it is told exactly where the object is.
``specialist``
    prompts from a trained nnU-Net model's own softmax on the case (``-tr/-f``): what SemiSAM and the offline
    pseudo-labels actually get. The specialist's own Dice is reported beside it.
``proposals`` / ``proposals-head``
    the generalist proposes regions everywhere from a grid of boxes, and the specialist's agreement (or a small
    head fitted on the prompting model's labeled cases) decides which are objects (foundation/proposals.py): the
    lever against a specialist that misses objects.
``localiser`` / ``localiser-alone``
    a copy of the generalist fine-tuned on those labeled cases (foundation/localiser.py) prompts the frozen
    generalist, or is scored by its own map; no specialist needed.

3D cases are sliced along the generalist's axis (the plan's lowest-resolution axis unless configured); a 2d
configuration is sliced along axis 0, as nnU-Net's 2d configuration does. Results: Dice per class and mode, encoder
milliseconds per slice; :func:`write_report` writes a Markdown table, JSON and a PNG.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

MODES = ("oracle", "specialist")
PROPOSAL_MODES = ("proposals", "proposals-head")
#: modes whose segmenter prompts from a model of its own (foundation/localiser.py), not from the specialist
SELF_PROMPTED_MODES = ("localiser", "localiser-alone")


@dataclass
class QualityResult:
    """One generalist (or the specialist alone) prompted one way, over the evaluated cases."""

    name: str
    mode: str
    dice_per_class: Dict[str, float]
    dice_per_case: Dict[str, Dict[str, float]] = field(default_factory=dict)
    ms_per_slice: Optional[float] = None
    slices_encoded: int = 0

    @property
    def mean_dice(self) -> float:
        return _nanmean(self.dice_per_class.values())


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, classes: Sequence[int]) -> Dict[int, float]:
    """Dice of each class; NaN where the class is in neither (nothing to score)."""
    out = {}
    for c in classes:
        p, t = prediction == c, truth == c
        denominator = p.sum() + t.sum()
        out[c] = float(2 * (p & t).sum() / denominator) if denominator else float("nan")
    return out


def one_hot(label: np.ndarray, num_classes: int) -> torch.Tensor:
    """``(D, H, W)`` integer labels -> ``(1, K, D, H, W)`` float one-hot (ignore labels count as background)."""
    label = np.where((label >= 0) & (label < num_classes), label, 0).astype(np.int64)
    return torch.nn.functional.one_hot(torch.from_numpy(label), num_classes).movedim(-1, 0)[None].float()


def load_preprocessed_cases(preprocessed_folder: str, identifiers: Optional[Sequence[str]] = None):
    """Yield ``(identifier, data (C, D, H, W) float32, seg (D, H, W) int)`` of nnU-Net preprocessed cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset_class = infer_dataset_class(preprocessed_folder)
    ids = list(identifiers) if identifiers is not None else dataset_class.get_identifiers(preprocessed_folder)
    dataset = dataset_class(preprocessed_folder, ids)
    for identifier in ids:
        data, seg, _, _ = dataset.load_case(identifier)
        yield identifier, np.asarray(data, dtype=np.float32), np.asarray(seg[0]).astype(np.int64)


def evaluate_generalist(generalist, cases, classes: Dict[int, str], specialist: Optional[Callable] = None,
                        modes: Sequence[str] = MODES, progress: Callable[[str], None] = print,
                        segmenters: Optional[Dict[str, Callable]] = None) -> List[QualityResult]:
    """Run one generalist over ``cases`` (from :func:`load_preprocessed_cases`) in each mode.

    Args:
        generalist: a built :class:`~nnunet_foundation.foundation.generalist.Generalist`.
        classes: foreground label value -> name.
        specialist: ``data (C, D, H, W) -> probabilities (K, D, H, W)``, needed for every mode but ``oracle``.
        segmenters: for modes other than ``oracle``/``specialist``: ``(images, specialist_probs, cache_keys) ->
            GeneralistOutput`` (e.g. a :class:`~.proposals.RegionProposer`), given the specialist's probabilities.
    Returns:
        one result per mode, plus ``specialist alone`` when the specialist mode ran.
    """
    num_classes = max(classes) + 1
    foreground = sorted(classes)
    segmenters = segmenters or {}
    per_case: Dict[str, Dict[str, Dict[str, float]]] = {m: {} for m in (*modes, "specialist alone")}
    seconds = {m: 0.0 for m in modes}
    encoded = {m: 0 for m in modes}
    cases = list(cases)
    for index, (identifier, data, seg) in enumerate(cases, 1):
        images = torch.from_numpy(data)[None]
        started = time.perf_counter()
        specialist_probs = None
        for mode in modes:
            if mode == "oracle":
                probs = one_hot(seg, num_classes)
            elif specialist is None and mode in SELF_PROMPTED_MODES:
                probs = None  # the segmenter brings its own prompting model
            else:
                if specialist is None:
                    raise ValueError(f"mode {mode!r} needs a trained nnU-Net model (-tr, -f)")
                if specialist_probs is None:
                    specialist_probs = specialist(data)[None].float()
                    alone = specialist_probs[0].argmax(0).numpy()
                    per_case["specialist alone"][identifier] = _named(dice_per_class(alone, seg, foreground),
                                                                      classes)
                probs = specialist_probs
            # one key per case: the modes prompt the same slices differently, so with cache_embeddings the encoder
            # (the cost) runs once per slice, not once per mode
            segment = segmenters[mode] if mode in segmenters else generalist
            out = segment(images, probs, cache_keys=[identifier])
            prediction = out.probabilities[0].argmax(0).cpu().numpy()
            per_case[mode][identifier] = _named(dice_per_class(prediction, seg, foreground), classes)
            seconds[mode] += out.seconds
            encoded[mode] += out.num_encoded
        progress(f"  case {index}/{len(cases)} {identifier}: "
                 + ", ".join(f"{m} {np.nanmean(list(per_case[m][identifier].values())):.3f}" for m in modes)
                 + f" ({time.perf_counter() - started:.1f} s)")
    results = []
    for mode in (*modes, "specialist alone"):
        if not per_case[mode]:
            continue
        mean = {name: _nanmean([d[name] for d in per_case[mode].values()]) for name in classes.values()}
        # the encoder dominates the cost; a mode whose slices all came from the embedding cache has no per-image time
        timing = dict(ms_per_slice=1000 * seconds[mode] / encoded[mode] if encoded[mode] else None,
                      slices_encoded=encoded[mode]) if mode in seconds else {}
        results.append(QualityResult(name="", mode=mode, dice_per_class=mean, dice_per_case=per_case[mode], **timing))
    return results


def _named(values: Dict[int, float], classes: Dict[int, str]) -> Dict[str, float]:
    return {classes[c]: v for c, v in values.items()}


def _nanmean(values) -> float:
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def write_report(results: List[QualityResult], output_folder: str, title: str, notes: Sequence[str] = ()) -> str:
    """``generalist_quality.md``, ``.json`` and ``.png`` in ``output_folder``; returns the Markdown text."""
    os.makedirs(output_folder, exist_ok=True)
    class_names = list(results[0].dice_per_class)
    lines = [f"# {title}", "", *notes, "",
             "| generalist | prompts | " + " | ".join(f"Dice {c}" for c in class_names) + " | mean | ms per encoded "
             "image |", "|---" * (len(class_names) + 4) + "|"]
    for r in results:
        timing = f"{r.ms_per_slice:.0f}" if r.ms_per_slice is not None else "-"
        lines.append(f"| {r.name} | {r.mode} | " + " | ".join(f"{r.dice_per_class[c]:.3f}" for c in class_names)
                     + f" | {r.mean_dice:.3f} | {timing} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(output_folder, "generalist_quality.md"), "w") as f:
        f.write(text)
    with open(os.path.join(output_folder, "generalist_quality.json"), "w") as f:
        json.dump([{**asdict(r), "mean_dice": r.mean_dice} for r in results], f, indent=2)
    _plot(results, class_names, os.path.join(output_folder, "generalist_quality.png"), title)
    return text


def _plot(results: List[QualityResult], class_names: List[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import textwrap

    labels = ["\n".join(textwrap.wrap(r.name, 24) + [f"[{r.mode}]"]) for r in results]
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(results)), 5.0))
    width = 0.8 / len(class_names)
    x = np.arange(len(results))
    for i, c in enumerate(class_names):
        values = [r.dice_per_class[c] for r in results]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=c)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (mean over cases)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
