"""``nnunet-foundation generalist-quality`` end to end: a real nnU-Net model trained with nnUNetv2_train prompts the
generalist; oracle prompts come from the labels. A tiny SAM keeps it fast; the real-weight conventions are checked
in test_litemedsam.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import SYNTHETIC_ID, copy_nnunet_tree, run_cli

pytestmark = pytest.mark.e2e


def test_oracle_and_specialist_prompts_through_the_cli(synthetic_dataset, tmp_path):
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    checkpoint = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth", seed=1)
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", "nnUNetTrainer_smoke", "-device", "cpu"], env)
    generalists = json.dumps([{"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint)},
                              {"backend": "sam", "model_type": "tiny", "checkpoint": str(checkpoint),
                               "stitch": True}])
    out = tmp_path / "quality"
    proc = run_cli(["nnunet-foundation", "generalist-quality", "-d", SYNTHETIC_ID, "-c", "2d", "--generalists",
                    generalists, "-tr", "nnUNetTrainer_smoke", "-f", "0", "--num-cases", 2,
                    "--exclude-fold-training", 0, "-o", out], env)
    rows = json.loads((out / "generalist_quality.json").read_text())
    # two generalists x (oracle, specialist) and the specialist alone once per generalist
    assert [r["mode"] for r in rows] == ["oracle", "specialist", "specialist alone"] * 2
    assert rows[1]["name"].startswith("sam tiny") and rows[4]["name"].endswith("stitched)")
    splits = json.loads((Path(env["nnUNet_preprocessed"]) / "Dataset900_Synthetic" / "splits_final.json").read_text())
    evaluated = set(rows[0]["dice_per_case"])
    assert len(evaluated) == 2 and not evaluated & set(splits[0]["train"])  # cases the model never trained on
    for r in rows:
        assert set(r["dice_per_class"]) == {"head", "body"}  # named as dataset.json names the labels
        assert all(0.0 <= v <= 1.0 for v in r["dice_per_class"].values() if not np.isnan(v))
    assert rows[0]["slices_encoded"] > 0 and rows[0]["ms_per_slice"] > 0
    # the stitched generalist encodes mosaics: fewer encoder images for the same slices
    assert rows[3]["slices_encoded"] < rows[0]["slices_encoded"]
    assert (out / "generalist_quality.png").stat().st_size > 0 and "| oracle |" in proc.stdout

    missing = run_cli(["nnunet-foundation", "generalist-quality", "-d", SYNTHETIC_ID, "-c", "2d", "--modes",
                       "specialist", "-o", tmp_path / "x"], env, check=False)
    assert missing.returncode == 2 and "needs the trained model" in missing.stderr
