"""Bad input gets a clear, early error that names the file and the fix, and changes nothing; trainers are found by
nnU-Net through nnUNet_extTrainer (also without the optional foundation-model packages)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SYNTHETIC_ID, SYNTHETIC_NAME, nnunet_environment, run_cli, tree_digest, write_split

PUBLIC_TRAINERS = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS", "nnUNetTrainerMeanTeacher_smoke",
                   "nnUNetTrainerCPS_smoke", "nnUNetTrainerMeanTeacher_cpu500", "nnUNetTrainerCPS_gpu10k",
                   "nnUNetTrainer_smoke", "nnUNetTrainer_cpu500", "nnUNetTrainer_gpu10k",
                   "nnUNetTrainerUAMT", "nnUNetTrainerUAMT_smoke", "nnUNetTrainerSemiSAM",
                   "nnUNetTrainerSemiSAM_smoke", "nnUNetTrainerSemiSAMUAMT", "nnUNetTrainerSemiSAM_gpu1k",
                   "nnUNetTrainerSynFoC", "nnUNetTrainerSynFoC_smoke"]


def preprocess_unlabeled(env):
    return run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", "3d_fullres"], env,
                   check=False)


@pytest.fixture
def tree(nnunet_tree):
    root, env = nnunet_tree
    raw = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME
    pre = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME
    return env, raw, pre


def assert_fails_and_changes_nothing(env, raw, pre, *expected_fragments):
    before = tree_digest(pre), tree_digest(raw)
    proc = preprocess_unlabeled(env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for fragment in expected_fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert (tree_digest(pre), tree_digest(raw)) == before
    return proc.stderr


def test_wrong_channel_count_is_named(tree):
    env, raw, pre = tree
    shutil.copy(raw / "imagesUnlabeled" / "synthetic_u000_0000.nii.gz",
                raw / "imagesUnlabeled" / "synthetic_u000_0001.nii.gz")
    assert_fails_and_changes_nothing(env, raw, pre, "synthetic_u000", "channel files [0, 1]", "1 channel(s)")


def test_files_not_following_nnunet_naming_are_named(tree):
    env, raw, pre = tree
    shutil.copy(raw / "imagesUnlabeled" / "synthetic_u000_0000.nii.gz", raw / "imagesUnlabeled" / "scan.nii.gz")
    assert_fails_and_changes_nothing(env, raw, pre, "scan.nii.gz", "CASE_XXXX.nii.gz")


def test_case_names_clashing_with_imagesTr_are_named(tree):
    env, raw, pre = tree
    shutil.copy(raw / "imagesTr" / "synthetic_002_0000.nii.gz", raw / "imagesUnlabeled" / "synthetic_002_0000.nii.gz")
    assert_fails_and_changes_nothing(env, raw, pre, "synthetic_002", "also exist in imagesTr")


def test_empty_or_missing_unlabeled_folder(tree):
    env, raw, pre = tree
    for f in (raw / "imagesUnlabeled").iterdir():
        f.unlink()
    assert_fails_and_changes_nothing(env, raw, pre, "imagesUnlabeled is empty")
    (raw / "imagesUnlabeled").rmdir()
    assert_fails_and_changes_nothing(env, raw, pre, "imagesUnlabeled does not exist", "make-splits")


def test_unreadable_scan_is_named_and_labeled_data_untouched(tree):
    env, raw, pre = tree
    (raw / "imagesUnlabeled" / "synthetic_u002_0000.nii.gz").write_bytes(b"not a nifti file")
    labeled_before = {k: v for k, v in tree_digest(pre).items() if not k.split("/")[0].endswith("_unlabeled")}
    proc = preprocess_unlabeled(env)
    assert proc.returncode == 2 and "synthetic_u002" in proc.stderr and "Traceback" not in proc.stderr
    labeled_after = {k: v for k, v in tree_digest(pre).items() if not k.split("/")[0].endswith("_unlabeled")}
    assert labeled_after == labeled_before


def test_missing_plans_tells_the_user_what_to_run(tmp_path):
    from nnunet_foundation.synthetic import write_dataset

    env = nnunet_environment(tmp_path)
    write_dataset(env["nnUNet_raw"], dataset_id=901, name="Unplanned", num_labeled=2, num_unlabeled=1, num_test=0)
    proc = run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", 901], env, check=False)
    assert proc.returncode == 2
    assert "nnUNetv2_plan_and_preprocess -d 901" in proc.stderr and "nnUNetPlans.json" in proc.stderr
    assert not any(Path(env["nnUNet_preprocessed"]).iterdir())


def test_ssl_trainer_without_unlabeled_data_fails_before_training(tree):
    env, raw, pre = tree  # imagesUnlabeled exists but was never preprocessed, and the split has no unlabeled list
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainerMeanTeacher_smoke", "-device",
                    "cpu"], env, check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "preprocess-unlabeled" in message and "make-splits" in message
    results = Path(env["nnUNet_results"])
    assert not list(results.rglob("checkpoint_*.pth"))


def test_split_listing_a_case_as_labeled_and_unlabeled_is_refused(tree):
    env, raw, pre = tree
    cases = [f"synthetic_{i:03d}" for i in range(10)]
    write_split(env, [{"train": cases[:3], "val": cases[8:], "unlabeled": cases[2:8]}])
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainerCPS_smoke", "-device", "cpu"],
                   env, check=False)
    assert proc.returncode != 0
    message = proc.stdout + proc.stderr
    assert "synthetic_002" in message and "splits_final.json" in message
    assert not list(Path(env["nnUNet_results"]).rglob("checkpoint_*.pth"))


# ------------------------------------------------------------------------------------------------ discovery
DISCOVER = """
import json, sys
blocked = sys.argv[1:]
for name in blocked:
    sys.modules[name] = None  # 'import name' now raises ImportError, as if the package were not installed
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
found = {}
for name in %r:
    cls = recursive_find_trainer_class_by_name(name)
    found[name] = cls.__module__
