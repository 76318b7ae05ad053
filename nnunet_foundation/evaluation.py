"""Segmentation metrics per case and class: Dice, HD95 and normalised surface distance (NSD), in millimetres.

Files are read with nnU-Net's own image readers (chosen from ``dataset.json`` like ``nnUNetv2_evaluate_folder``), so
every format nnU-Net trains on can be scored, and the spacing comes from the image headers in the array's axis
order. Labels and regions come from ``dataset.json`` through nnU-Net's ``LabelManager``; voxels of the ignore label
(if the dataset has one) are excluded from all metrics.

Definitions (``ref``: reference mask, ``pred``: predicted mask, both binary, per class or region):

- **Dice** = 2 |ref ∩ pred| / (|ref| + |pred|).
- **Surface**: the mask voxels with at least one face neighbour outside the mask (``mask & ~erosion(mask)`` with a
  face-connected structuring element; voxels on the image border count as surface). Axes of length 1 (2D images
  stored as 3D) are dropped first, otherwise every voxel of a single slice would be "surface".
- **Distances** from each surface voxel of one mask to the nearest surface voxel of the other, in mm, with the
  Euclidean distance transform of ``scipy.ndimage`` sampled at the image spacing (anisotropy is respected).
- **HD95** = max(95th percentile of distances pred→ref, 95th percentile of distances ref→pred): the symmetric,
  robust Hausdorff distance of MONAI (``compute_hausdorff_distance(percentile=95)``) and DeepMind's
  ``surface-distance`` package.
- **NSD** at tolerance τ (mm) = (#pred surface voxels within τ of ref's surface + #ref surface voxels within τ of
  pred's surface) / (#pred surface voxels + #ref surface voxels) — Nikolov et al.'s surface Dice, counting surface
  voxels (like MONAI's ``compute_surface_dice`` without sub-voxels) rather than weighting surface elements by area.

Empty masks, chosen so that averages over cases stay meaningful and no case silently drops out:

=================  ======  ==============================  =====
case               Dice    HD95                            NSD
=================  ======  ==============================  =====
both empty         1       0                               1
one of them empty  0       the image diagonal (mm)         0
=================  ======  ==============================  =====

The image diagonal is the largest distance possible inside the image, so a missed (or hallucinated) structure counts
as the worst possible boundary error instead of a NaN that ``nanmean`` would skip — skipping would reward a model
for predicting nothing on hard cases. nnU-Net's own summary.json reports Dice NaN for "both empty"; here it is 1.

Aggregates: mean ± sample standard deviation (ddof=1; NaN with a single value, null in JSON files) over cases, and over seeds of the
per-seed means. ``gap_closed`` = (ssl − lower) / (upper − lower): 0 is the labeled-only baseline, 1 the fully
supervised model.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from nnunet_foundation.atomic_files import write_json_atomically

METRICS = ("Dice", "HD95", "NSD")
#: default NSD tolerance in mm (a per-class dict can override it)
DEFAULT_TOLERANCE_MM = 1.0
#: relative difference of spacings still taken as the same (headers store rounded floats)
SPACING_RTOL = 1e-3
#: metrics where larger is better (used for "gap closed" and plots)
HIGHER_IS_BETTER = {"Dice": True, "HD95": False, "NSD": True}

LabelOrRegion = Union[int, Tuple[int, ...]]
Tolerance = Union[float, Mapping[str, float]]


class EvaluationError(ValueError):
    """Bad evaluation input; the message names the folder or file and the fix."""


# --------------------------------------------------------------------------------------------- masks -> numbers
def _squeeze_singleton_axes(array: np.ndarray, spacing: Sequence[float]) -> Tuple[np.ndarray, Tuple[float, ...]]:
    keep = [i for i, s in enumerate(array.shape) if s > 1]
    if not keep:  # a single voxel: keep one axis so that the shape stays meaningful
        keep = [0]
    return array.reshape([array.shape[i] for i in keep]), tuple(float(spacing[i]) for i in keep)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface of a boolean mask: voxels of the mask with a face neighbour outside it (or on the border)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _bounding_box(mask: np.ndarray, margin: int = 1) -> Tuple[slice, ...]:
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - margin, 0), min(int(c.max()) + margin + 1, n))
                 for c, n in zip(coords, mask.shape))


#: File endings nnU-Net reads as natural images (NaturalImage2DIO): no spacing in the file, so nnU-Net gives each
#: pixel spacing 1 and every distance (HD95, NSD tolerance) is in pixels, not mm.
PIXEL_SPACING_ENDINGS = (".png", ".bmp", ".jpg", ".jpeg")


def distance_unit(dataset_json: dict) -> str:
    """'px' for datasets of natural images (distances in pixels), else 'mm' (spacing from the image headers)."""
    return "px" if str(dataset_json.get("file_ending", "")).lower() in PIXEL_SPACING_ENDINGS else "mm"


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=float) * np.asarray(spacing, dtype=float)) ** 2)))


def dice_coefficient(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks; both empty counts 1 (the convention of :func:`binary_metrics`)."""
    total = int(prediction.sum()) + int(reference.sum())
    return 1.0 if total == 0 else 2.0 * int((prediction & reference).sum()) / total


