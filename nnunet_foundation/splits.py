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
- an optional fully supervised fold per seed (all non-validation, non-test cases labeled) gives the upper bound;
- for multi-domain datasets (``domains.json`` of ``convert-2d``), the test set can be drawn per domain as whole
  groups (a colonoscopy video sequence: its frames show one polyp, so a frame in training would leak the others),
  and labeled and validation cases can be restricted to some domains; the non-test cases of the other domains are
  then unlabeled in every scarce fold and labeled in the fully supervised one.
"""
from __future__ import annotations

import json
import math
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


def raw_dataset_folder(preprocessed_dataset_folder_base: str) -> str:
    from nnunetv2.paths import nnUNet_raw

    return os.path.join(nnUNet_raw.require(), os.path.basename(os.path.normpath(preprocessed_dataset_folder_base)))


def labeled_cases(preprocessed_dataset_folder_base: str) -> List[str]:
    """Case ids of the labeled training set, as nnU-Net's default split would see them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json_file = os.path.join(preprocessed_dataset_folder_base, "dataset.json")
    if not os.path.isfile(dataset_json_file):
        raise SplitError(f"{dataset_json_file} not found: run 'nnUNetv2_plan_and_preprocess -d <dataset>' first "
                         f"(splits live in the preprocessed folder).")
    with open(dataset_json_file) as f:
        dataset_json = json.load(f)
    raw_folder = raw_dataset_folder(preprocessed_dataset_folder_base)
    return sorted(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).keys())


def make_label_scarcity_splits(cases: Sequence[str], num_labeled: Sequence[int], seeds: Sequence[int],
                               num_val: int, test_cases: Sequence[str] = (), with_full: bool = False,
                               labeled_from: Optional[Sequence[str]] = None,
                               other_seeds_at: Optional[Sequence[int]] = None):
    """Return (folds, fold_infos). ``cases`` excludes nothing; ``test_cases`` are removed from every list.

    ``labeled_from`` (default: every case) restricts the validation and labeled draws; the other non-test cases are
    unlabeled in every scarce fold and labeled in the fully supervised one. Without it the draws are unchanged.
    ``other_seeds_at`` (default: all counts) limits the seeds after the first to these labeled counts, e.g. a second
    seed at 4 labeled cases only, to afford it; every seed keeps its fully supervised fold (gap closed is per seed).
    """
    cases = sorted(cases)
    unknown = sorted(set(test_cases) - set(cases))
    if unknown:
        raise SplitError(f"test case(s) {unknown[:5]} are not labeled training cases of this dataset.")
    test_set = set(test_cases)
    eligible = set(cases if labeled_from is None else labeled_from)
    pool = [c for c in cases if c not in test_set and c in eligible]
    always_unlabeled = [c for c in cases if c not in test_set and c not in eligible]
    counts = sorted(set(int(n) for n in num_labeled))
    if not counts and not with_full:
        raise SplitError("give at least one labeled count (--num-labeled/--fraction) or --with-full.")
    if counts and counts[0] < 1:
        raise SplitError("the number of labeled cases must be at least 1.")
    if num_val < 1:
        raise SplitError("nnU-Net needs at least one validation case (--num-val >= 1).")
    unknown_counts = sorted(set(other_seeds_at or ()) - set(counts))
    if unknown_counts:
        raise SplitError(f"--other-seeds-at {unknown_counts}: not among the labeled counts {counts}")
    largest = counts[-1] if counts else 0
    if largest + num_val > len(pool) or (largest + num_val == len(pool) and not always_unlabeled):
        where = "" if labeled_from is None else f" of the domains labeled cases come from ({len(always_unlabeled)} " \
                                                 f"other non-test cases are always unlabeled)"
        raise SplitError(f"{largest} labeled + {num_val} validation cases leave no unlabeled case among the "
                         f"{len(pool)} available{where} ({len(cases)} labeled cases, {len(test_cases)} held out for "
                         f"testing). Ask for fewer labeled or validation cases.")
    folds, infos = [], []
    for k, seed in enumerate(seeds):
        order = pool[:]
        random.Random(seed).shuffle(order)
        val, rest = sorted(order[:num_val]), order[num_val:]
        for n in counts:
            if k > 0 and other_seeds_at is not None and n not in other_seeds_at:
                continue
            folds.append({"train": sorted(rest[:n]), "val": val, "unlabeled": sorted(rest[n:] + always_unlabeled)})
            infos.append(FoldInfo(len(infos), n, seed))
        if with_full:
            folds.append({"train": sorted(rest + always_unlabeled), "val": val, "unlabeled": []})
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


