"""Shared fixtures: a private nnU-Net folder tree and a small synthetic dataset planned and preprocessed with the
real ``nnUNetv2_plan_and_preprocess`` command (once per test session)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# pytest-xdist's two workers each run torch processes of two threads (nnUNetv2_train/_predict take every core) on a
# 2-core machine, and libgomp's threads spin while they wait, stealing the core the other process needs: a small 3d
# convolution net took 14 s in such a pair against 2.4 s alone. Spinning briefly before sleeping made it 4.8 s in the
# pair and kept it 2.4 s alone (OMP_WAIT_POLICY=PASSIVE: 4.3 s and 3.6 s). Set before any test imports torch.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SYNTHETIC_ID = 900
SYNTHETIC_NAME = f"Dataset{SYNTHETIC_ID:03d}_Synthetic"


def nnunet_environment(root: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_extTrainer": str(REPO / "trainers"),
        # single-process data loading keeps the CPU tests deterministic in cost and friendly to 2-core machines
        "nnUNet_n_proc_DA": "0",
        "nnUNet_compile": "0",
        # nnU-Net spawns this many export/evaluation workers; each pays a full import on a 2-core machine
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "2",
        "PYTHONUNBUFFERED": "1",
    })
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[k]).mkdir(parents=True, exist_ok=True)
    return env


def run_cli(args: list, env: dict, timeout: int = 900, check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the installed console scripts (nnUNetv2_*, nnunet-foundation) and return the completed process."""
    exe = BIN / args[0]
    cmd = [str(exe) if exe.exists() else args[0], *[str(a) for a in args[1:]]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def plan_and_preprocess(env: dict, dataset_id: int, configurations=("3d_fullres", "2d")) -> None:
    # nnUNet_n_proc_DA=0 breaks planning (set_num_threads needs a positive integer), so drop it here.
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", *configurations, "-np", 1,
             "--verify_dataset_integrity"], plan_env)
    narrow_planned_networks(Path(env["nnUNet_preprocessed"]), dataset_id)


#: Test networks get a quarter of the planned feature maps per stage (at least 4).
TEST_WIDTH_DIVISOR = 4
#: plans identifier of nnU-Net's un-narrowed plans of a test dataset
FULL_WIDTH_PLANS = "nnUNetPlansFullWidth"


