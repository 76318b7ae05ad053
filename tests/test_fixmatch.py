"""FixMatch, the worked example of docs/adding_a_method.md: its unsupervised term trains the student, and it trains
and predicts through the real nnU-Net commands like the other methods."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli

FIXMATCH = "nnUNetTrainerFixMatch_smoke"


def test_unsupervised_term_is_positive_and_reaches_the_student(trainer_factory):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    t = trainer_factory(FIXMATCH, configuration="2d")
    t.on_train_start()
    # an untrained network is rarely 95% sure: accept every voxel so the term is not empty
    t.confidence_rule.value = 0.0
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    weak = next(t.dataloader_unlabeled)["data"]
    from nnunet_foundation.training.views import strong_views

    torch.manual_seed(0)
    unlabeled = {"data": weak, "strong": strong_views(weak, t.num_strong_views)}
    assert len(unlabeled["strong"]) == 2 and not torch.equal(unlabeled["strong"][0], unlabeled["strong"][1])

    def grads_with_weight(w):
        t.unsup_weight = lambda: w
        t.optimizer.zero_grad(set_to_none=True)
        parts = t.compute_losses(labeled, unlabeled)
        parts.total.backward()
        # the lowest deep-supervision output has weight 0 in nnU-Net's loss: its head gets no gradient
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in t.network.parameters()], parts.logs

    g0, _ = grads_with_weight(0.0)
    g1, logs = grads_with_weight(10.0)
    assert logs["unsup_loss"] > 0 and float(logs["confident_fraction"]) == 1.0
    assert any(not torch.allclose(a, b) for a, b in zip(g0, g1)), "the pseudo-label term does not reach the student"

    # at the default threshold, voxels below 95% confidence carry no loss: with none confident the term is 0
    t.confidence_rule.value = 1.0
    _, logs = grads_with_weight(10.0)
    assert logs["unsup_loss"] == 0 and float(logs["confident_fraction"]) == 0.0
    t.dataloader_unlabeled = None


@pytest.mark.e2e
def test_fixmatch_trains_and_predicts_through_the_cli(synthetic_dataset, tmp_path):
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, ("2d",))
    proc = run_cli(["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", FIXMATCH, "-device", "cpu"], env)
    assert "Unlabeled stream: 4 case(s)" in proc.stdout and "2 strong view(s) made on the device" in proc.stdout
    out = Path(env["nnUNet_results"]) / SYNTHETIC_NAME / f"{FIXMATCH}__nnUNetPlans__2d" / "fold_0"
    ckpt = torch.load(out / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["ssl_state"]["iteration"] == 2 * 4 and ckpt["ssl_state"]["settings"]["confidence_threshold"] == 0.95
    log = ckpt["logging"]
    assert len(log["unsup_loss"]) == 2 and all(np.isfinite(log["unsup_loss"]))
    assert all(0.0 <= f <= 1.0 for f in log["confident_fraction"]) and log["unsup_weight"] == [1.0, 1.0]
    assert (out / "validation" / "summary.json").is_file()

    images = Path(env["nnUNet_raw"]) / SYNTHETIC_NAME / "imagesTs"
    pred = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", SYNTHETIC_ID, "-c", "2d", "-tr", FIXMATCH, "-f", 0,
             "-chk", "checkpoint_final.pth", "-device", "cpu", "--disable_progress_bar", "-npp", 0, "-nps", 0], env)
    for case in ("synthetic_t000", "synthetic_t001"):
        seg = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
        assert seg.GetSize() == sitk.ReadImage(str(images / f"{case}_0000.nii.gz")).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 1, 2}


def test_the_worked_example_in_the_docs_is_the_trainer_file():
    from conftest import REPO

    doc = (REPO / "docs" / "adding_a_method.md").read_text()
    source = (REPO / "nnunet_foundation" / "methods" / "fixmatch.py").read_text()
    assert "```python\n" + source + "```" in doc
    assert len(source.splitlines()) < 120