@dataclass(frozen=True)
class CaseDomains:
    """Domain and group of each case, from the raw dataset's ``domains.json`` (written by ``convert-2d``)."""
    domain: Dict[str, str]
    group: Dict[str, Optional[str]]
    file: str

    @classmethod
    def load(cls, raw_dataset_folder: str) -> "CaseDomains":
        from nnunet_foundation.convert2d import DOMAINS_FILE

        path = os.path.join(raw_dataset_folder, DOMAINS_FILE)
        try:
            with open(path) as f:
                data = json.load(f)
            domain, group = dict(data["domain"]), dict(data.get("group", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SplitError(f"{path}: cannot read the cases' domains ({e}); per-domain options need the domains.json "
                             f"that 'nnunet-foundation convert-2d' writes beside dataset.json") from None
        return cls(domain, {c: group.get(c) for c in domain}, path)

    @classmethod
    def load_if_present(cls, raw_dataset_folder: str) -> Optional["CaseDomains"]:
        from nnunet_foundation.convert2d import DOMAINS_FILE

        return cls.load(raw_dataset_folder) if os.path.isfile(os.path.join(raw_dataset_folder, DOMAINS_FILE)) \
            else None

    @property
    def names(self) -> List[str]:
        return sorted(set(self.domain.values()))

    def check_covers(self, cases: Sequence[str]) -> None:
        missing = [c for c in cases if c not in self.domain]
        if missing:
            raise SplitError(f"{len(missing)} case(s) of the dataset have no domain in {self.file}, e.g. "
                             f"{missing[:5]}: it belongs to another conversion; convert the dataset again.")

    def check_names(self, names: Sequence[str], option: str) -> None:
        unknown = sorted(set(names) - set(self.names))
        if unknown:
            raise SplitError(f"{option}: unknown domain(s) {unknown}; the domains of {self.file} are "
                             f"{', '.join(self.names)}")

    def cases_of(self, domains: Sequence[str], cases: Sequence[str]) -> List[str]:
        wanted = set(domains)
        return sorted(c for c in cases if self.domain[c] in wanted)

    def group_of(self, case: str) -> str:
        """The case's group; a case without one is a group of its own."""
        group = self.group.get(case)
        return case if group is None else f"{self.domain[case]}/{group}"


def parse_domain_fractions(items: Sequence[str]) -> Dict[str, float]:
    """``['kvasir=0.2', 'cvc=0.33']`` -> {'kvasir': 0.2, 'cvc': 0.33}."""
    fractions: Dict[str, float] = {}
    for item in items:
        domain, sep, value = item.partition("=")
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not sep or not domain or not 0 < fraction <= 1:
            raise SplitError(f"--test-fraction {item!r}: expected DOMAIN=FRACTION with 0 < FRACTION <= 1")
        if domain in fractions:
            raise SplitError(f"--test-fraction: domain {domain!r} given twice")
        fractions[domain] = fraction
    return fractions


def draw_test_cases_by_group(cases: Sequence[str], domains: CaseDomains, fractions: Dict[str, float],
                             seed: int) -> List[str]:
    """Per domain, hold out round(fraction x its groups) whole groups (at least one), drawn with ``seed``; a domain
    without groups counts each case as a group. Domains not named keep all their cases for training."""
    domains.check_covers(cases)
    domains.check_names(list(fractions), "--test-fraction")
    test: List[str] = []
    for name, fraction in sorted(fractions.items()):
        groups: Dict[str, List[str]] = {}
        for case in domains.cases_of([name], cases):
            groups.setdefault(domains.group_of(case), []).append(case)
        order = sorted(groups)
        random.Random(f"test-{seed}-{name}").shuffle(order)
        for group in order[:max(1, round(fraction * len(order)))]:
            test += groups[group]
    return sorted(test)


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
