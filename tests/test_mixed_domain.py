"""Mixed-domain SSL (issue 19, part 1): k-means and MMD, the bidirectional copy-paste, both terms reaching the student,
and training + prediction through the real CLIs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import SYNTHETIC_ID, copy_nnunet_tree, preprocess_unlabeled_cli, interrupt_then_resume, run_cli
from nnunet_foundation.methods.mixed_domain import (cluster_mmd, feature_vectors, gaussian_mmd, kmeans,
                                                    nnUNetTrainerMixedDomain)
from nnunet_foundation.training.networks import captured_encoder_output

TRAINER = "nnUNetTrainerMixedDomain_smoke"


def test_kmeans_finds_separated_groups_reproducibly():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 3, generator=g) + 6, torch.randn(40, 3, generator=g) - 6,
                   torch.randn(40, 3, generator=g) + torch.tensor([6.0, -6.0, 0.0])])
    first, _ = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    again, _ = kmeans(x, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)
    assert [len(first[i * 40:(i + 1) * 40].unique()) for i in range(3)] == [1, 1, 1]  # each group one cluster
    assert len(first.unique()) == 3


def test_mmd_is_small_for_one_distribution_and_grows_with_the_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(80, 4, generator=g), torch.randn(80, 4, generator=g)
    values = [float(gaussian_mmd(a, b + shift, (0.5, 1.0, 2.0))) for shift in (0.0, 1.0, 3.0)]
    assert values[0] < 0.1 < values[1] < values[2]
    assert float(gaussian_mmd(a, b, (1.0,))) == pytest.approx(float(gaussian_mmd(b, a, (1.0,))), rel=1e-5)


def test_cluster_mmd_moves_unlabeled_features_not_the_anchors():
    g = torch.Generator().manual_seed(0)
    unlabeled = (torch.randn(64, 4, generator=g) + 2).requires_grad_()
    anchors = torch.randn(64, 4, generator=g).requires_grad_()
    loss = cluster_mmd(unlabeled, anchors, clusters=3, bandwidths=(0.5, 1.0, 2.0))
    loss.backward()
    assert loss.item() > 0 and unlabeled.grad.abs().sum() > 0 and anchors.grad is None


def test_copy_paste_takes_labels_from_the_labeled_crop_and_pseudo_labels_from_the_unlabeled_one():
    box = torch.zeros(3, 4, 4, dtype=torch.bool)
    box[:, :2, :2] = True
    labels = torch.full((2, 4, 4), 1)   # two labeled crops, cycled over three unlabeled ones
    labels[1] = 2
    pseudo = torch.full((3, 4, 4), 7)
    mixed = nnUNetTrainerMixedDomain.both_directions(box, labels, pseudo)
    assert mixed.shape == (6, 4, 4)
    inward, outward = mixed[:3], mixed[3:]
    assert inward[:, :2, :2].tolist() == [[[1, 1]] * 2, [[2, 2]] * 2, [[1, 1]] * 2]  # label inside the box
    assert bool((inward[:, 2:, :] == 7).all()) and bool((outward[:, :2, :2] == 7).all())
    assert outward[1, 3, 3] == 2 and outward[2, 3, 3] == 1


def test_both_terms_are_positive_and_reach_the_student(trainer_factory):
    preprocess_unlabeled_cli(trainer_factory.env, ("2d",))
    t = trainer_factory(TRAINER, configuration="2d")
    t.on_train_start()
    batch = next(t.dataloader_train)
    labeled = {"data": batch["data"], "target": batch["target"]}
    unlabeled = {"data": next(t.dataloader_unlabeled)["data"]}
    params = [p for p in t.network.parameters() if p.requires_grad]
    torch.manual_seed(0)
    parts = t.compute_losses(labeled, unlabeled)
    logs = parts.logs
    assert float(logs["copy_paste_loss"]) > 0 and float(logs["cmmd_loss"]) > 0 and logs["unsup_weight"] == 1.0
    assert parts.unsupervised.item() == pytest.approx(
        float(logs["copy_paste_loss"]) + 0.1 * float(logs["cmmd_loss"]), rel=1e-5)
    grads = torch.autograd.grad(parts.unsupervised, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    # the CMMD term alone reaches the encoder through the captured bottleneck (the pieces compute_losses uses)
    x_l, x_u = labeled["data"], unlabeled["data"]
    with captured_encoder_output(t.network) as captured:
        t.forward_labeled_and_unlabeled(x_l, x_u)
    bottleneck, n = captured["features"][-1], x_l.shape[0]
    cmmd = cluster_mmd(feature_vectors(bottleneck[n:], 256), feature_vectors(bottleneck[:n], 256), 4,
                       t.ssl_settings["mmd_bandwidths"])
    encoder = [p for p in t.network.encoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(cmmd, encoder, allow_unused=True)
    assert cmmd.item() > 0 and sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert not t.network.encoder._forward_hooks
    t.dataloader_unlabeled = None


@pytest.mark.e2e
def test_mixed_domain_trains_resumes_and_predicts_through_the_cli(synthetic_dataset, tmp_path):
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, ("2d",))
    train = ["nnUNetv2_train", SYNTHETIC_ID, "2d", 0, "-tr", TRAINER, "-device", "cpu"]
    out = Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    interrupted, checkpoint = interrupt_then_resume(train, env, out)
    log = checkpoint["logging"]
    # the teacher kept following the student after the resume
    assert any(not torch.equal(v, interrupted["ssl_state"]["teacher_weights"][k])
               for k, v in checkpoint["ssl_state"]["teacher_weights"].items())
    assert all(v > 0 for v in log["copy_paste_loss"]) and all(v > 0 for v in log["cmmd_loss"])
    assert all(r > 0 for r in log["grad_ratio_unsup_sup"])
    # nnUNetv2_predict loads the EMA teacher
    for k, v in checkpoint["network_weights"].items():
        assert torch.equal(v, checkpoint["ssl_state"]["teacher_weights"][k])
    pred = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesTs", "-o", pred,
             "-d", SYNTHETIC_ID, "-c", "2d", "-tr", TRAINER, "-f", 0, "-device", "cpu", "--disable_progress_bar",
             "-npp", 0, "-nps", 0], env)
    assert len(list(pred.glob("*.nii.gz"))) == 2
