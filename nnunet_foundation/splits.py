"""Label-scarcity splits: nnU-Net's ``splits_final.json`` with an ``unlabeled`` list per fold.

For a fully labeled dataset, each fold keeps the labels of a few training cases (``train``), hides the labels of
the other training cases (``unlabeled``: the semi-supervised trainers read their images only) and validates on
``val``. The stock ``nnUNetTrainer`` ignores ``unlabeled``, so on the same fold it is the labeled-only baseline.

Design choices, and why:
- one fold per (labeled count, seed), so one dataset holds a whole label-scarcity study;
- per seed, the validation cases are drawn first and the labeled sets are nested (the 2 labeled cases are among
  the 4): comparisons across labeled counts then differ only in the added labels, which lowers their variance;
- an optional held-out test set is drawn once, with its own seed, and is excluded from every fold, so that no run
  trains, validates or selects on it; it is written to ``test_split.json`` beside ``splits_final.json``;
- an optional fully supervised fold per seed (all non-validation, non-test cases labeled) gives the upper bound.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

SPLITS_FILE = "splits_final.json"
TEST_SPLIT_FILE = "test_split.json"
SPLITS_INFO_FILE = "splits_info.json"


class SplitError(ValueError):
    """Bad split request; the message names the file or number and the fix."""


@dataclass(frozen=True)
class FoldInfo:
    fold: int
    num_labeled: Optional[int]  # None: fully supervised fold
    seed: int

    @property
    def kind(self) -> str:
        return "full" if self.num_labeled is None else "scarce"


def labeled_cases(preprocessed_dataset_folder_base: str) -> List[str]:
    """Case ids of the labeled training set, as nnU-Net's default split would see them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    from nnunetv2.paths import nnUNet_raw

    dataset_json_file = os.path.join(preprocessed_dataset_folder_base, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise SplitError(f"{dataset_json_file} not found: run 'nnUNetv2_plan_and_preprocess -d <dataset>' first "
                         f"(splits live in the preprocessed folder).")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    raw_folder = os.path.join(nnUNet_raw.require(), os.path.basename(preprocessed_dataset_folder_base))
    return sorted(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).keys())


def make_label_scarcity_splits(cases: Sequence[str], num_labeled: Sequence[int], seeds: Sequence[int],
                               num_val: int, test_cases: Sequence[str] = (), with_full: bool = False):
    """Return (folds, fold_infos). ``cases`` excludes nothing; ``test_cases`` are removed from every list."""
    cases = sorted(cases)
    unknown = sorted(set(test_cases) - set(cases))
    if unknown:
        raise SplitError(f"test case(s) {unknown[:5]} are not labeled training cases of this dataset.")
    pool = [c for c in cases if c not in set(test_cases)]
    counts = sorted(set(int(n) for n in num_labeled))
    if not counts and not with_full:
        raise SplitError("give at least one labeled count (--num-labeled/--fraction) or --with-full.")
    if counts and counts[0] < 1:
        raise SplitError("the number of labeled cases must be at least 1.")
    if num_val < 1:
        raise SplitError("nnU-Net needs at least one validation case (--num-val >= 1).")
    largest = counts[-1] if counts else 0
    if largest + num_val >= len(pool):
        raise SplitError(f"{largest} labeled + {num_val} validation cases leave no unlabeled case among the "
                         f"{len(pool)} available ({len(cases)} labeled cases, {len(test_cases)} held out for "
                         f"testing). Ask for fewer labeled or validation cases.")
    folds, infos = [], []
    for seed in seeds:
        order = pool[:]
        random.Random(seed).shuffle(order)
        val, rest = sorted(order[:num_val]), order[num_val:]
        for n in counts:
            folds.append({"train": sorted(rest[:n]), "val": val, "unlabeled": sorted(rest[n:])})
            infos.append(FoldInfo(len(infos), n, seed))
        if with_full:
            folds.append({"train": sorted(rest), "val": val, "unlabeled": []})
            infos.append(FoldInfo(len(infos), None, seed))
    return folds, infos


def draw_test_cases(cases: Sequence[str], num_test: int, seed: int) -> List[str]:
    if num_test <= 0:
        return []
    if num_test >= len(cases):
        raise SplitError(f"cannot hold out {num_test} test cases from {len(cases)} labeled cases.")
    order = sorted(cases)
    random.Random(f"test-{seed}").shuffle(order)
    return sorted(order[:num_test])


def write_splits(preprocessed_dataset_folder_base: str, folds: List[dict], infos: List[FoldInfo],
                 test_cases: Sequence[str], force: bool = False, request: Optional[dict] = None) -> Dict[str, str]:
    """Write splits_final.json, splits_info.json and (if any) test_split.json.

    An existing splits_final.json with the same content is kept as is (reruns are no-ops). A different one is never
    overwritten silently: without ``force`` this refuses; with it the old file is kept as a timestamped backup.
    """
    path = os.path.join(preprocessed_dataset_folder_base, SPLITS_FILE)
    written = {"splits": path}
    if os.path.isfile(path):
        with open(path) as f:
            existing = json.load(f)
        if existing != folds:
            if not force:
                raise SplitError(f"{path} exists with other folds; results trained on it would no longer match. "
                                 f"Use --force to replace it (the old file is kept as a timestamped backup), or "
                                 f"reproduce it with the same options.")
            backup = f"{path}.{time.strftime('%Y%m%d-%H%M%S')}.bak"
            shutil.copy2(path, backup)
            written["backup"] = backup
    with open(path, "w") as f:
        json.dump(folds, f, indent=2)
    info = {"folds": [{"fold": i.fold, "num_labeled": i.num_labeled, "seed": i.seed, "kind": i.kind}
                      for i in infos], "test_cases": list(test_cases), "request": request or {}}
    info_path = os.path.join(preprocessed_dataset_folder_base, SPLITS_INFO_FILE)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=2)
    written["info"] = info_path
    test_path = os.path.join(preprocessed_dataset_folder_base, TEST_SPLIT_FILE)
    if test_cases:
        with open(test_path, "w") as f:
            json.dump(sorted(test_cases), f, indent=2)
        written["test"] = test_path
    elif os.path.isfile(test_path):
        os.remove(test_path)  # derived file of an earlier call; keeping it would claim a test set that is not held out
    return written


def format_fold_table(folds: List[dict], infos: List[FoldInfo]) -> str:
    lines = ["fold  labeled  seed  train  unlabeled  val"]
    for fold, info in zip(folds, infos):
        n = "all" if info.num_labeled is None else str(info.num_labeled)
        lines.append(f"{info.fold:>4}  {n:>7}  {info.seed:>4}  {len(fold['train']):>5}  {len(fold['unlabeled']):>9}"
                     f"  {len(fold['val']):>3}")
    return "\n".join(lines)
