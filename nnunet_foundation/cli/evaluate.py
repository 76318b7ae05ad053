"""``nnunet-foundation evaluate``: Dice, HD95 and NSD per case and class for a folder of predictions."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _find_dataset_json(dataset: str) -> str:
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_foundation.evaluation import EvaluationError

    try:
        name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:
        raise EvaluationError(f"dataset {dataset!r} not found ({e}); or pass --dataset-json FILE") from None
    for root in (nnUNet_raw.get(), nnUNet_preprocessed.get()):
        if root and os.path.isfile(os.path.join(root, name, "dataset.json")):
            return os.path.join(root, name, "dataset.json")
    raise EvaluationError(f"no dataset.json for {name} in nnUNet_raw or nnUNet_preprocessed; pass --dataset-json FILE")


def _fmt(stats: dict) -> str:
    if math.isnan(stats["mean"]):
        return "n/a"
    return f"{stats['mean']:.3f}" + ("" if math.isnan(stats["std"]) else f" ± {stats['std']:.3f}")


def run(args) -> int:
    from nnunet_foundation.evaluation import EvaluationError, METRICS, evaluate_folder, parse_tolerance

    try:
        dataset_json = args.dataset_json or (_find_dataset_json(args.d) if args.d else None)
        if dataset_json is None:
            raise EvaluationError("give the dataset (-d ID) or its dataset.json (--dataset-json FILE): labels and "
                                  "the file ending come from there")
        output = args.o or os.path.join(args.pred, "summary_surface.json")
        result = evaluate_folder(args.ref, args.pred, dataset_json, tolerance=parse_tolerance(args.tolerance),
                                 num_processes=args.np, output_file=output)
    except (EvaluationError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unit = result["distance_unit"]
    tolerances = ", ".join(f"{result['classes'][k]} {v:g} {unit}" for k, v in result["tolerance_mm"].items())
    print(f"{len(result['per_case'])} cases; mean ± std over cases (HD95 in {unit}, NSD at {tolerances})")
    print("| class | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for key, name in result["classes"].items():
        print(f"| {name} ({key}) | " + " | ".join(_fmt(result["per_class"][key][m]) for m in METRICS) + " |")
    print("| foreground mean | " + " | ".join(_fmt(result["foreground_mean"][m]) for m in METRICS) + " |")
    print(f"per-case numbers: {output}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice, HD95 and NSD per case and class (spacing from the image headers)",
        description="Score every reference segmentation in REF against the file of the same name in PRED: Dice, "
                    "95th-percentile symmetric Hausdorff distance (mm) and normalised surface distance (NSD) at a "
                    "tolerance in mm, per case and class, with the spacing read from the images by nnU-Net's reader "
                    "(PNG/JPEG/BMP images have none: nnU-Net gives them spacing 1, so both are in pixels). "
                    "Empty masks: both empty -> Dice 1, HD95 0, NSD 1; one empty -> Dice 0, HD95 = image "
                    "diagonal, NSD 0. A reference case without a prediction is an error.",
        epilog="examples:\n"
               "  nnunet-foundation evaluate -ref labelsTs -pred predictions -d 4\n"
               "  nnunet-foundation evaluate -ref labelsTs -pred predictions --dataset-json dataset.json "
               "--tolerance 1=1.0 2=2.0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-ref", required=True, help="folder with reference segmentations")
    p.add_argument("-pred", required=True, help="folder with predicted segmentations (same file names)")
    p.add_argument("-d", help="dataset id or name (its dataset.json gives labels and file ending)")
    p.add_argument("--dataset-json", help="dataset.json to use instead of -d")
    p.add_argument("--tolerance", nargs="+", metavar="MM|CLASS=MM",
                   help="NSD tolerance in mm: one number for all classes and/or CLASS=MM per class, CLASS being the "
                        "label value (default: 1.0)")
    p.add_argument("-o", help="output JSON (default: PRED/summary_surface.json)")
    p.add_argument("-np", type=int, default=1, help="worker processes (default: 1)")
    p.set_defaults(func=run)
