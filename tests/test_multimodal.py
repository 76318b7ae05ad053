"""Multi-modal SSL (issue 19, part 2): the network through nnU-Net's plans, its per-modality streams, and training with
cross-modal consistency + prediction through the real CLIs on generated 4-channel data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import nnunet_environment, plan_and_preprocess, interrupt_then_resume, run_cli
from nnunet_foundation.methods.multimodal.network import NETWORK_CLASS_NAME, MultiModalUNet

TRAINER = "nnUNetTrainerMultiModalSSL_smoke"


def small_network(channels: int = 4, deep_supervision: bool = True) -> MultiModalUNet:
    return MultiModalUNet(channels, 3, (8, 16, 32), torch.nn.Conv2d, 3, (1, 2, 2), 2, 3, 2, True,
                          torch.nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                          deep_supervision=deep_supervision)


def test_each_modality_stream_sees_only_its_own_channel_and_the_fused_output_sees_all():
    torch.manual_seed(0)
    net = small_network()
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    fused, streams = net(x, streams=True)
    assert len(fused) == 2 and fused[0].shape == (2, 3, 16, 16) and len(streams) == 4  # 2 deep-supervision scales
    assert torch.equal(net(x)[0], fused[0])  # the plain forward is the fused prediction
    for m, stream in enumerate(streams):
        (grad,) = torch.autograd.grad(stream[0].sum(), x, retain_graph=True)
        seen = [bool(grad[:, c].abs().sum() > 0) for c in range(4)]
        assert seen == [c == m for c in range(4)], m
    (grad,) = torch.autograd.grad(fused[0].sum(), x)
    assert all(grad[:, c].abs().sum() > 0 for c in range(4))
    # no second copy of an encoder hides in the decoder's state (the decoder got a plain record of the layout)
    assert not any(k.startswith("decoder.encoder") for k in net.state_dict())
    with pytest.raises(ValueError, match="built for 4 input channel"):
        net(torch.randn(1, 3, 16, 16))


@pytest.mark.e2e
def test_multimodal_plans_train_resume_and_predict_with_cross_modal_consistency(tmp_path):
    from nnunet_foundation.synthetic import write_dataset

    env = nnunet_environment(tmp_path)
    write_dataset(env["nnUNet_raw"], dataset_id=931, name="FourModal", num_labeled=5, num_unlabeled=2,
                  shape=(8, 24, 24), num_channels=4, num_test=1)
    plan_and_preprocess(env, 931, ("2d",))
    run_cli(["nnunet-foundation", "preprocess-unlabeled", "-d", 931, "-c", "2d"], env)
    proc = run_cli(["nnunet-foundation", "multimodal-plans", "-d", 931], env)
    assert "4 modality encoder(s)" in proc.stdout
    base = Path(env["nnUNet_preprocessed"]) / "Dataset931_FourModal"
    plans = json.loads((base / "nnUNetPlansMultiModal.json").read_text())
    stock = json.loads((base / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["2d"]["architecture"]["network_class_name"] == NETWORK_CLASS_NAME
    assert plans["configurations"]["2d"]["data_identifier"] == stock["configurations"]["2d"]["data_identifier"]

    # the stock network is refused with the command that fixes it
    refused = run_cli(["nnUNetv2_train", 931, "2d", 0, "-tr", TRAINER, "-device", "cpu"], env, check=False)
    assert refused.returncode != 0 and "multimodal-plans" in refused.stdout + refused.stderr

    train = ["nnUNetv2_train", 931, "2d", 0, "-p", "nnUNetPlansMultiModal", "-tr", TRAINER, "-device", "cpu"]
    out = Path(env["nnUNet_results"]) / "Dataset931_FourModal" / f"{TRAINER}__nnUNetPlansMultiModal__2d" / "fold_0"
    # killed after its first epoch; nnU-Net's --c rebuilds the multi-stream network from the plans and continues
    _, checkpoint = interrupt_then_resume(train, env, out)
    log = checkpoint["logging"]
    assert all(v > 0 for v in log["unsup_loss"]) and all(r > 0 for r in log["grad_ratio_unsup_sup"])
    assert all(0 <= a <= 1 for a in log["modality_agreement"])
    assert any(k.startswith("encoders.3.") for k in checkpoint["network_weights"])
    pred = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", Path(env["nnUNet_raw"]) / "Dataset931_FourModal" / "imagesTs", "-o", pred,
             "-d", 931, "-c", "2d", "-p", "nnUNetPlansMultiModal", "-tr", TRAINER, "-f", 0, "-device", "cpu",
             "--disable_progress_bar", "-npp", 0, "-nps", 0], env)
    assert len(list(pred.glob("*.nii.gz"))) == 1
