"""Slice-level ("image-level") labels of an nnU-Net raw dataset: the side file ``imageLabelsTr.json``.

Format (beside ``dataset.json``)::

    {
      "axis": 0,
      "cases": {
        "case_000": [[], [1], [1, 2], [2], []],
        "case_001": [[1]]
      }
    }

``axis`` is the axis of the image array *as nnU-Net's reader returns it* (``(z, y, x)`` without the channel axis;
0 = the z / slice axis of NIfTI volumes) along which the case is cut into 2D images. Each case lists, for every slice
along that axis in order, the foreground label values present in it (values from ``dataset.json``'s ``labels``).
2D datasets (PNG, or NIfTI with one slice) have exactly one entry per case and need ``"axis": 0``. The cases must
have their images in ``imagesTr``; they need no file in ``labelsTr`` (cases that do have one keep their own labels
and are never pseudo-labelled).

``derive_weak_labels`` writes the file from ``labelsTr`` (for benchmarking what slice-level labels alone buy); it is
the only code of this method that opens label files of weak cases, and it says so.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

SIDE_FILE = "imageLabelsTr.json"


class WeakLabelError(ValueError):
    """The side file or the dataset it describes is unusable; the message names the file and the fix."""


def foreground_labels(dataset_json: dict) -> List[int]:
    """The dataset's foreground label values (region-based datasets are refused: slice labels are per class)."""
    labels = dataset_json.get("labels", {})
    if any(not isinstance(v, int) for v in labels.values()):
        raise WeakLabelError("dataset.json defines regions (label lists); slice-level labels need one integer per "
                             "class")
    values = sorted(v for k, v in labels.items() if v != 0 and k != "ignore")
    if not values:
        raise WeakLabelError("dataset.json has no foreground label")
    if values != list(range(1, len(values) + 1)):
        raise WeakLabelError(f"dataset.json's foreground labels must be 1..K, got {values}")
    return values


def load_weak_labels(raw_folder: str, side_file: Optional[str] = None) -> dict:
    """Read and check the side file; returns ``{"axis": int, "cases": {case: [[labels], ...]}}``."""
    path = side_file or os.path.join(raw_folder, SIDE_FILE)
    if not os.path.isfile(path):
        raise WeakLabelError(f"{path} does not exist: write the slice-level labels there (format: "
                             f"nnunet_foundation/methods/weakmedsam/weak_labels.py, README 'WeakMedSAM'), or derive "
                             f"them from labelsTr with: nnunet-foundation weak-labels derive -d <dataset>")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WeakLabelError(f"{path}: not valid JSON ({e})") from None
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        valid = set(foreground_labels(json.load(f)))
    if not isinstance(data, dict) or set(data) - {"axis", "cases", "derived_from"} or "cases" not in data:
        raise WeakLabelError(f"{path}: expected an object with 'axis' (0, 1 or 2) and 'cases' "
                             f"({{case: [[labels of slice 0], ...]}})")
    axis = data.get("axis", 0)
    if axis not in (0, 1, 2):
        raise WeakLabelError(f"{path}: 'axis' must be 0, 1 or 2 (an axis of nnU-Net's (z, y, x) array), got {axis!r}")
    cases = data["cases"]
    if not isinstance(cases, dict) or not cases:
        raise WeakLabelError(f"{path}: 'cases' must be a non-empty object of case id -> per-slice label lists")
    for case, slices in cases.items():
        if not isinstance(slices, list) or not slices or not all(isinstance(s, list) for s in slices):
            raise WeakLabelError(f"{path}: case {case!r} must map to a list with one list of labels per slice")
        for i, s in enumerate(slices):
            bad = [v for v in s if v not in valid]
            if bad:
                raise WeakLabelError(f"{path}: case {case!r} slice {i} lists {bad}, not foreground labels of "
                                     f"dataset.json ({sorted(valid)})")
    return {"axis": int(axis), "cases": {c: [sorted(set(int(v) for v in s)) for s in sl] for c, sl in cases.items()}}


def case_files(raw_folder: str, case: str, file_ending: str, num_channels: int) -> List[str]:
    return [os.path.join(raw_folder, "imagesTr", f"{case}_{c:04d}{file_ending}") for c in range(num_channels)]


def reader_writer(dataset_json: dict, example_file: str):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    return determine_reader_writer_from_dataset_json(dataset_json, example_file)()


def derive_weak_labels(raw_folder: str, axis: int = 0, cases: Optional[Sequence[str]] = None,
                       output: Optional[str] = None) -> str:
    """Benchmarking only: write ``imageLabelsTr.json`` from the masks in ``labelsTr`` (the classes present in each
    slice along ``axis``). Returns the path written. The masks themselves are left where they are: remove them (or
    use a copy of the dataset) to train from the slice labels alone."""
    with open(os.path.join(raw_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    foreground_labels(dataset_json)
    ending = dataset_json["file_ending"]
    folder = os.path.join(raw_folder, "labelsTr")
    available = sorted(f[:-len(ending)] for f in os.listdir(folder) if f.endswith(ending)) \
        if os.path.isdir(folder) else []
    cases = list(cases) if cases is not None else available
    if not cases:
        raise WeakLabelError(f"{folder} has no label files ending in {ending} to derive slice labels from")
    missing = sorted(set(cases) - set(available))
    if missing:
        raise WeakLabelError(f"no label file in {folder} for case(s) {missing[:5]}")
    io = reader_writer(dataset_json, os.path.join(folder, cases[0] + ending))
    out: Dict[str, List[List[int]]] = {}
    for case in cases:
        seg, _ = io.read_seg(os.path.join(folder, case + ending))
        seg = np.asarray(seg[0])
        if not 0 <= axis < seg.ndim:
            raise WeakLabelError(f"axis {axis} does not exist in {case}'s {seg.ndim}D array")
        moved = np.moveaxis(seg, axis, 0)
        out[case] = [sorted(int(v) for v in np.unique(s) if v != 0) for s in moved]
    from nnunet_foundation.atomic_files import write_json_atomically

    path = output or os.path.join(raw_folder, SIDE_FILE)
    write_json_atomically({"axis": axis, "derived_from": "labelsTr (nnunet-foundation weak-labels derive)",
                           "cases": out}, path)
    return path
