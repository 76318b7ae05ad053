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

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from nnunet_foundation.atomic_files import write_json_atomically
from nnunet_foundation.foundation.checkpoints import file_sha256
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
# raw files: complete and of the dataset's dimensionality
# ----------------------------------------------------------------------------------------------------------------
def check_image_file_complete(path: str) -> None:
    """Refuse a truncated image file that a reader would silently zero-fill (SimpleITK does for NIfTI).

    Checked: the gzip stream of any ``*.gz`` file ends properly, and a NIfTI file (``.nii``/``.nii.gz``) holds as many
    bytes as its header promises. Other formats are left to their readers.
    """
    name = os.path.basename(path)
    stored = None  # bytes of the uncompressed content, when known
    if path.endswith(".gz"):
        stored = 0
        try:
            with gzip.open(path, "rb") as f:
                while True:
                    chunk = f.read(1 << 22)
                    if not chunk:
                        break
                    stored += len(chunk)
        except (EOFError, OSError, zlib.error) as e:
            raise UnlabeledDataError(
                f"{path} is truncated or damaged ({type(e).__name__}: {e}): its gzip stream does not end properly, "
                f"so readers would fill the missing part with zeros. Copy the file again from its source, or remove "
                f"it from the folder.") from None
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        try:
            header = nibabel.load(path).header
            expected = int(header.get_data_offset()) + \
                int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        except Exception:  # not a NIfTI header: the image reader will name the problem
            return
        if stored is None:
            stored = os.path.getsize(path)
        if stored < expected:
            raise UnlabeledDataError(
                f"{path} is truncated: its header promises {expected} bytes of image but the file holds {stored}; "
                f"readers would fill the missing voxels with zeros. Copy the file again from its source, or remove "
                f"it from the folder.")


def is_2d_spacing(spacing) -> bool:
    """nnU-Net's readers load a 2D image as one slice with a first spacing of 999 x the largest in-plane one."""
    spacing = [float(s) for s in spacing]
    return len(spacing) == 3 and np.isclose(spacing[0], 999 * max(spacing[1:]))


