"""Checks of a dataset before a long run: unlabeled scans, their preprocessed folders, splits, settings, checkpoints.

Everything here only reads. Each finding is ``ok``, ``note`` (worth knowing, not wrong) or ``problem`` (a run
would fail, or would silently use the wrong data); problems name the file and the fix, like the errors the
commands themselves raise, and reuse the same checks.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from nnunet_foundation.paths import UNLABELED_RAW_FOLDER, unlabeled_preprocessed_folder
from nnunet_foundation.unlabeled import (UnlabeledDataError, has_image_array, plans_fingerprint,
                                         find_unlabeled_raw_cases, labeled_images_are_2d, read_unlabeled_record,
                                         unlabeled_folder_status, validate_unlabeled_scan)

OK, NOTE, PROBLEM = "ok", "note", "problem"


@dataclass
class Finding:
    level: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.level}]{' ' * (8 - len(self.level))}{self.subject}: {self.message}"


def check_dataset(dataset_name_or_id, configurations: Optional[Sequence[str]] = None,
                  plans_identifier: str = "nnUNetPlans", trainer: Optional[str] = None) -> List[Finding]:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    findings: List[Finding] = []
    try:
        name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        return [Finding(PROBLEM, "dataset", f"{dataset_name_or_id!r} not found in nnUNet_raw, nnUNet_preprocessed "
                                            f"or nnUNet_results ({str(e).splitlines()[0]})")]
    pre_base = os.path.join(nnUNet_preprocessed.require(), name)
    plans_file = os.path.join(pre_base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        return [Finding(PROBLEM, "plans", f"{plans_file} not found: run 'nnUNetv2_plan_and_preprocess -d "
                                          f"{dataset_name_or_id}' first")]
    with open(plans_file) as f:
        plans = json.load(f)
    with open(os.path.join(pre_base, "dataset.json")) as f:
        dataset_json = json.load(f)
    pm = PlansManager(plans)
    if configurations:
        unknown = [c for c in configurations if c not in plans["configurations"]]
        if unknown:
            findings.append(Finding(PROBLEM, "plans", f"{plans_file} has no configuration(s) {unknown}; available: "
                                                      f"{sorted(plans['configurations'])}"))
        configurations = [c for c in configurations if c in plans["configurations"]]
    else:  # the configurations that were preprocessed
        configurations = [c for c in plans["configurations"] if os.path.isdir(
            os.path.join(pre_base, pm.get_configuration(c).data_identifier))]
    labeled_folders = {}
    for c in configurations:
        folder = os.path.join(pre_base, pm.get_configuration(c).data_identifier)
        if os.path.isdir(folder):
            labeled_folders[c] = folder
            n = len([f for f in os.listdir(folder) if f.endswith(".pkl")])
            findings.append(Finding(OK, f"preprocessed {c}", f"{n} labeled case(s) in {folder}"))
        else:
            findings.append(Finding(PROBLEM, f"preprocessed {c}", f"{folder} does not exist: run "
                                                                  f"'nnUNetv2_preprocess -d {dataset_name_or_id} -c {c}'"))

    findings += _check_unlabeled(name, nnUNet_raw.get(), pre_base, plans, pm, dataset_json, configurations)
    findings += _check_splits(pre_base, labeled_folders)
    findings += _check_settings_and_runs(name, trainer, nnUNet_results.get(), plans_identifier, configurations)
    return findings


def _check_unlabeled(name, raw_root, pre_base, plans, pm, dataset_json, configurations) -> List[Finding]:
    raw_folder = os.path.join(raw_root, name) if raw_root else None
    if raw_folder is None or not os.path.isdir(os.path.join(raw_folder, UNLABELED_RAW_FOLDER)):
        return [Finding(NOTE, "imagesUnlabeled", "no imagesUnlabeled folder here (nnUNet_raw not set or no folder): "
                                                 "only the preprocessed unlabeled folders and the splits' "
                                                 "'unlabeled' lists are checked")] + [
            Finding(NOTE, f"unlabeled {c}", f"{len(record['cases'])} preprocessed case(s) recorded in {folder}")
            for c in configurations
            for folder in [unlabeled_preprocessed_folder(pre_base, pm.get_configuration(c).data_identifier)]
            for record in [read_unlabeled_record(folder)] if record is not None]
    try:
        cases = find_unlabeled_raw_cases(raw_folder, dataset_json)
    except UnlabeledDataError as e:
        return [Finding(PROBLEM, "imagesUnlabeled", str(e))]
    findings = []
    dataset_is_2d = labeled_images_are_2d(pre_base)
    damaged = 0
    for case, files in sorted(cases.items()):
        try:
            validate_unlabeled_scan(files, dataset_is_2d)
        except UnlabeledDataError as e:
            damaged += 1
            findings.append(Finding(PROBLEM, "imagesUnlabeled", str(e)))
    findings.append(Finding(OK if not damaged else PROBLEM, "imagesUnlabeled",
                            f"{len(cases)} scan(s), {damaged} damaged or of the wrong dimensionality"))
    for c in configurations:
        folder = unlabeled_preprocessed_folder(pre_base, pm.get_configuration(c).data_identifier)
        command = f"nnunet-foundation preprocess-unlabeled -d {name} -c {c}"
        status = unlabeled_folder_status(folder, cases, plans_fingerprint(plans, c))
        if not status.has_record:
            findings.append(Finding(NOTE, f"unlabeled {c}", f"not preprocessed ({folder} has no record): trainers "
                                                            f"will not use imagesUnlabeled; run '{command}'"))
        elif status.in_sync:
            findings.append(Finding(OK, f"unlabeled {c}", f"{len(status.up_to_date)} case(s) preprocessed, matching "
                                                          f"imagesUnlabeled"))
        else:
            findings.append(Finding(PROBLEM, f"unlabeled {c}", f"{'; '.join(status.describe_differences())}. "
                                                               f"Trainers refuse this folder; run '{command}'"))
    return findings


def _check_splits(pre_base: str, labeled_folders: dict) -> List[Finding]:
    path = os.path.join(pre_base, "splits_final.json")
    if not os.path.isfile(path):
        return [Finding(NOTE, "splits", f"{path} does not exist: nnU-Net writes a random 5-fold split at the first "
                                        f"training (no 'unlabeled' lists)")]
    try:
        with open(path) as f:
            splits = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return [Finding(PROBLEM, "splits", f"{path} cannot be read ({e}); fix or delete it "
                                           f"('nnunet-foundation make-splits' writes one)")]
    if not isinstance(splits, list) or not all(isinstance(s, dict) for s in splits):
        return [Finding(PROBLEM, "splits", f"{path}: expected a list of folds, each {{'train': [...], 'val': [...]}}")]
    findings = []
    for i, fold in enumerate(splits):
        subject = f"splits fold {i}"
        lists = {k: fold.get(k, []) for k in ("train", "val", "unlabeled")}
        problems = []
        if not lists["train"]:
            problems.append("no 'train' cases")
        for key, cases in lists.items():
            duplicates = sorted({c for c in cases if cases.count(c) > 1})
            if duplicates:
                problems.append(f"'{key}' lists {duplicates[:5]} more than once")
        for a, b in (("train", "val"), ("train", "unlabeled"), ("val", "unlabeled")):
            both = sorted(set(lists[a]) & set(lists[b]))
            if both:
                problems.append(f"{both[:5]} are in both '{a}' and '{b}'")
        for configuration, folder in labeled_folders.items():
            missing = sorted(c for cases in lists.values() for c in set(cases) if not has_image_array(folder, c))
            if missing:
                problems.append(f"{len(missing)} case(s) have no preprocessed image in {folder} "
                                f"(e.g. {missing[:3]})")
        counts = ", ".join(f"{len(v)} {k}" for k, v in lists.items())
        if problems:
            findings.append(Finding(PROBLEM, subject, f"{path}: {'; '.join(problems)} ({counts})"))
        else:
            findings.append(Finding(OK, subject, counts))
    return findings


def _check_settings_and_runs(name, trainer, results_root, plans_identifier, configurations) -> List[Finding]:
    from nnunet_foundation.training.settings import SETTINGS_FILE, SettingsError, resolve_settings

    if trainer is None:
        return [Finding(NOTE, "settings", "give -tr TRAINER to check its settings (nnUNet_ssl_* variables, "
                                          "nnUNet_ssl_config) and its existing runs")]
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    cls, error = None, "no such class"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
            cls = recursive_find_trainer_class_by_name(trainer)
    except Exception as e:  # nnU-Net raises a RuntimeError listing where it looked
        error = str(e).splitlines()[0] if str(e) else type(e).__name__
    if cls is None:
        return [Finding(PROBLEM, "settings", f"trainer {trainer} not found ({error}); is nnUNet_extTrainer set "
                                             f"(export nnUNet_extTrainer=$(nnunet-foundation trainer-path))?")]
    defaults = getattr(cls, "default_settings", None)
    if defaults is None:
        return [Finding(NOTE, "settings", f"{trainer} is not a semi-supervised trainer: no settings to check")]
    try:
        settings = resolve_settings(defaults, [c.__name__ for c in cls.__mro__])
    except SettingsError as e:
        return [Finding(PROBLEM, "settings", str(e))]
    findings = [Finding(OK, "settings", json.dumps(settings, sort_keys=True))]
    if not results_root:
        return findings
    from nnunet_foundation.training.checkpoint_files import RESUME_ORDER, UnreadableCheckpointError, read_checkpoint

    for c in configurations:
        run = os.path.join(results_root, name, f"{trainer}__{plans_identifier}__{c}")
        if not os.path.isdir(run):
            continue
        for fold in sorted(f for f in os.listdir(run) if f.startswith("fold_")):
            folder, subject = os.path.join(run, fold), f"run {c} {fold}"
            recorded_file = os.path.join(folder, SETTINGS_FILE)
            if os.path.isfile(recorded_file):
                with open(recorded_file) as f:
                    recorded = json.load(f).get("settings", {})
                changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
                if changed:
                    findings.append(Finding(NOTE, subject, f"settings differ from {recorded_file} in {changed}: --c "
                                                           f"would be refused, a new run would replace the record"))
            for checkpoint in RESUME_ORDER:
                path = os.path.join(folder, checkpoint)
                if not os.path.isfile(path):
                    continue
                try:
                    read_checkpoint(path, "cpu")
                    findings.append(Finding(OK, subject, f"{checkpoint} readable"))
                except UnreadableCheckpointError as e:
                    findings.append(Finding(PROBLEM, subject, f"{e} --c falls back to the next readable checkpoint; "
                                                              f"move the file away once you no longer need it"))
    return findings