def binary_metrics(reference: np.ndarray, prediction: np.ndarray, spacing: Sequence[float],
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, valid: Optional[np.ndarray] = None) -> Dict[str, float]:
    """Dice, HD95 (mm) and NSD (tolerance in mm) of two binary masks of the same shape, plus voxel counts.

    ``valid``: optional boolean mask of voxels to score (the complement of the ignore label); outside it both masks
    are treated as background.
    """
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise EvaluationError(f"reference shape {reference.shape} and prediction shape {prediction.shape} differ")
    if len(spacing) != reference.ndim:
        raise EvaluationError(f"spacing {tuple(spacing)} does not match the {reference.ndim}-D masks")
    if tolerance_mm < 0:
        raise EvaluationError(f"the NSD tolerance must be >= 0 mm, got {tolerance_mm}")
    if valid is not None:
        reference = reference & valid
        prediction = prediction & valid
    reference, squeezed_spacing = _squeeze_singleton_axes(reference, spacing)
    prediction, _ = _squeeze_singleton_axes(prediction, spacing)

    n_ref, n_pred = int(reference.sum()), int(prediction.sum())
    out = {"n_ref": n_ref, "n_pred": n_pred}
    if n_ref == 0 and n_pred == 0:
        out.update(Dice=1.0, HD95=0.0, NSD=1.0)
        return out
    intersection = int(np.logical_and(reference, prediction).sum())
    out["Dice"] = 2.0 * intersection / (n_ref + n_pred)
    if n_ref == 0 or n_pred == 0:
        out.update(HD95=image_diagonal_mm(reference.shape, squeezed_spacing), NSD=0.0)
        return out

    # Surfaces and distances only depend on the region around both masks: crop to it (1 voxel margin so that the
    # crop border never creates surface the full image would not have) to keep large CT volumes cheap.
    box = _bounding_box(reference | prediction)
    ref_surface, pred_surface = surface(reference[box]), surface(prediction[box])
    distance_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=squeezed_spacing)
    distance_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=squeezed_spacing)
    pred_to_ref = distance_to_ref[pred_surface]
    ref_to_pred = distance_to_pred[ref_surface]
    out["HD95"] = float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95)))
    within = int((pred_to_ref <= tolerance_mm).sum()) + int((ref_to_pred <= tolerance_mm).sum())
    out["NSD"] = within / float(pred_to_ref.size + ref_to_pred.size)
    return out


# ------------------------------------------------------------------------------------------------ aggregation
def mean_std(values: Iterable[float]) -> Dict[str, float]:
    """{'mean', 'std', 'n'}: NaN-free mean and sample std (ddof=1; NaN for fewer than two values)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else math.nan, "n": int(v.size)}


def gap_closed(ssl: float, lower: float, upper: float, eps: float = 1e-8) -> float:
    """(ssl − lower) / (upper − lower): the fraction of the labeled-only → fully supervised gap a method closes.

    Works for lower-is-better metrics too (numerator and denominator change sign together). NaN when the bounds
    coincide (within ``eps``): there is no gap to close, and any ratio would be noise.
    """
    if any(x is None or math.isnan(x) for x in (ssl, lower, upper)) or abs(upper - lower) < eps:
        return math.nan
    return (ssl - lower) / (upper - lower)


# ------------------------------------------------------------------------------------------------ files
def _label_manager(dataset_json: dict):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))


def classes_of(dataset_json: dict) -> Dict[str, str]:
    """Key used in results (``'1'`` or ``'(1, 2)'``) -> class name from dataset.json, foreground only."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    lm = _label_manager(dataset_json)
    names = {}
    for name, value in dataset_json["labels"].items():
        if name == "ignore":
            continue
        value = tuple(value) if isinstance(value, (list, tuple)) and len(value) > 1 else \
            (value[0] if isinstance(value, (list, tuple)) else value)
        names[label_or_region_to_key(value)] = name
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    return {label_or_region_to_key(k): names.get(label_or_region_to_key(k), str(k)) for k in keys}