def labeled_images_are_2d(preprocessed_dataset_folder_base: str) -> Optional[bool]:
    """Whether the labeled images are 2D, from nnU-Net's dataset fingerprint (None if there is none)."""
    path = os.path.join(preprocessed_dataset_folder_base, "dataset_fingerprint.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        spacings = json.load(f).get("spacings") or []
    return all(is_2d_spacing(s) for s in spacings) if spacings else None


def _refuse_wrong_dimensionality(path: str, image_is_2d: bool, dataset_is_2d: bool, detail: str = "") -> None:
    if dataset_is_2d is None or image_is_2d == dataset_is_2d:
        return
    found, wanted = ("2D", "3D") if image_is_2d else ("3D", "2D")
    raise UnlabeledDataError(f"{path} is a {found} image but the labeled images of this dataset are {wanted}{detail}. "
                             f"Replace it with the {wanted} scan, or remove it from the folder.")


def validate_unlabeled_scan(files: List[str], dataset_is_2d: Optional[bool]) -> None:
    """Cheap checks before anything is written: complete files, and (from the header, where SimpleITK can read it)
    the dataset's dimensionality. Readers accept both a truncated file and a 2D image in a 3D dataset silently."""
    import SimpleITK as sitk

    for path in files:
        check_image_file_complete(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        try:
            reader.ReadImageInformation()
        except RuntimeError:  # a format SimpleITK cannot read: nnU-Net's reader decides, checked after reading
            continue
        _refuse_wrong_dimensionality(path, reader.GetDimension() == 2, dataset_is_2d)


# ----------------------------------------------------------------------------------------------------------------
# preprocessing
# ----------------------------------------------------------------------------------------------------------------
#: files one preprocessed case consists of (nnU-Net's blosc2 layout); the image array is what the stream reads
CASE_FILE_SUFFIXES = (".b2nd", "_seg.b2nd", ".pkl")
#: per-case scratch folders inside the unlabeled folder; a case becomes visible only when moved out of one
INCOMPLETE_PREFIX = ".incomplete_"


TRAINING_ONLY_KEYS = ("architecture", "batch_size", "patch_size", "batch_dice")


def plans_fingerprint(plans: dict, configuration: str) -> str:
    """What the preprocessed arrays depend on: the configuration's resolved settings and the intensity statistics."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    relevant = {
        # what only training reads is left out, so plans that change the network or the batch (e.g.
        # multimodal-plans, a bigger batch) keep using the unlabeled data preprocessed for the same data identifier
        "configuration": {k: v for k, v in cm.configuration.items() if k not in TRAINING_ONLY_KEYS},
        "transpose_forward": pm.transpose_forward,
        "foreground_intensity_properties_per_channel": pm.foreground_intensity_properties_per_channel,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_signature(files: List[str]) -> Dict[str, dict]:
    """What a preprocessed case was made from: size, modification time and hash of each channel file."""
    out = {}
    for path in files:
        st = os.stat(path)
        out[os.path.basename(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(path)}
    return out


def sources_unchanged(recorded, files: List[str]) -> bool:
    """True if the files are those a case was made from. The hash is computed only when the modification time
    differs (a copy that kept the content must not force a redo)."""
    if not isinstance(recorded, dict) or set(recorded) != {os.path.basename(f) for f in files}:
        return False
    for path in files:
        entry, st = recorded[os.path.basename(path)], os.stat(path)
        if not isinstance(entry, dict) or st.st_size != entry.get("size"):
            return False
        if st.st_mtime_ns != entry.get("mtime_ns") and file_sha256(path) != entry.get("sha256"):
            return False
    return True


def _case_files_present(folder: str, case: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, case + s)) for s in CASE_FILE_SUFFIXES)


def read_unlabeled_record(folder: str) -> Optional[dict]:
    """The record of a preprocessed unlabeled folder, or None if it is missing or unreadable (it is derived data: a
    lost record means the cases are redone, never trusted)."""
    path = os.path.join(folder, UNLABELED_METADATA_FILE)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    # records written before per-case sources were kept list the cases only: without sources they count as changed
    # (and are redone by the next preprocessing run)
    if isinstance(record.get("cases"), list):
        record["cases"] = {case: {} for case in record["cases"]}
    elif not isinstance(record.get("cases"), dict):
        record["cases"] = {}
    return record


@dataclass
class UnlabeledFolderStatus:
    """How a preprocessed unlabeled folder compares with ``imagesUnlabeled`` and the plans."""
    folder: str
    has_record: bool
    plans_changed: bool = False
    up_to_date: List[str] = field(default_factory=list)
    not_preprocessed: List[str] = field(default_factory=list)  # in imagesUnlabeled, never (completely) done
    changed: List[str] = field(default_factory=list)  # done, but the scan changed since
    removed: List[str] = field(default_factory=list)  # done, but no longer in imagesUnlabeled

    @property
    def in_sync(self) -> bool:
        return self.has_record and not (self.plans_changed or self.not_preprocessed or self.changed or self.removed)

    def describe_differences(self) -> List[str]:
        out = []
        if not self.has_record:
            out.append(f"{self.folder} has no record of preprocessed cases (never run, or interrupted)")
        if self.plans_changed:
            out.append("the plans changed since it was written")
        for cases, what in ((self.not_preprocessed, "not preprocessed yet"),
                            (self.changed, "changed in imagesUnlabeled since they were preprocessed"),
                            (self.removed, "removed from imagesUnlabeled but still preprocessed")):
            if cases:
                out.append(f"{len(cases)} case(s) {what}: {cases[:5]}{' ...' if len(cases) > 5 else ''}")
        return out


def unlabeled_folder_status(folder: str, raw_cases: Dict[str, List[str]], fingerprint: str,
                            record: Optional[dict] = None) -> UnlabeledFolderStatus:
    record = read_unlabeled_record(folder) if record is None else record
    status = UnlabeledFolderStatus(folder, has_record=record is not None)
    recorded = (record or {}).get("cases", {})
    if record is not None and record.get("plans_fingerprint") != fingerprint:
        status.plans_changed = True
        recorded = {}
    for case, files in sorted(raw_cases.items()):
        if case not in recorded or not _case_files_present(folder, case):
            status.not_preprocessed.append(case)
            continue
        entry = recorded[case] if isinstance(recorded[case], dict) else {}
        if not sources_unchanged(entry.get("sources"), files):
            status.changed.append(case)
        else:
            status.up_to_date.append(case)
    status.removed = sorted(set(recorded) - set(raw_cases))
    return status


def _preprocess_one(args) -> Tuple[str, Dict[str, dict]]:
    """Preprocess one case into a scratch folder and move its files into place; returns (case, its sources)."""
    case, files, out_folder, plans, configuration, dataset_json, dataset_is_2d = args
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    # signature first: a file changed while it is being read is then seen as changed on the next run
    sources = source_signature(files)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessor = cm.preprocessor_class(verbose=False)
    try:
        data, properties = pm.image_reader_writer_class().read_images(files)
    except Exception as e:  # unreadable or inconsistent image: name it
        raise UnlabeledDataError(f"could not read unlabeled case '{case}' ({files}): {type(e).__name__}: {e}. Check "
                                 f"that the files are valid images with the same geometry per channel, or remove "
                                 f"the case.") from e
    # formats whose header SimpleITK could not read were not checked before: nnU-Net marks a 2D image by a first
    # spacing of 999 x the in-plane one (it would become a volume of hundreds of slices after resampling)
    _refuse_wrong_dimensionality(files[0], is_2d_spacing(properties["spacing"]), dataset_is_2d,
                                 f" (read as shape {tuple(data.shape)}, spacing {tuple(properties['spacing'])})")
    try:
        data, seg, properties = preprocessor.run_case_npy(data, None, properties, pm, cm, dataset_json)
    except Exception as e:
        raise UnlabeledDataError(f"could not preprocess unlabeled case '{case}' ({files}): {type(e).__name__}: "
                                 f"{e}. Check that the files are valid images with the same geometry per channel, "
                                 f"or remove the case.") from e
    data = data.astype(np.float32, copy=False)
    # with no label given, nnU-Net's preprocessor returns the nonzero mask (-1 outside) as 'seg'; keep it so the
    # folder has nnU-Net's usual layout, but it is derived from the image alone and the loader never reads it
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_s, chunks_s = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    # blosc2 refuses to overwrite, and a kill mid-write must not leave a half case under the final name: write into
    # a fresh scratch folder, then move each file over the old one (the record, updated by the caller, decides
    # whether a case counts as done)
    scratch = os.path.join(out_folder, f"{INCOMPLETE_PREFIX}{case}")
    shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(scratch)
    nnUNetDatasetBlosc2.save_case(data, seg, properties, os.path.join(scratch, case),
                                  chunks=chunks, blocks=blocks, chunks_seg=chunks_s, blocks_seg=blocks_s)
    for suffix in CASE_FILE_SUFFIXES:
        os.replace(os.path.join(scratch, case + suffix), os.path.join(out_folder, case + suffix))
    os.rmdir(scratch)
    return case, sources


def _remove_case_files(folder: str, case: str) -> None:
    for suffix in CASE_FILE_SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, case + suffix))


def _cases_with_files(folder: str) -> List[str]:
    return sorted(name[:-len(".pkl")] for name in os.listdir(folder) if name.endswith(".pkl"))


def _dataset_paths(dataset_name_or_id, plans_identifier: str):
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

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
    return dataset_name, raw_folder, pre_base, plans_file


def preprocess_unlabeled(dataset_name_or_id, configurations=("3d_fullres",), plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 1, verbose: bool = True) -> Dict[str, str]:
    """Preprocess ``imagesUnlabeled`` with the dataset's existing plans; returns configuration -> output folder.

    The output mirrors ``imagesUnlabeled``: cases already preprocessed from the same files with the same plans are
    kept, changed or new scans are (re)done, removed scans are dropped. It can be killed at any point and run again:
    each case appears atomically and the record is updated after every case. If the plans changed, the (derived)
    unlabeled folder is rebuilt. Labeled data, plans and fingerprint are read, never written.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    def log(message: str) -> None:
        if verbose:
            print(f"[unlabeled] {message}", flush=True)

    dataset_name, raw_folder, pre_base, plans_file = _dataset_paths(dataset_name_or_id, plans_identifier)
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(pre_base, "dataset.json"))

    cases = find_unlabeled_raw_cases(raw_folder, dataset_json)
    labeled = set(get_filenames_of_train_images_and_targets(raw_folder, dataset_json).keys())
    clashes = sorted(set(cases) & labeled)
    if clashes:
        raise UnlabeledDataError(
            f"{os.path.join(raw_folder, UNLABELED_RAW_FOLDER)}: case name(s) {clashes[:5]} also exist in imagesTr. "
            f"Unlabeled cases need their own names (e.g. prefix them with 'u_'), or remove the duplicates.")
    dataset_is_2d = labeled_images_are_2d(pre_base)

    outputs = {}
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise UnlabeledDataError(f"{plans_file} has no configuration '{configuration}'. "
                                     f"Available: {sorted(plans['configurations'])}.")
        cm = PlansManager(plans).get_configuration(configuration)
        out = unlabeled_preprocessed_folder(pre_base, cm.data_identifier)
        fingerprint = plans_fingerprint(plans, configuration)
        meta_file = os.path.join(out, UNLABELED_METADATA_FILE)
        status = unlabeled_folder_status(out, cases, fingerprint) if os.path.isdir(out) else \
            UnlabeledFolderStatus(out, has_record=False, not_preprocessed=sorted(cases))
        # every scan to (re)do is checked before anything is written, so bad input changes nothing
        for case in sorted(status.changed + status.not_preprocessed):
            validate_unlabeled_scan(cases[case], dataset_is_2d)
        if status.plans_changed:
            log(f"{configuration}: plans changed since {out} was written; rebuilding it")
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)

        previous = read_unlabeled_record(out) or {}
        record = {"plans_identifier": plans_identifier, "configuration": configuration,
                  "plans_fingerprint": fingerprint, "raw_folder": os.path.join(raw_folder, UNLABELED_RAW_FOLDER),
                  "cases": {c: previous["cases"][c] for c in status.up_to_date}}
        # the record first, then the files: a kill in between leaves files the record does not claim, and those
        # are redone or removed by the next run
        if record != previous:
            write_json_atomically(record, meta_file)
        if status.removed:
            log(f"{configuration}: {len(status.removed)} case(s) removed from imagesUnlabeled leave the unlabeled "
                f"set: {status.removed}")
        leftovers = [c for c in _cases_with_files(out) if c not in cases]
        for case in sorted(set(status.removed) | set(leftovers)):
            _remove_case_files(out, case)
        for name in os.listdir(out):
            if name.startswith(INCOMPLETE_PREFIX):  # scratch of a run that was killed
                shutil.rmtree(os.path.join(out, name), ignore_errors=True)

        todo = sorted(status.changed + status.not_preprocessed)
        log(f"{dataset_name} {configuration}: {len(cases)} unlabeled case(s), {len(status.up_to_date)} already "
            f"preprocessed, {len(todo)} to do -> {out}")
        if status.changed:
            log(f"{configuration}: preprocessing again {len(status.changed)} case(s) whose scan changed: "
                f"{status.changed}")
        jobs = [(c, cases[c], out, plans, configuration, dataset_json, dataset_is_2d) for c in todo]

        def finished(i: int, case: str, sources: dict) -> None:
            record["cases"][case] = {"sources": sources}
            write_json_atomically(record, meta_file)
            log(f"  {i}/{len(jobs)} {case}")

        if num_processes > 1 and len(jobs) > 1:
            import multiprocessing
            with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                for i, (case, sources) in enumerate(pool.imap_unordered(_preprocess_one, jobs), 1):
                    finished(i, case, sources)
        else:
            for i, job in enumerate(jobs, 1):
                finished(i, *_preprocess_one(job))
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
        if not has_image_array(preprocessed_dataset_folder, case):
            raise UnlabeledDataError(
                f"splits_final.json lists '{case}' as unlabeled but {preprocessed_dataset_folder} has no "
                f"preprocessed image for it. Re-run nnUNetv2_plan_and_preprocess or fix the split.")
        cases[case] = preprocessed_dataset_folder

    folder = unlabeled_preprocessed_folder(preprocessed_dataset_folder_base, data_identifier)
    dataset_name = os.path.basename(os.path.normpath(preprocessed_dataset_folder_base))
    command = f"nnunet-foundation preprocess-unlabeled -d {dataset_name} -c {configuration}"
    raw_cases = _raw_unlabeled_cases_if_available(preprocessed_dataset_folder_base)
    record = read_unlabeled_record(folder) if os.path.isdir(folder) else None
    if record is None:
        if raw_cases:
            print(f"[unlabeled] note: the {len(raw_cases)} scan(s) in imagesUnlabeled are not preprocessed for "
                  f"{configuration} ({folder} has no record), so they are not used. Run '{command}' to use them.",
                  flush=True)
        return cases
    fingerprint = plans_fingerprint(plans, configuration)
    if record.get("plans_fingerprint") != fingerprint:
        raise UnlabeledDataError(
            f"{folder} was preprocessed with different plans than the ones this training uses. Re-run "
            f"'{command}' to rebuild it.")
    if raw_cases is not None:  # training nodes may have no raw data; where it is, the folder must mirror it
        status = unlabeled_folder_status(folder, raw_cases, fingerprint, record)
        if not status.in_sync:
            raise UnlabeledDataError(
                f"{folder} does not match {_raw_unlabeled_folder(dataset_name)}: "
                f"{'; '.join(status.describe_differences())}. Run '{command}' to bring it up to date (it keeps "
                f"the cases that are still valid); training now would use the wrong set of scans.")
    for case in sorted(record["cases"]):
        if not has_image_array(folder, case):
            raise UnlabeledDataError(f"{folder}: the record lists unlabeled case '{case}' but its image array is "
                                     f"missing. Run '{command}' to redo it.")
        if case in cases or case in labeled_keys:
            raise UnlabeledDataError(f"{folder}: unlabeled case '{case}' has the same name as a labeled or "
                                     f"split-unlabeled case. Rename it in imagesUnlabeled and re-run "
                                     f"preprocess-unlabeled.")
        cases[case] = folder
    return cases


def _raw_unlabeled_folder(dataset_name: str) -> Optional[str]:
    from nnunetv2.paths import nnUNet_raw

    return os.path.join(nnUNet_raw.get(), dataset_name, UNLABELED_RAW_FOLDER) if nnUNet_raw.get() else None


def _raw_unlabeled_cases_if_available(preprocessed_dataset_folder_base: str) -> Optional[Dict[str, List[str]]]:
    """The cases of ``imagesUnlabeled`` if this machine has that folder (None where only preprocessed data is)."""
    dataset_name = os.path.basename(os.path.normpath(preprocessed_dataset_folder_base))
    folder = _raw_unlabeled_folder(dataset_name)
    if folder is None or not os.path.isdir(folder):
        return None
    with open(os.path.join(preprocessed_dataset_folder_base, "dataset.json")) as f:
        dataset_json = json.load(f)
    return find_unlabeled_raw_cases(os.path.dirname(folder), dataset_json)


def has_image_array(folder: str, case: str) -> bool:
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
