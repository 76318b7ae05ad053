"""Label-scarcity splits: determinism, disjointness, nesting, the held-out test set, and never losing a split."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, run_cli
from nnunet_foundation.splits import SplitError, draw_test_cases, make_label_scarcity_splits

CASES = [f"case_{i:03d}" for i in range(30)]


def test_folds_are_disjoint_nested_seeded_and_exclude_the_test_set():
    test = draw_test_cases(CASES, 6, seed=0)
    assert test == draw_test_cases(CASES, 6, seed=0) and len(test) == 6
    folds, infos = make_label_scarcity_splits(CASES, [4, 2], seeds=[0, 1], num_val=3, test_cases=test,
                                              with_full=True)
    assert [(i.num_labeled, i.seed) for i in infos] == [(2, 0), (4, 0), (None, 0), (2, 1), (4, 1), (None, 1)]
    for fold in folds:
        lists = [set(fold["train"]), set(fold["val"]), set(fold["unlabeled"]), set(test)]
        assert sum(map(len, lists)) == len(CASES)  # every case exactly once
        assert set().union(*lists) == set(CASES)
    two, four, full = folds[:3]
    assert len(two["train"]) == 2 and len(four["train"]) == 4 and full["unlabeled"] == []
    assert set(two["train"]) < set(four["train"]) and two["val"] == four["val"] == full["val"]
    assert folds[0] != folds[3]  # another seed draws other cases
    again, _ = make_label_scarcity_splits(CASES, [2, 4], seeds=[0, 1], num_val=3, test_cases=test, with_full=True)
    assert again == folds


def test_other_seeds_can_be_limited_to_some_labeled_counts():
    folds, infos = make_label_scarcity_splits(CASES, [2, 4, 8], seeds=[0, 1], num_val=3, with_full=True,
                                              other_seeds_at=[4])
    assert [(i.num_labeled, i.seed) for i in infos] == [(2, 0), (4, 0), (8, 0), (None, 0), (4, 1), (None, 1)]
    every, _ = make_label_scarcity_splits(CASES, [2, 4, 8], seeds=[0, 1], num_val=3, with_full=True)
    assert folds[4] == every[5] and folds[5] == every[7]  # the same draws, only fewer folds
    with pytest.raises(SplitError, match="not among the labeled counts"):
        make_label_scarcity_splits(CASES, [2, 4], seeds=[0, 1], num_val=3, other_seeds_at=[3])


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_labeled=[28], num_val=2), "leave no unlabeled case"),
    (dict(num_labeled=[0], num_val=2), "at least 1"),
    (dict(num_labeled=[2], num_val=0), "at least one validation case"),
    (dict(num_labeled=[2], num_val=2, test_cases=["nope"]), "not labeled training cases"),
])
def test_impossible_requests_are_refused(kwargs, message):
    with pytest.raises(SplitError, match=message):
        make_label_scarcity_splits(CASES, seeds=[0], **kwargs)


def test_make_splits_cli_writes_keeps_and_backs_up(nnunet_tree):
    root, env = nnunet_tree
    base = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    args = ["nnunet-foundation", "make-splits", "-d", SYNTHETIC_ID, "--num-labeled", "2", "3", "--seeds", "0", "1",
            "--num-val", "2", "--test-cases", "2"]
    out = run_cli(args, env).stdout
    splits = json.loads((base / "splits_final.json").read_text())
    test = json.loads((base / "test_split.json").read_text())
    info = json.loads((base / "splits_info.json").read_text())
    assert len(splits) == 4 and len(test) == 2 and "held-out test cases: 2" in out
    assert [(f["num_labeled"], f["seed"]) for f in info["folds"]] == [(2, 0), (3, 0), (2, 1), (3, 1)]
    for fold in splits:
        assert not set(test) & (set(fold["train"]) | set(fold["val"]) | set(fold["unlabeled"]))

    # the same request again is a no-op; a different one is refused and changes nothing
    run_cli(args, env)
    assert json.loads((base / "splits_final.json").read_text()) == splits
    other = run_cli(args[:5] + ["4"] + args[6:], env, check=False)
    assert other.returncode == 2 and "--force" in other.stderr and "Traceback" not in other.stderr
    assert json.loads((base / "splits_final.json").read_text()) == splits
    # with --force the old folds survive as a backup
    forced = run_cli(args[:5] + ["4"] + args[6:] + ["--force"], env)
    backups = list(base.glob("splits_final.json.*.bak"))
    assert len(backups) == 1 and json.loads(backups[0].read_text()) == splits
    assert "previous splits kept" in forced.stdout


def test_make_splits_on_an_unplanned_dataset_says_what_to_run(tmp_path):
    from conftest import nnunet_environment
    from nnunet_foundation.synthetic import write_dataset

    env = nnunet_environment(tmp_path)
    write_dataset(env["nnUNet_raw"], dataset_id=902, name="Raw", num_labeled=4, num_unlabeled=0)
    proc = run_cli(["nnunet-foundation", "make-splits", "-d", 902, "--num-labeled", 1], env, check=False)
    assert proc.returncode == 2 and "nnUNetv2_plan_and_preprocess" in proc.stderr


def test_val_fraction_sets_the_validation_size(nnunet_tree):
    root, env = nnunet_tree
    base = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    # 10 labeled cases, 2 held out: 0.4 x 8 = 3.2 -> 3 validation cases per seed
    run_cli(["nnunet-foundation", "make-splits", "-d", SYNTHETIC_ID, "--num-labeled", "2", "--seeds", "0", "1",
             "--val-fraction", "0.4", "--test-cases", "2"], env)
    splits = json.loads((base / "splits_final.json").read_text())
    assert [len(f["val"]) for f in splits] == [3, 3] and [len(f["unlabeled"]) for f in splits] == [3, 3]
    bad = run_cli(["nnunet-foundation", "make-splits", "-d", SYNTHETIC_ID, "--num-labeled", "2", "--val-fraction",
                   "1.5", "--force"], env, check=False)
    assert bad.returncode == 2 and "--val-fraction" in bad.stderr
    assert json.loads((base / "splits_final.json").read_text()) == splits
