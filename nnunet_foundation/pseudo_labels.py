"""Offline pseudo-labels: a trained nnU-Net model prompts a generalist once per unlabeled case, not once per iteration.

``nnunet-foundation pseudo-label`` runs this for one fold's unlabeled stream (the split's ``unlabeled`` list and the
cases preprocessed from ``imagesUnlabeled``). Per case, in the preprocessed space of the configuration:

1. the specialist's softmax (nnU-Net's own predictor on the preprocessed image; labels are never opened),
2. prompts derived from that softmax, the generalist's per-class probabilities and the slices it segmented,
3. ``<case>.npz`` written atomically: ``probabilities`` (float16, ``(K, D, H, W)``), ``covered`` (bool, ``(D, H, W)``:
   slices the generalist was prompted on; elsewhere its "background" means "not asked") and ``label`` (uint8: the
   argmax, :data:`IGNORE` where not covered or less confident than ``min_confidence``).

The cache folder is ``$nnUNet_preprocessed/<dataset>/<data_identifier>_pseudo_labels/<name>/`` beside the
preprocessed data, with ``manifest.json`` recording what made it (plans fingerprint, specialist run and checkpoint
hash, generalist configurations and checkpoint hashes). A second run with the same inputs skips finished cases (a
case is finished when its ``.npz`` exists: written under a temporary name and renamed); a run with other inputs is
refused. ``part_id``/``num_parts`` split the cases across machines like nnU-Net's own ``-part_id/-num_parts``.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from nnunet_foundation.atomic_files import write_atomically, write_json_atomically

MANIFEST = "manifest.json"
#: label value of voxels the pseudo-label says nothing about
IGNORE = 255


class PseudoLabelError(RuntimeError):
    """A pseudo-label cache that cannot be used or extended; the message names the file and the fix."""


def cache_folder(preprocessed_dataset_folder_base: str, data_identifier: str, name: str) -> str:
    return os.path.join(preprocessed_dataset_folder_base, f"{data_identifier}_pseudo_labels", name)


def check_or_write_manifest(folder: str, manifest: dict) -> None:
    """Create the cache's manifest, or refuse to extend a cache made from other inputs."""
    path = os.path.join(folder, MANIFEST)
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        changed = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
        if changed:
            raise PseudoLabelError(
                f"{path} was made from other inputs ({', '.join(changed)} differ). Its pseudo-labels would mix two "
                f"sources: write to another cache with --name, or delete {folder} to rebuild it.")
        return
    os.makedirs(folder, exist_ok=True)
    write_json_atomically(manifest, path, sort_keys=True)


def cases_of_part(cases: Sequence[str], part_id: int, num_parts: int) -> List[str]:
    """Every ``num_parts``-th case starting at ``part_id`` of the sorted list (nnU-Net's -part_id/-num_parts)."""
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise PseudoLabelError(f"-part_id must be in [0, num_parts) and -num_parts >= 1, got {part_id}/{num_parts}")
    return sorted(cases)[part_id::num_parts]


def pseudo_label_case(data: np.ndarray, specialist: Callable, generalist, min_confidence: float) -> Dict[str, np.ndarray]:
    """One preprocessed case ``(C, D, H, W)`` -> the arrays stored for it (see the module docstring)."""
    probs = specialist(data)[None].float()
    out = generalist(torch.from_numpy(np.ascontiguousarray(data))[None], probs)
    probabilities = out.probabilities[0].float().cpu()
    covered = out.covered[0, 0].cpu() if out.covered is not None else torch.ones(probabilities.shape[1:], dtype=bool)
    confidence, label = probabilities.max(0)
    label = label.to(torch.uint8)
    label[~covered | (confidence < min_confidence)] = IGNORE
    return {"probabilities": probabilities.numpy().astype(np.float16), "covered": covered.numpy(),
            "label": label.numpy()}