import pickle, importlib
# the class nnU-Net found is the package's own object, so it pickles (DDP workers, inference) and imports once
cls = recursive_find_trainer_class_by_name("nnUNetTrainerMeanTeacher")
assert pickle.loads(pickle.dumps(cls)) is cls
print("RESULT" + json.dumps(found))
""" % (PUBLIC_TRAINERS,)


def discover(env: dict, *blocked: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", DISCOVER, *blocked], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
    return json.loads(line[len("RESULT"):])


def test_trainers_are_discovered_through_nnUNet_extTrainer(tmp_path):
    env = nnunet_environment(tmp_path)
    found = discover(env)
    assert set(found) == set(PUBLIC_TRAINERS)
    assert all(module.startswith("nnunet_foundation.") for module in found.values()), found


def test_discovery_works_without_optional_foundation_model_packages(tmp_path):
    env = nnunet_environment(tmp_path)
    found = discover(env, "segment_anything", "sam2", "peft")
    assert set(found) == set(PUBLIC_TRAINERS)


def test_trainers_are_not_found_without_nnUNet_extTrainer(tmp_path):
    env = nnunet_environment(tmp_path)
    env.pop("nnUNet_extTrainer")
    proc = subprocess.run([sys.executable, "-c", DISCOVER], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nnUNet_extTrainer" in proc.stderr


def test_trainer_path_command_prints_the_trainers_folder():
    proc = run_cli(["nnunet-foundation", "trainer-path"], dict(os.environ))
    assert Path(proc.stdout.strip()) == REPO / "trainers"
    proc = run_cli(["nnunet-foundation", "trainer-path", "--export"], dict(os.environ))
    assert proc.stdout.strip() == f"export nnUNet_extTrainer={REPO / 'trainers'}"


def test_every_subcommand_has_help():
    from nnunet_foundation.cli import build_parser

    top = run_cli(["nnunet-foundation", "--help"], dict(os.environ)).stdout  # the console script itself
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert {"trainer-path", "preprocess-unlabeled", "make-splits", "demo"} <= set(subcommands)
    for name in subcommands:
        assert name in top
        # in-process: the same parser the console script builds, without a Python start-up per subcommand
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([name, "--help"])
        assert exit_info.value.code == 0 and "usage: nnunet-foundation " + name in out.getvalue()


def test_every_trainer_keeps_nnunets_init_signature():
    """nnU-Net's __init__ stores its arguments with locals()[name] for each parameter of type(self).__init__, so a
    trainer whose __init__ takes *args/**kwargs fails inside nnUNetv2_train with KeyError: 'args'."""
    import importlib.util
    import inspect

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    expected = list(inspect.signature(nnUNetTrainer.__init__).parameters)
    checked = []
    for path in sorted((REPO / "trainers").glob("*.py")):
        if path.name.startswith("_"):
            continue
        spec = importlib.util.spec_from_file_location(f"_trainers_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name, cls in vars(module).items():
            if isinstance(cls, type) and issubclass(cls, nnUNetTrainer) and cls is not nnUNetTrainer:
                assert list(inspect.signature(cls.__init__).parameters) == expected, name
                checked.append(name)
    assert {"nnUNetTrainerSemiSAM", "nnUNetTrainerSynFoC", "nnUNetTrainerCPS"} <= set(checked)
