"""Multi-phase (multi-sequence, multi-vendor) studies as nnU-Net cases, for semi-supervised training without
registration.

The setting (e.g. liver MRI): every patient has several phases (hepatobiliary GED4, T1, T2, DWI, ...), labels exist for
one phase only, the phases are not registered to each other and some are missing. Instead of stacking phases as
channels (which needs registration and every phase present), each phase image becomes its own single-channel case:
the labeled phase goes to ``imagesTr``/``labelsTr``, every other phase to ``imagesUnlabeled``, and a semi-supervised
trainer (e.g. CPS) learns from all of them.

Input layout (one folder per patient; phases are file names, any subset per patient)::

    INPUT/<patient>/<phase>.nii.gz              e.g. GED4.nii.gz, T1.nii.gz, T2.nii.gz, DWI.nii.gz
    INPUT/<patient>/<labeled phase>_seg.nii.gz  the label of the labeled phase, where there is one

Output: an nnU-Net raw dataset with cases named ``<patient>_<phase>`` and ``patients.json`` (case -> patient, and
each patient's phases, missing phases and role). Test patients (``num_test_patients``, drawn with ``seed``) are held
out whole: their labeled phase goes to ``imagesTs``/``labelsTs`` and their other phases are not written at all, so
no image of a test patient ever reaches training, not even unlabeled. A patient without a labeled phase (or without
its label) contributes its phases as unlabeled images.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

PATIENTS_FILE = "patients.json"
LABEL_SUFFIX = "_seg"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]*$")


class MultiPhaseError(ValueError):
    """Input that cannot be converted; the message names the file and the fix. Nothing was written."""


@dataclass
class Patient:
    name: str
    images: Dict[str, Path]                       # phase -> image file
    label: Optional[Path] = None                  # label of the labeled phase
    role: str = "train"                           # train | test
    missing: List[str] = field(default_factory=list)


def _phase_of(path: Path, file_ending: str) -> str:
    return path.name[:-len(file_ending)]


def scan_patients(input_folder: Path, labeled_phase: str, file_ending: str = ".nii.gz") -> List[Patient]:
    """Read the input layout; every problem is reported before anything is written."""
    if not input_folder.is_dir():
        raise MultiPhaseError(f"{input_folder} is not a folder: give the folder with one subfolder per patient")
    patients, problems, all_phases = [], [], set()
    for folder in sorted(p for p in input_folder.iterdir() if p.is_dir()):
        if not _SAFE_NAME.match(folder.name) or "_" in folder.name:
            problems.append(f"{folder}: patient folder names may hold letters, digits, '.' and '-' only (no '_', "
                            f"which separates patient and phase in case names); rename it")
            continue
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(file_ending))
        label_name = f"{labeled_phase}{LABEL_SUFFIX}{file_ending}"
        images = {_phase_of(p, file_ending): p for p in files if p.name != label_name}
        for phase, path in images.items():
            if phase.endswith(LABEL_SUFFIX):
                problems.append(f"{path}: a label of phase '{phase[:-len(LABEL_SUFFIX)]}', but the labeled phase is "
                                f"'{labeled_phase}'; check --labeled-phase")
            elif not _SAFE_NAME.match(phase) or "_" in phase:
                problems.append(f"{path}: phase names may hold letters, digits, '.' and '-' only; rename the file "
                                f"(labels are named <labeled phase>{LABEL_SUFFIX}{file_ending})")
        label = folder / label_name
        if label.exists() and labeled_phase not in images:
            problems.append(f"{label}: a label without its image {folder / (labeled_phase + file_ending)}; add the "
                            f"image or remove the label")
        if not images:
            problems.append(f"{folder}: no {file_ending} image; remove the folder or add the patient's phases")
            continue
        all_phases |= set(images)
        patients.append(Patient(folder.name, images, label if label.exists() else None))
    if problems:
        raise MultiPhaseError("cannot convert (nothing was written):\n  " + "\n  ".join(problems))
    if not patients:
        raise MultiPhaseError(f"{input_folder} has no patient folders (expected {input_folder}/<patient>/"
                              f"<phase>{file_ending})")
    if not any(p.label is not None for p in patients):
        raise MultiPhaseError(f"no patient in {input_folder} has a label of phase '{labeled_phase}' (expected "
                              f"<patient>/{labeled_phase}{LABEL_SUFFIX}{file_ending}); check --labeled-phase")
    for p in patients:
        p.missing = sorted(all_phases - set(p.images))
    return patients


def _check_label_geometry(image: Path, label: Path) -> None:
    import SimpleITK as sitk

    def header(path: Path):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        return reader.GetSize(), reader.GetSpacing()

    (size_i, spacing_i), (size_l, spacing_l) = header(image), header(label)
    if size_i != size_l or any(abs(a - b) > 1e-3 * max(abs(a), 1e-6) for a, b in zip(spacing_i, spacing_l)):
        raise MultiPhaseError(f"{label}: size {size_l} / spacing {spacing_l} differ from its image {image} "
                              f"({size_i} / {spacing_i}); the label must be on the labeled phase's grid")


def convert_multiphase(input_folder: str, raw_folder: str, dataset_id: int, name: str, labeled_phase: str,
                       labels: Dict[str, int], num_test_patients: int = 0, seed: int = 0,
                       channel_name: str = "MRI", file_ending: str = ".nii.gz") -> Path:
    """Write the dataset (see the module docstring) and return its folder. Refuses an existing dataset folder."""
    patients = scan_patients(Path(input_folder), labeled_phase, file_ending)
    labeled = [p for p in patients if p.label is not None]
    if not 0 <= num_test_patients < len(labeled):
        raise MultiPhaseError(f"--test-patients {num_test_patients}: must leave at least one of the {len(labeled)} "
                              f"labeled patients for training")
    if labels.get("background") != 0:
        raise MultiPhaseError("--labels must map 'background' to 0, e.g. '{\"background\": 0, \"liver\": 1}'")
    for p in labeled:
        _check_label_geometry(p.images[labeled_phase], p.label)
    existing = [d for d in Path(raw_folder).glob(f"Dataset{dataset_id:03d}_*")] if Path(raw_folder).is_dir() else []
    if existing:
        raise MultiPhaseError(f"{existing[0]} exists: choose another dataset id (-d); nothing was written")
    for p in random.Random(seed).sample(sorted(labeled, key=lambda q: q.name), num_test_patients):
        p.role = "test"

    target = Path(raw_folder) / f"Dataset{dataset_id:03d}_{name}"
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a previous, interrupted conversion of ours
    cases, num_training = {}, 0
    for p in patients:
        for phase, image in sorted(p.images.items()):
            case = f"{p.name}_{phase}"
            is_labeled = phase == labeled_phase and p.label is not None
            if p.role == "test" and not is_labeled:
                continue  # never let a test patient's other phases into training, even unlabeled
            images_dir = ("imagesTs" if p.role == "test" else "imagesTr") if is_labeled else "imagesUnlabeled"
            (staging / images_dir).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, staging / images_dir / f"{case}_0000{file_ending}")
            if is_labeled:
                labels_dir = "labelsTs" if p.role == "test" else "labelsTr"
                (staging / labels_dir).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p.label, staging / labels_dir / f"{case}{file_ending}")
                num_training += p.role == "train"
            cases[case] = {"patient": p.name, "phase": phase, "folder": images_dir}
    dataset_json = {"channel_names": {"0": channel_name}, "labels": labels, "numTraining": num_training,
                    "file_ending": file_ending, "name": name,
                    "description": f"multi-phase study converted by nnunet-foundation convert-multiphase: phase "
                                   f"'{labeled_phase}' labeled, other phases unlabeled, one phase per case"}
    (staging / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    record = {"labeled_phase": labeled_phase, "seed": seed, "cases": cases,
              "patients": {p.name: {"role": p.role, "phases": sorted(p.images), "missing_phases": p.missing,
                                    "labeled": p.label is not None} for p in patients}}
    (staging / PATIENTS_FILE).write_text(json.dumps(record, indent=2))
    os.replace(staging, target)  # the dataset appears complete or not at all
    return target


def summary(target: Path) -> str:
    record = json.loads((target / PATIENTS_FILE).read_text())
    folders: Dict[str, int] = {}
    for c in record["cases"].values():
        folders[c["folder"]] = folders.get(c["folder"], 0) + 1
    missing = {name: p["missing_phases"] for name, p in record["patients"].items() if p["missing_phases"]}
    test = sorted(n for n, p in record["patients"].items() if p["role"] == "test")
    lines = [f"{target}: " + ", ".join(f"{n} in {f}" for f, n in sorted(folders.items())),
             f"  test patients (held out whole): {', '.join(test) or 'none'}",
             f"  patients with missing phases: " + (", ".join(f"{n} ({', '.join(m)})" for n, m in missing.items())
                                                      or "none")]
    return "\n".join(lines)

