"""Unlabeled scans in nnU-Net's conventions: finding, validating, preprocessing and loading them.

Layout (raw): ``$nnUNet_raw/DatasetXXX_Name/imagesUnlabeled/CASE_XXXX<file_ending>``, named exactly like imagesTr.
Preprocessed: ``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>_unlabeled/`` with the same file format as
nnU-Net's own preprocessed cases, produced by the dataset's existing plans and preprocessor (same transpose, crop,
normalisation and spacing). The labeled folders, the plans and the dataset fingerprint are never touched, and
nnU-Net's own code (default splits, validation, unpacking) never sees these cases because they live elsewhere.

The loader in this module reads only image arrays: never ``*_seg`` files and never the ``.pkl`` properties, whose
``class_locations`` are computed from labels. That is what lets benchmark splits list labeled cases as
``unlabeled`` without their labels reaching training.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Dict, List, Optional

import numpy as np

from nnunet_foundation.paths import (UNLABELED_METADATA_FILE, UNLABELED_RAW_FOLDER,
                                     unlabeled_preprocessed_folder)


class UnlabeledDataError(RuntimeError):
    """Bad unlabeled input. The message names the file or folder and the fix."""


# ----------------------------------------------------------------------------------------------------------------
# raw data
# ----------------------------------------------------------------------------------------------------------------
def find_unlabeled_raw_cases(raw_dataset_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Case id -> channel files (sorted by channel) in ``imagesUnlabeled``, with the channel layout checked."""
    folder = os.path.join(raw_dataset_folder, UNLABELED_RAW_FOLDER)
    file_ending = dataset_json["file_ending"]
    num_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    if not os.path.isdir(folder):
        raise UnlabeledDataError(
            f"{folder} does not exist. Put unlabeled scans there, named like imagesTr "
            f"(CASE_0000{file_ending}, one file per channel), or use a label-scarcity split "
            f"(nnunet-foundation make-splits) whose 'unlabeled' list names training cases.")
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(file_ending) + r"$")
    cases: Dict[str, Dict[int, str]] = {}
    strays = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("."):
            continue
        m = pattern.match(name)
        if m is None:
            strays.append(name)
            continue
        cases.setdefault(m.group(1), {})[int(m.group(2))] = os.path.join(folder, name)
    if strays:
        raise UnlabeledDataError(
            f"{folder}: {len(strays)} file(s) do not follow nnU-Net's naming CASE_XXXX{file_ending}, e.g. "
            f"{strays[:3]}. Rename them (channel index as 4 digits) or move them out of the folder.")
    if not cases:
        raise UnlabeledDataError(f"{folder} is empty: no CASE_XXXX{file_ending} files found.")
    result = {}
    for case, channels in cases.items():
        expected = list(range(num_channels))
        if sorted(channels) != expected:
            raise UnlabeledDataError(
                f"{folder}: case '{case}' has channel files {sorted(channels)} but dataset.json declares "
                f"{num_channels} channel(s) {dataset_json.get('channel_names')}; expected "
                f"{[f'{case}_{c:04d}{file_ending}' for c in expected]}.")
        result[case] = [channels[c] for c in expected]
    return result


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------
def _plans_fingerprint(plans: dict, configuration: str) -> str:
    """What the preprocessed arrays depend on: the configuration's resolved settings and the intensity statistics."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    relevant = {
        "configuration": cm.configuration,
        "transpose_forward": pm.transpose_forward,
        "foreground_intensity_properties_per_channel": pm.foreground_intensity_properties_per_channel,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _preprocess_one(args) -> str:
    case, files, out_folder, plans, configuration, dataset_json = args
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        data, seg, properties = preprocessor.run_case(files, None, pm, cm, dataset_json)
    except Exception as e:  # unreadable or inconsistent image: name it
        raise UnlabeledDataError(f"could not read/preprocess unlabeled case '{case}' ({files}): "
                                 f"{type(e).__name__}: {e}. Check that the files are valid images with the "
                                 f"same geometry per channel, or remove the case.") from e
    data = data.astype(np.float32, copy=False)
    # with no label given, nnU-Net's preprocessor returns the nonzero mask (-1 outside) as 'seg'; keep it so the
    # folder has nnU-Net's usual layout, but it is derived from the image alone and the loader never reads it
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_s, chunks_s = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, os.path.join(out_folder, case),
                                  chunks=chunks, blocks=blocks, chunks_seg=chunks_s, blocks_seg=blocks_s)
    return case


def preprocess_unlabeled(dataset_name_or_id, configurations=("3d_fullres",), plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, verbose: bool = True) -> Dict[str, str]:
    """Preprocess ``imagesUnlabeled`` with the dataset's existing plans; returns configuration -> output folder.

    Cases already preprocessed with the same plans are skipped; if the plans changed, the (derived) unlabeled
    folder is rebuilt. Labeled data, plans and fingerprint are read, never written.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    try:
        dataset_name = maybe_convert_to_dataset_name(dataset_name_or_id)
    except RuntimeError as e:
        raise UnlabeledDataError(f"dataset {dataset_name_or_id!r} not found: {e}") from None
    raw_folder = os.path.join(nnUNet_raw.require(), dataset_name)
    pre_base = os.path.join(nnUNet_preprocessed.require(), dataset_name)
    plans_file = os.path.join(pre_base, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise UnlabeledDataError(
            f"{plans_file} not found: the dataset has not been planned yet. Run "
            f"'nnUNetv2_plan_and_preprocess -d {dataset_name_or_id}' (with your usual options) first; unlabeled "
            f"scans are preprocessed with the plans it creates.")
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(pre_base, "dataset.json"))

    cases = find_unlabeled_raw_cases(raw_folder, dataset_json)
    labeled = set(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).keys())
    clashes = sorted(set(cases) & labeled)
    if clashes:
        raise UnlabeledDataError(
            f"{os.path.join(raw_folder, UNLABELED_RAW_FOLDER)}: case name(s) {clashes[:5]} also exist in imagesTr. "
            f"Unlabeled cases need their own names (e.g. prefix them with 'u_'), or remove the duplicates.")

    outputs = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise UnlabeledDataError(f"{plans_file} has no configuration '{configuration}'. "
                                     f"Available: {sorted(plans['configurations'])}.")
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        cm = PlansManager(plans).get_configuration(configuration)
        out = unlabeled_preprocessed_folder(pre_base, cm.data_identifier)
        fingerprint = _plans_fingerprint(plans, configuration)
        meta_file = os.path.join(out, UNLABELED_METADATA_FILE)
        done = set()
        if os.path.isfile(meta_file):
            meta = load_json(meta_file)
            if meta.get("plans_fingerprint") == fingerprint:
                done = {c for c in meta.get("cases", []) if os.path.isfile(os.path.join(out, c + ".b2nd"))}
            else:
                if verbose:
                    print(f"[unlabeled] {configuration}: plans changed since {out} was written; rebuilding it")
                shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        todo = [c for c in sorted(cases) if c not in done]
        if verbose:
            print(f"[unlabeled] {dataset_name} {configuration}: {len(cases)} unlabeled case(s), "
                  f"{len(done)} already preprocessed, {len(todo)} to do -> {out}")
        jobs = [(c, cases[c], out, plans, configuration, dataset_json) for c in todo]
        finished = sorted(done)
        try:
            if num_processes > 1 and len(jobs) > 1:
                import multiprocessing
                with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                    for i, case in enumerate(pool.imap_unordered(_preprocess_one, jobs), 1):
                        finished.append(case)
                        if verbose:
                            print(f"[unlabeled]   {i}/{len(jobs)} {case}")
            else:
                for i, job in enumerate(jobs, 1):
                    finished.append(_preprocess_one(job))
                    if verbose:
                        print(f"[unlabeled]   {i}/{len(jobs)} {job[0]}")
        finally:
            # record what is complete, also after an error, so a rerun only does what is missing
            with open(meta_file, "w") as f:
                json.dump({"plans_identifier": plans_identifier, "configuration": configuration,
                           "plans_fingerprint": fingerprint, "cases": sorted(finished),
                           "raw_folder": os.path.join(raw_folder, UNLABELED_RAW_FOLDER)}, f, indent=2)
        outputs[configuration] = out
    return outputs