def save_case(folder: str, case: str, arrays: Dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a temporary name
            np.savez_compressed(f, **arrays)

    write_atomically(os.path.join(folder, f"{case}.npz"), write)  # a case is finished exactly when its file exists


def load_case(folder: str, case: str) -> Dict[str, np.ndarray]:
    path = os.path.join(folder, f"{case}.npz")
    if not os.path.isfile(path):
        raise PseudoLabelError(f"no pseudo-label for case '{case}' in {folder}: run nnunet-foundation pseudo-label "
                               f"for this fold first (see {os.path.join(folder, MANIFEST)})")
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def run_cases(folder: str, cases: Sequence[str], load_image: Callable[[str], np.ndarray], specialist: Callable,
              generalist, min_confidence: float, progress: Callable[[str], None] = print) -> Dict[str, int]:
    """Pseudo-label ``cases`` not yet in ``folder``; returns counts of done / skipped cases."""
    todo = [c for c in cases if not os.path.isfile(os.path.join(folder, f"{c}.npz"))]
    progress(f"{len(cases)} case(s) in this part: {len(cases) - len(todo)} already done, {len(todo)} to do")
    started = time.perf_counter()
    for index, case in enumerate(todo, 1):
        arrays = pseudo_label_case(load_image(case), specialist, generalist, min_confidence)
        save_case(folder, case, arrays)
        elapsed = time.perf_counter() - started
        remaining = elapsed / index * (len(todo) - index)
        labelled = float((arrays["label"] != IGNORE).mean())
        progress(f"  [{index}/{len(todo)}] {case}: {labelled:.0%} of voxels labelled; "
                 f"{elapsed:.0f} s elapsed, about {remaining:.0f} s left")
    return {"done": len(todo), "skipped": len(cases) - len(todo)}


def fold_unlabeled_cases(preprocessed_dataset_folder_base: str, plans: dict, configuration: str, fold: int
                         ) -> Dict[str, str]:
    """Case -> folder of one fold's unlabeled stream, as the trainers collect it."""
    from nnunet_foundation.unlabeled import collect_unlabeled_cases

    data_identifier = plans["configurations"][configuration]["data_identifier"]
    splits_file = os.path.join(preprocessed_dataset_folder_base, "splits_final.json")
    split: Optional[dict] = None
    if os.path.isfile(splits_file):
        with open(splits_file) as f:
            splits = json.load(f)
        if fold >= len(splits):
            raise PseudoLabelError(f"{splits_file} has {len(splits)} fold(s); fold {fold} does not exist")
        split = splits[fold]
    labeled = (split or {}).get("train", []) + (split or {}).get("val", [])
    return collect_unlabeled_cases(preprocessed_dataset_folder_base,
                                   os.path.join(preprocessed_dataset_folder_base, data_identifier), data_identifier,
                                   plans, configuration, (split or {}).get("unlabeled"), labeled)


def open_cache(setting: str, preprocessed_dataset_folder_base: str, plans: dict, configuration: str,
               cases: Sequence[str]) -> Callable[[str], np.ndarray]:
    """The reader a trainer uses: ``case -> label (D, H, W) uint8`` from the cache named by ``setting`` (a cache
    name under the configuration's ``_pseudo_labels`` folder, or a folder path). Refused, naming the fix, when the
    cache was made with other plans or lacks some of ``cases``."""
    from nnunet_foundation.unlabeled import plans_fingerprint

    data_identifier = plans["configurations"][configuration]["data_identifier"]
    folder = setting if os.path.isdir(setting) else cache_folder(preprocessed_dataset_folder_base, data_identifier,
                                                                 setting)
    manifest_file = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_file):
        raise PseudoLabelError(f"no pseudo-label cache at {folder} (no {MANIFEST}): make it with nnunet-foundation "
                               f"pseudo-label -d <dataset> -c {configuration} -tr <trainer> -f <fold>, then set "
                               f"pseudo_labels to its name ({os.path.basename(folder)}) or folder")
    with open(manifest_file) as f:
        manifest = json.load(f)
    if manifest.get("configuration") != configuration or \
            manifest.get("plans_fingerprint") != plans_fingerprint(plans, configuration):
        raise PseudoLabelError(f"{manifest_file} was made for configuration {manifest.get('configuration')} with "
                               f"other plans than this training's ({configuration}): its maps do not align with "
                               f"these preprocessed images. Make a cache for this configuration.")
    missing = [c for c in cases if not os.path.isfile(os.path.join(folder, f"{c}.npz"))]
    if missing:
        raise PseudoLabelError(f"{folder} has no pseudo-label for {len(missing)} of the {len(cases)} unlabeled "
                               f"case(s) of this fold (e.g. {missing[:3]}): run nnunet-foundation pseudo-label for "
                               f"this fold again (finished cases are skipped)")

    def read(case: str) -> np.ndarray:
        with np.load(os.path.join(folder, f"{case}.npz")) as npz:  # members load lazily: only 'label' is read
            return npz["label"]

    read.folder = folder
    return read
