"""nnUNetTrainerSynFoC end to end (tiny SAM checkpoint, CPU): 2d and 3d_fullres training through nnUNetv2_train,
stock prediction, exact --c resume of both students, both teachers, LoRA/head and both optimisers; only SAM's
LoRA/decoder/head parameters learn."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("segment_anything")

from conftest import SYNTHETIC_ID, copy_nnunet_tree, preprocess_unlabeled_cli, run_cli  # noqa: E402

SYNFOC = "nnUNetTrainerSynFoC_smoke"


@pytest.fixture(scope="module")
def sam_checkpoint(tmp_path_factory):
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    return save_tiny_sam_checkpoint(tmp_path_factory.mktemp("sam") / "tiny_sam.pth", seed=4)


def folder(env, configuration):
    return Path(env["nnUNet_results"]) / "Dataset900_Synthetic" / f"{SYNFOC}__nnUNetPlans__{configuration}" / "fold_0"


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_tensors_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tensors_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_tensors_equal(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.e2e
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres"])
def test_synfoc_trains_predicts_and_resumes_exactly(synthetic_dataset, sam_checkpoint, tmp_path, configuration):
    checkpoint_bytes = sam_checkpoint.read_bytes()
    env = copy_nnunet_tree(synthetic_dataset, tmp_path / "tree")
    preprocess_unlabeled_cli(env, (configuration,))
    env["nnUNet_ssl_generalist"] = json.dumps({"backend": "sam", "model_type": "tiny",
                                               "checkpoint": str(sam_checkpoint)})
    run_cli(["nnUNetv2_train", SYNTHETIC_ID, configuration, 0, "-tr", SYNFOC, "-device", "cpu"], env)
    out = folder(env, configuration)
    final = load(out / "checkpoint_final.pth")
    ssl = final["ssl_state"]
    assert ssl["iteration"] == 8
    logging = final["logging"]
    assert all(0.0 <= a <= 1.0 for a in logging["alpha"]) and all(0 <= f <= 1 for f in logging["agreement"])
    # only LoRA, prompt encoder/decoder and head weights are in the SAM state, and they moved from their start
    names = list(ssl["sam_student"])
    assert names and all(".lora_" in n or n.startswith(("sam.prompt_encoder.", "sam.mask_decoder.",
                                                         "multiclass_head.")) for n in names)
    assert any(".lora_b_" in n and ssl["sam_student"][n].abs().sum() > 0 for n in names)  # B starts at 0
    assert sam_checkpoint.read_bytes() == checkpoint_bytes  # the SAM checkpoint file is only read

    # --c from the final checkpoint restores every part exactly (re-saved state equals the loaded one)
    from nnunetv2.run.run_training import get_trainer_from_args
    import os

    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        trainer = get_trainer_from_args(str(SYNTHETIC_ID), configuration, 0, SYNFOC, device=torch.device("cpu"))
        trainer.load_checkpoint(str(out / "checkpoint_final.pth"))
        trainer.save_checkpoint(str(tmp_path / "again.pth"))
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    again = load(tmp_path / "again.pth")
    for key in ("network_weights", "optimizer_state"):
        assert_tensors_equal(final[key], again[key])
    for key in ("teacher_weights", "sam_student", "sam_teacher", "extra_optimizer_states", "iteration"):
        assert_tensors_equal(ssl[key], again["ssl_state"][key])

    pred = tmp_path / "pred"
    env_predict = {k: v for k, v in env.items() if k != "nnUNet_ssl_generalist"}
    run_cli(["nnUNetv2_predict", "-i", str(Path(env["nnUNet_raw"]) / "Dataset900_Synthetic" / "imagesTs"), "-o",
             str(pred), "-d", SYNTHETIC_ID, "-c", configuration, "-tr", SYNFOC, "-f", 0, "-device", "cpu",
             "--disable_progress_bar"], env_predict)
    assert len(list(pred.glob("*.nii.gz"))) == 2


def test_synfoc_without_a_sam_model_fails_early(trainer_factory, monkeypatch):
    monkeypatch.delenv("nnUNet_ssl_generalist", raising=False)
    with pytest.raises(ValueError, match="nnUNet_ssl_generalist"):
        trainer_factory(SYNFOC)