# ----------------------------------------------------------------------------------------------------------------
# what a trainer trains on
# ----------------------------------------------------------------------------------------------------------------
def collect_unlabeled_cases(preprocessed_dataset_folder_base: str, preprocessed_dataset_folder: str,
                            data_identifier: str, plans: dict, configuration: str,
                            split_unlabeled: Optional[List[str]], labeled_keys: List[str]) -> Dict[str, str]:
    """Case id -> folder holding its image array, for the unlabeled stream of one fold.

    Sources: the fold's ``unlabeled`` list (cases in the labeled preprocessed folder whose labels are never read)
    and every case preprocessed from ``imagesUnlabeled``.
    """
    cases: Dict[str, str] = {}
    overlap = sorted(set(split_unlabeled or []) & set(labeled_keys))
    if overlap:
        raise UnlabeledDataError(
            f"{os.path.join(preprocessed_dataset_folder_base, 'splits_final.json')}: case(s) {overlap[:5]} are in "
            f"both the 'unlabeled' list and the 'train'/'val' lists of this fold. A case is either labeled or "
            f"unlabeled; fix the split (nnunet-foundation make-splits writes consistent ones).")
    for case in split_unlabeled or []:
        if not _has_image_array(preprocessed_dataset_folder, case):
            raise UnlabeledDataError(
                f"splits_final.json lists '{case}' as unlabeled but {preprocessed_dataset_folder} has no "
                f"preprocessed image for it. Re-run nnUNetv2_plan_and_preprocess or fix the split.")
        cases[case] = preprocessed_dataset_folder

    folder = unlabeled_preprocessed_folder(preprocessed_dataset_folder_base, data_identifier)
    meta_file = os.path.join(folder, UNLABELED_METADATA_FILE)
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            meta = json.load(f)
        if meta.get("plans_fingerprint") != _plans_fingerprint(plans, configuration):
            raise UnlabeledDataError(
                f"{folder} was preprocessed with different plans than the ones this training uses. Re-run "
                f"'nnunet-foundation preprocess-unlabeled -d <dataset> -c {configuration}' to rebuild it.")
        for case in meta.get("cases", []):
            if case in cases or case in labeled_keys:
                raise UnlabeledDataError(f"{folder}: unlabeled case '{case}' has the same name as a labeled or "
                                         f"split-unlabeled case. Rename it in imagesUnlabeled and re-run "
                                         f"preprocess-unlabeled.")
            cases[case] = folder
    return cases


