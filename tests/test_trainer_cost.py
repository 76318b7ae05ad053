"""The trainer cost script runs end to end and reports one row per trainer (no timing assertions)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, SYNTHETIC_ID, preprocess_unlabeled_cli

pytestmark = pytest.mark.e2e


def test_trainer_cost_reports_every_trainer_relative_to_nnunet(nnunet_tree, tmp_path):
    root, env = nnunet_tree
    preprocess_unlabeled_cli(env, ("2d",))
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "trainer_cost.py"), "-d", str(SYNTHETIC_ID),
                           "-c", "2d", "--trainers", "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS",
                           "--iterations", "1", "--warmup", "1", "--prefetch", "1", "--batch-size", "2",
                           "--device", "cpu", "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["trainer"] for r in rows] == ["nnUNetTrainer", "nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS"]
    assert all(r["seconds_per_iteration"] > 0 and r["memory_mb"] > 0 for r in rows)
    assert rows[0]["unlabeled_batch_size"] == 0 and rows[1]["unlabeled_batch_size"] == rows[1]["batch_size"] == 2
    assert "| nnUNetTrainerCPS |" in proc.stdout and "x nnUNetTrainer" in proc.stdout
    # the results folder of the user was not used
    assert not any((root / "nnUNet_results").rglob("*.pth"))
