"""nnU-Net's own workflow after training, with a trainer of this package: `nnUNetv2_find_best_configuration` (its
postprocessing choice and inference instructions), `nnUNetv2_export_model_to_zip` and
`nnUNetv2_install_pretrained_model_from_zip` into another results folder, and `nnUNetv2_predict` from the installed
model - what a user does to pick, share and deploy a model; each step is the stock command."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli

TRAINER = "nnUNetTrainerMeanTeacher_smoke"


def _predict(env: dict, images: Path, out: Path) -> dict:
    run_cli(["nnUNetv2_predict", "-i", images, "-o", out, "-d", SYNTHETIC_ID, "-c", "2d", "-tr", TRAINER, "-f", 0,
             "-device", "cpu", "--disable_progress_bar", "-npp", 0, "-nps", 0], env)
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))}


@pytest.mark.e2e
def test_best_configuration_export_install_and_predict_with_a_semi_supervised_trainer(synthetic_dataset, tmp_path):
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, ("2d",))
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", TRAINER, "-device", "cpu", "--npz"], env)
    results = Path(env["nnUNet_results"]) / SYNTHETIC_NAME
    assert list((results / f"{TRAINER}__nnUNetPlans__2d" / "fold_0" / "validation").glob("*.npz"))

    run_cli(["nnUNetv2_find_best_configuration", SYNTHETIC_ID, "-c", "2d", "-tr", TRAINER, "-f", 0, "-np", 1], env)
    instructions = (results / "inference_instructions.txt").read_text()
    assert f"-tr {TRAINER}" in instructions and "-c 2d" in instructions
    assert (results / f"{TRAINER}__nnUNetPlans__2d" / "crossval_results_folds_0" / "postprocessing.pkl").is_file()

    images = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesTs"
    here = _predict(env, images, tmp_path / "pred_here")
    archive = tmp_path / "model.zip"
    run_cli(["nnUNetv2_export_model_to_zip", "-d", SYNTHETIC_ID, "-o", archive, "-c", "2d", "-tr", TRAINER, "-f", 0],
            env)
    # another user's machine: an empty results folder, the package's trainers on nnUNet_extTrainer as usual
    elsewhere = {**env, "nnUNet_results": str(tmp_path / "other_results")}
    Path(elsewhere["nnUNet_results"]).mkdir()
    run_cli(["nnUNetv2_install_pretrained_model_from_zip", archive], elsewhere)
    installed = _predict(elsewhere, images, tmp_path / "pred_elsewhere")
    assert set(installed) == set(here) == {"synthetic_t000.nii.gz", "synthetic_t001.nii.gz"}
    for name, seg in here.items():
        assert np.array_equal(seg, installed[name]), name