def _has_image_array(folder: str, case: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, case + ext)) for ext in (".b2nd", ".npy", ".npz"))


class UnlabeledImageDataset:
    """Image-only dataset over cases from several folders; duck-types nnU-Net's dataset for its DataLoader.

    ``load_case`` returns ``(data, None, None, {})``: no segmentation and no properties are ever opened.
    """

    def __init__(self, case_to_folder: Dict[str, str]):
        self.case_to_folder = dict(sorted(case_to_folder.items()))
        self.identifiers = list(self.case_to_folder)

    def __len__(self):
        return len(self.identifiers)

    def load_case(self, identifier):
        folder = self.case_to_folder[identifier]
        base = os.path.join(folder, identifier)
        if os.path.isfile(base + ".b2nd"):
            import blosc2
            kwargs = {} if os.name == "nt" else {"mmap_mode": "r"}
            data = blosc2.open(urlpath=base + ".b2nd", mode="r", dparams={"nthreads": 1}, **kwargs)
        elif os.path.isfile(base + ".npy"):
            data = np.load(base + ".npy", mmap_mode="r")
        elif os.path.isfile(base + ".npz"):
            with np.load(base + ".npz") as npz:  # npz members load lazily: only 'data' is decompressed
                data = npz["data"]
        else:
            raise UnlabeledDataError(f"no preprocessed image for unlabeled case '{identifier}' in {folder}.")
        return data, None, None, {}
