"""Multi-phase studies (issue 19, part 3): the conversion of unregistered phases with a missing phase into single-phase
nnU-Net cases with whole test patients held out, and CPS started from pretrained weights with two different
networks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import nnunet_environment, run_cli
from nnunet_foundation.synthetic import _write_nifti

LABELED_PHASE = "GED4"
# patient -> phases it has; P3 lacks the labeled phase, P2 lacks DWI, P4 has the labeled phase without a label
PATIENTS = {"P1": ("GED4", "T2", "DWI"), "P2": ("GED4", "T2"), "P3": ("T2", "DWI"), "P4": ("GED4", "T2", "DWI"),
            "P5": ("GED4", "T2", "DWI"), "P6": ("GED4", "DWI")}
UNLABELED_GED4 = {"P4"}


def write_study(root: Path, seed: int = 0) -> Path:
    """Phases of different sizes and contrasts (unregistered), a label for the labeled phase where there is one."""
    rng = np.random.default_rng(seed)
    study = root / "study"
    for patient, phases in PATIENTS.items():
        for i, phase in enumerate(phases):
            shape = (8, 12 + 2 * i, 12 + i)  # each phase on its own grid
            label = np.zeros(shape, np.uint8)
            label[2:6, 3:8, 3:8] = 1
            contrast = {"GED4": 1.0, "T2": -0.6, "DWI": 0.4}[phase]
            image = (contrast * label + rng.normal(0, 0.2, shape)).astype(np.float32) * 100
            (study / patient).mkdir(parents=True, exist_ok=True)
            _write_nifti(image, str(study / patient / f"{phase}.nii.gz"), (2.0, 1.0, 1.0))
            if phase == LABELED_PHASE and patient not in UNLABELED_GED4:
                _write_nifti(label, str(study / patient / f"{phase}_seg.nii.gz"), (2.0, 1.0, 1.0))
    return study


def convert(study: Path, env: dict, *extra, check: bool = True):
    return run_cli(["nnunet-foundation", "convert-multiphase", "-i", study, "-d", 951, "-n", "Liver",
                    "--labeled-phase", LABELED_PHASE, "--labels", '{"background": 0, "liver": 1}',
                    "--test-patients", 1, *extra], env, check=check)


def names(folder: Path, suffix: str) -> set:
    return {p.name[:-len(suffix)] for p in folder.glob(f"*{suffix}")} if folder.is_dir() else set()


def test_phases_become_single_channel_cases_and_test_patients_stay_out_of_training(tmp_path):
    env = nnunet_environment(tmp_path)
    study = write_study(tmp_path)
    proc = convert(study, env)
    out = Path(env["nnUNet_raw"]) / "Dataset951_Liver"
    record = json.loads((out / "patients.json").read_text())
    test_patients = [p for p, r in record["patients"].items() if r["role"] == "test"]
    assert len(test_patients) == 1 and f"test patients (held out whole): {test_patients[0]}" in proc.stdout
    test = test_patients[0]
    labeled_train = {p for p, ph in PATIENTS.items() if LABELED_PHASE in ph and p not in UNLABELED_GED4} - {test}

    assert names(out / "imagesTr", "_0000.nii.gz") == names(out / "labelsTr", ".nii.gz") == \
        {f"{p}_{LABELED_PHASE}" for p in labeled_train}
    assert names(out / "imagesTs", "_0000.nii.gz") == names(out / "labelsTs", ".nii.gz") == {f"{test}_GED4"}
    # every other phase of a training patient is unlabeled, the labeled phase without a label too, and a patient
    # without the labeled phase contributes its phases; nothing of the test patient is in training
    expected_unlabeled = {f"{p}_{ph}" for p, phases in PATIENTS.items() if p != test for ph in phases
                          if ph != LABELED_PHASE or p in UNLABELED_GED4}
    assert names(out / "imagesUnlabeled", "_0000.nii.gz") == expected_unlabeled
    assert not any(n.startswith(f"{test}_") for n in expected_unlabeled | names(out / "imagesTr", "_0000.nii.gz"))
    # files are copied as they are (no resampling, no registration)
    assert (out / "imagesUnlabeled" / "P1_T2_0000.nii.gz").read_bytes() == (study / "P1" / "T2.nii.gz").read_bytes()
    assert record["patients"]["P2"]["missing_phases"] == ["DWI"] and record["patients"]["P3"]["labeled"] is False
    assert record["cases"]["P3_T2"] == {"patient": "P3", "phase": "T2", "folder": "imagesUnlabeled"}
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == len(labeled_train) and dataset["labels"] == {"background": 0, "liver": 1}

    # nnU-Net accepts it as it is
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    run_cli(["nnUNetv2_extract_fingerprint", "-d", 951, "--verify_dataset_integrity", "-np", 1], plan_env)

    # an existing dataset is never written into
    before = sorted(p.name for p in out.rglob("*"))
    again = convert(study, env, check=False)
    assert again.returncode == 2 and "exists" in again.stderr and sorted(p.name for p in out.rglob("*")) == before


def test_bad_studies_are_refused_before_anything_is_written(tmp_path):
    env = nnunet_environment(tmp_path)
    study = write_study(tmp_path)
    _write_nifti(np.zeros((8, 5, 5), np.uint8), str(study / "P1" / "GED4_seg.nii.gz"), (2.0, 1.0, 1.0))
    (study / "P2" / "GED4.nii.gz").unlink()  # P2's label is left without its image
    proc = convert(study, env, check=False)
    assert proc.returncode == 2 and "P2/GED4_seg.nii.gz: a label without its image" in proc.stderr
    (study / "P2" / "GED4_seg.nii.gz").unlink()
    proc = convert(study, env, check=False)
    assert proc.returncode == 2 and "P1/GED4_seg.nii.gz" in proc.stderr and "labeled phase's grid" in proc.stderr
    proc = run_cli(["nnunet-foundation", "convert-multiphase", "-i", study, "-d", 951, "-n", "Liver",
                    "--labeled-phase", "T1", "--labels", '{"background": 0, "liver": 1}'], env, check=False)
    assert proc.returncode == 2 and "check --labeled-phase" in proc.stderr
    assert list(Path(env["nnUNet_raw"]).iterdir()) == []


def _pretrained_file(trainer, path: Path, seed: int = 1) -> dict:
    """Weights a pretraining could have produced: the architecture's, moved well away from this initialisation (on a
    copy of the network, so that state-dict keys that alias one tensor stay equal)."""
    import copy

    generator = torch.Generator().manual_seed(seed)
    network = copy.deepcopy(trainer.network)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    state = network.state_dict()
    torch.save({"network_weights": state}, path)
    return state


@pytest.mark.parametrize("pretrained_start", ["perturbed_copy", "fresh"])
def test_cps_from_pretrained_weights_starts_two_different_networks_near_them(trainer_factory, monkeypatch, tmp_path,
                                                                            pretrained_start):
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    monkeypatch.setenv("nnUNet_ssl_pretrained_start", pretrained_start)
    trainer = trainer_factory("nnUNetTrainerCPS_smoke", "2d")
    trainer.initialize()
    b_initial = {k: v.clone() for k, v in trainer.network_b.state_dict().items()}
    pretrained = _pretrained_file(trainer, tmp_path / "pretrained.pth")
    load_pretrained_weights(trainer.network, str(tmp_path / "pretrained.pth"))  # what nnUNetv2_train does
    trainer.sync_ssl_modules_with_network()  # at train start, as no checkpoint was restored
    a, b = trainer.network.state_dict(), trainer.network_b.state_dict()
    transferred = [k for k in a if ".seg_layers." not in k and a[k].is_floating_point() and a[k].numel() > 1]
    assert transferred and all(torch.equal(a[k], pretrained[k]) for k in transferred)
    if pretrained_start == "fresh":
        assert all(torch.equal(b[k], b_initial[k]) for k in b)
        return
    for k in transferred:
        difference = (b[k] - a[k]).std() / a[k].std()
        assert 0.02 < difference < 0.1, k  # 0.05 x the tensor's std: near the pretrained weights, not on them
    assert "network B from the same weights" in (Path(trainer.log_file).read_text())


def test_cps_without_pretrained_weights_keeps_its_independent_second_network(trainer_factory):
    trainer = trainer_factory("nnUNetTrainerCPS_smoke", "2d")
    trainer.initialize()
    b_initial = {k: v.clone() for k, v in trainer.network_b.state_dict().items()}
    trainer.sync_ssl_modules_with_network()
    assert all(torch.equal(v, b_initial[k]) for k, v in trainer.network_b.state_dict().items())
    assert any(not torch.equal(v, trainer.network.state_dict()[k]) for k, v in b_initial.items()
               if v.is_floating_point())
