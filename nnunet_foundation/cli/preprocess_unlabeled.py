"""``nnunet-foundation preprocess-unlabeled``: preprocess imagesUnlabeled with the dataset's existing plans."""
from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    from nnunet_foundation.unlabeled import UnlabeledDataError, preprocess_unlabeled

    try:
        outputs = preprocess_unlabeled(args.d, args.c, args.p, args.np, verbose=not args.quiet)
    except UnlabeledDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for configuration, folder in outputs.items():
        print(f"{configuration}: {folder}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "preprocess-unlabeled", help="preprocess unlabeled scans (imagesUnlabeled) with the existing plans",
        description="Preprocess the unlabeled scans in $nnUNet_raw/DatasetXXX/imagesUnlabeled (named like "
                    "imagesTr: CASE_0000.nii.gz, ...) with the plans and preprocessor that "
                    "nnUNetv2_plan_and_preprocess created (same transpose, cropping, normalisation, spacing). "
                    "Output: $nnUNet_preprocessed/DatasetXXX/<data_identifier>_unlabeled/. Labeled data, plans and "
                    "fingerprint are not touched; cases done before with the same plans are skipped.",
        epilog="example:\n  nnUNetv2_plan_and_preprocess -d 4\n"
               "  nnunet-foundation preprocess-unlabeled -d 4 -c 3d_fullres 2d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name (e.g. 4 or Dataset004_Hippocampus)")
    p.add_argument("-c", nargs="+", default=["3d_fullres"], help="configurations (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-np", type=int, default=1, help="worker processes (default: 1)")
    p.add_argument("--quiet", action="store_true", help="no per-case progress")
    p.set_defaults(func=run)