def declared_label_values(dataset_json: dict) -> set:
    """Every voxel value dataset.json allows in a segmentation: background, the labels (or the values regions are
    built from) and the ignore label."""
    values = set()
    for value in dataset_json["labels"].values():
        values.update(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
    return values


def _normalise_tolerance(tolerance: Tolerance, class_keys: Sequence[str]) -> Dict[str, float]:
    if isinstance(tolerance, Mapping):
        unknown = sorted(set(tolerance) - set(class_keys) - {"default"})
        if unknown:
            raise EvaluationError(f"NSD tolerance given for unknown class(es) {unknown}; classes are {list(class_keys)}")
        default = float(tolerance.get("default", DEFAULT_TOLERANCE_MM))
        return {k: float(tolerance.get(k, default)) for k in class_keys}
    return {k: float(tolerance) for k in class_keys}


def evaluate_case(reference_file: str, prediction_file: str, dataset_json: dict,
                  tolerance: Tolerance = DEFAULT_TOLERANCE_MM, reader_class=None) -> dict:
    """Metrics of one case for every foreground class/region of ``dataset_json``."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key, region_or_label_to_mask
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    lm = _label_manager(dataset_json)
    reader = (reader_class or determine_reader_writer_from_dataset_json(dataset_json, reference_file,
                                                                         verbose=False))()
    ref, ref_props = reader.read_seg(reference_file)
    pred, pred_props = reader.read_seg(prediction_file)
    ref, pred = ref[0], pred[0]  # drop the channel axis nnU-Net's readers add
    if ref.shape != pred.shape:
        raise EvaluationError(f"{prediction_file} has shape {pred.shape} but its reference {reference_file} has "
                              f"{ref.shape}: predictions must be in the geometry of the reference images.")
    spacing = [float(s) for s in ref_props["spacing"]]
    # same shape with another spacing is another geometry: distances in mm would be computed in the wrong one
    if not np.allclose(pred_props["spacing"], spacing, rtol=SPACING_RTOL, atol=0):
        raise EvaluationError(f"{prediction_file} has spacing {tuple(float(s) for s in pred_props['spacing'])} but "
                              f"its reference {reference_file} has {tuple(spacing)}: predictions must be in the "
                              f"geometry of the reference images (predict from the same images, or resample).")
    declared = declared_label_values(dataset_json)
    for array, path in ((ref, reference_file), (pred, prediction_file)):
        # nnU-Net's readers return floats: 7.0 is label 7
        found = {int(v) if float(v).is_integer() else float(v) for v in np.unique(array).tolist()}
        undeclared = sorted(found - declared)
        if undeclared:
            raise EvaluationError(f"{path} contains label value(s) {undeclared[:10]} that dataset.json does not "
                                  f"declare (labels: {dataset_json['labels']}). Check that the folder and "
                                  f"dataset.json belong to the same dataset, or declare the labels.")
    valid = (ref != lm.ignore_label) if lm.has_ignore_label else None
    keys = lm.foreground_regions if lm.has_regions else lm.foreground_labels
    tolerances = _normalise_tolerance(tolerance, [label_or_region_to_key(k) for k in keys])
    metrics = {}
    for k in keys:
        key = label_or_region_to_key(k)
        metrics[key] = binary_metrics(region_or_label_to_mask(ref, k), region_or_label_to_mask(pred, k), spacing,
                                      tolerances[key], valid)
    return {"reference_file": reference_file, "prediction_file": prediction_file, "spacing": spacing,
            "metrics": metrics}


def _case_foreground_mean(case: dict) -> Dict[str, float]:
    return {m: float(np.mean([v[m] for v in case["metrics"].values()])) for m in METRICS}


def summarise(per_case: List[dict], classes: Mapping[str, str]) -> dict:
    """Per-class and foreground-mean aggregates (mean ± std over cases) of ``evaluate_case`` results."""
    per_class = {k: {m: mean_std(c["metrics"][k][m] for c in per_case) for m in METRICS} for k in classes}
    foreground = {m: mean_std(c["foreground_mean"][m] for c in per_case) for m in METRICS}
    return {"per_class": per_class, "foreground_mean": foreground}


def evaluate_folder(reference_folder: str, prediction_folder: str, dataset_json: Union[dict, str],
                    tolerance: Tolerance = DEFAULT_TOLERANCE_MM, num_processes: int = 1,
                    output_file: Optional[str] = None) -> dict:
    """Score every reference case of ``reference_folder`` against the file of the same name in ``prediction_folder``.

    A reference case without a prediction is an error (a benchmark must not average over the cases that happened
    to be predicted). Returns (and writes to ``output_file`` as JSON) ``{'per_case': [...], 'per_class': ...,
    'foreground_mean': ..., 'classes': ..., 'tolerance_mm': ...}``; each per-case entry has ``case``, ``metrics``
    (class key -> Dice/HD95/NSD/n_ref/n_pred) and ``foreground_mean`` (the case's mean over classes).
    """
    if isinstance(dataset_json, str):
        with open(dataset_json) as f:
            dataset_json = json.load(f)
    file_ending = dataset_json["file_ending"]
    for folder, what in ((reference_folder, "reference"), (prediction_folder, "prediction")):
        if not os.path.isdir(folder):
            raise EvaluationError(f"{what} folder {folder} does not exist")
    references = sorted(f for f in os.listdir(reference_folder) if f.endswith(file_ending))
    if not references:
        raise EvaluationError(f"no '*{file_ending}' files in the reference folder {reference_folder} (file_ending "
                              f"comes from dataset.json)")
    missing = [f for f in references if not os.path.isfile(os.path.join(prediction_folder, f))]
    if missing:
        raise EvaluationError(f"{len(missing)} of {len(references)} reference cases have no prediction in "
                              f"{prediction_folder} (e.g. {missing[:3]}); predict all of them first.")
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    reader_class = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(reference_folder,
                                                                                         references[0]), verbose=False)
    classes = classes_of(dataset_json)
    jobs = [(os.path.join(reference_folder, f), os.path.join(prediction_folder, f), dataset_json, tolerance,
             reader_class) for f in references]
    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            per_case = pool.starmap(evaluate_case, jobs)
    else:
        per_case = [evaluate_case(*job) for job in jobs]
    for f, case in zip(references, per_case):
        case["case"] = f[:-len(file_ending)]
        case["foreground_mean"] = _case_foreground_mean(case)
    result = {"reference_folder": os.path.abspath(reference_folder),
              "prediction_folder": os.path.abspath(prediction_folder),
              "classes": classes,
              "tolerance_mm": _normalise_tolerance(tolerance, list(classes)),
              # the key keeps its name for old results; the unit says what the distances are in
              "distance_unit": distance_unit(dataset_json),
              "conventions": "both masks empty: Dice 1, HD95 0, NSD 1; one empty: Dice 0, HD95 = image diagonal, "
                             "NSD 0",
              "per_case": per_case, **summarise(per_case, classes)}
    if output_file:
        write_json(result, output_file)
    return result


def write_json(data, path: str) -> None:
    """Write standard JSON atomically: NaN becomes null (JSON has no NaN), and a crash never leaves a half-written
    file that would look finished."""
    write_json_atomically(_nan_to_none(data), path, default=_json_default, allow_nan=False)


def _nan_to_none(o):
    if isinstance(o, dict):
        return {k: _nan_to_none(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_nan_to_none(v) for v in o]
    if isinstance(o, (float, np.floating)):
        return None if math.isnan(o) or math.isinf(o) else float(o)
    if isinstance(o, np.integer):
        return int(o)
    return o


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o)} is not JSON serialisable")


def parse_tolerance(values: Optional[Sequence[str]]) -> Tolerance:
    """CLI helper: ``['1.5']`` -> 1.5; ``['1=1', '2=2.5']`` -> per class; ``['2', '1=1']`` -> default 2, class 1 1."""
    if not values:
        return DEFAULT_TOLERANCE_MM
    per_class: Dict[str, float] = {}
    for v in values:
        key, sep, number = v.partition("=")
        try:
            if sep:
                per_class[key.strip()] = float(number)
            else:
                per_class["default"] = float(key)
        except ValueError:
            raise EvaluationError(f"bad NSD tolerance {v!r}: use a number of mm (1.0) or CLASS=MM (1=1.0)") from None
    if list(per_class) == ["default"]:
        return per_class["default"]
    return per_class