def narrow_planned_networks(preprocessed: Path, dataset_id: int) -> None:
    """Shrink the feature maps of every planned network of a test dataset (nnUNetPlans.json, edited in place the
    way nnU-Net's documentation edits plans), keeping its stages, kernels and strides.

    Why: on a CPU the convolutions of nnU-Net's planned widths (32 ... 256+ features) are most of a test's time - a
    3d_fullres smoke iteration of the synthetic data took about 4 s - while what the tests check (the trainers'
    losses, gradients, checkpoints, resume, export and the real nnUNetv2_* commands) does not depend on the width.
    Every trainer, nnUNetv2_train and nnUNetv2_predict read the network from the plans, so all of them get it.
    nnU-Net's own plans stay beside them as FULL_WIDTH_PLANS (same preprocessed data), for the tests whose recorded
    numbers were taken with the planned widths."""
    import json

    (plans_file,) = Path(preprocessed).glob(f"Dataset{int(dataset_id):03d}_*/nnUNetPlans.json")
    plans = json.loads(plans_file.read_text())
    plans_file.with_name(f"{FULL_WIDTH_PLANS}.json").write_text(json.dumps({**plans, "plans_name": FULL_WIDTH_PLANS},
                                                                           indent=4))
    for configuration in plans["configurations"].values():
        kwargs = configuration.get("architecture", {}).get("arch_kwargs", {})
        if isinstance(kwargs.get("features_per_stage"), list):
            kwargs["features_per_stage"] = [max(4, f // TEST_WIDTH_DIVISOR) for f in kwargs["features_per_stage"]]
    plans_file.write_text(json.dumps(plans, indent=4))


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory, worker_id):
    """A planned and preprocessed synthetic dataset (3d_fullres and 2d) with unlabeled scans in imagesUnlabeled.

    Tests must not modify it: copy it with ``copy_nnunet_tree`` first when they need to change files. Made once per
    test session and shared by the pytest-xdist workers (the first one plans it, the others wait for it): planning
    costs a minute of a 2-core machine.
    """
    from filelock import FileLock

    from nnunet_foundation.synthetic import write_dataset

    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root, finished = shared / "nnunet_synthetic", shared / "nnunet_synthetic.done"
    with FileLock(str(shared / "nnunet_synthetic.lock")):
        if not finished.is_file():
            shutil.rmtree(root, ignore_errors=True)  # a half-made one from a crashed worker
            env = nnunet_environment(root)
            write_dataset(env["nnUNet_raw"], dataset_id=SYNTHETIC_ID, name="Synthetic", num_labeled=10,
                          num_unlabeled=4, num_test=2, seed=0)
            plan_and_preprocess(env, SYNTHETIC_ID)
            finished.touch()
    return root


def copy_nnunet_tree(source_root: Path, target_root: Path) -> dict:
    """Copy a whole nnU-Net folder tree so a test can change it freely; returns the environment for the copy."""
    shutil.copytree(source_root, target_root, dirs_exist_ok=True)
    return nnunet_environment(target_root)


@pytest.fixture
def nnunet_tree(synthetic_dataset, tmp_path):
    """A private, writable copy of the synthetic dataset tree and its environment."""
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    return tmp_path / "tree", env


@pytest.fixture
def trainer_factory(nnunet_tree, monkeypatch):
    """Build trainers in-process (CPU) on the private dataset copy: factory(name, configuration='3d_fullres', fold=0,
    continue_training=False, plans='nnUNetPlans'); plans=FULL_WIDTH_PLANS gives nnU-Net's planned widths."""
    root, env = nnunet_tree
    for k, v in env.items():
        if k.startswith("nnUNet_") or k == "OMP_NUM_THREADS":
            monkeypatch.setenv(k, v)

    def make(name: str, configuration: str = "3d_fullres", fold=0, continue_training: bool = False,
             plans: str = "nnUNetPlans"):
        import torch
        from nnunetv2.run.run_training import get_trainer_from_args

        return get_trainer_from_args(str(SYNTHETIC_ID), configuration, fold, name, plans_identifier=plans,
                                     continue_training=continue_training, device=torch.device("cpu"))

    make.root, make.env = root, env
    return make


def preprocess_unlabeled_cli(env: dict, configurations=("3d_fullres",)) -> None:
    run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", SYNTHETIC_ID, "-c", *configurations], env)


def write_split(env: dict, folds: list) -> Path:
    """Write splits_final.json for the synthetic dataset; folds = [{'train': [...], 'val': [...], 'unlabeled': [...]}]"""
    import json

    path = Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME / "splits_final.json"
    path.write_text(json.dumps(folds, indent=2))
    return path


def tree_digest(folder: Path) -> dict:
    """Relative path -> content hash of every file below folder (to prove that a command changed nothing)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def train_until_first_checkpoint(command: list, env: dict, checkpoint: Path, timeout: float = 600,
                                 with_output: bool = False):
    """Run a training command (nnUNetv2_train, or a command that runs it) and kill it (the whole process group, like
    a lost cluster job) as soon as ``checkpoint`` is completely written; returns the loaded checkpoint (and, with
    ``with_output``, what the command had printed)."""
    import os
    import signal
    import subprocess
    import time

    import torch

    proc = subprocess.Popen([str(BIN / command[0]), *map(str, command[1:])], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"training ended (rc {proc.returncode}) before it could be interrupted:\n"
                                     f"{proc.stdout.read()[-4000:]}")
            if checkpoint.exists():
                try:
                    state = torch.load(checkpoint, map_location="cpu", weights_only=False)  # fails while still written
                except Exception:
                    pass
                else:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return (state, proc.stdout.read()) if with_output else state
            time.sleep(0.05)
        raise AssertionError(f"{checkpoint} did not appear within {timeout} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def interrupt_then_resume(train: list, env: dict, out: Path) -> tuple[dict, dict]:
    """Kill a real two-epoch training (4 iterations an epoch) as soon as its first checkpoint_best.pth is written,
    like a lost cluster job, resume it with nnU-Net's ``--c`` and check what every trainer owes a resume: the
    interrupted state was picked up, the epoch and SSL iteration counters continued instead of restarting, and every
    logged series kept its epoch 0 and gained epoch 1. Returns (interrupted, final) checkpoints for the
    method-specific checks."""
    import torch

    interrupted = train_until_first_checkpoint(train, env, out / "checkpoint_best.pth")
    assert interrupted["current_epoch"] == 1 and interrupted["ssl_state"]["iteration"] == 4
    assert not (out / "checkpoint_final.pth").exists()
    resumed = run_cli(list(train) + ["--c"], env)
    assert "checkpoint_best.pth" in resumed.stdout + resumed.stderr  # nnU-Net's --c picked the interrupted state
    final = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and final["ssl_state"]["iteration"] == 8
    for key, values in interrupted["logging"].items():
        assert final["logging"][key][:1] == values[:1] and len(final["logging"][key]) == 2, key
    return interrupted, final
