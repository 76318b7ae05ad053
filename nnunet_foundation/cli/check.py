"""``nnunet-foundation check``: verify a dataset's unlabeled data, splits, preprocessed folders and settings."""
from __future__ import annotations

import argparse


def run(args) -> int:
    from nnunet_foundation.check import NOTE, PROBLEM, check_dataset

    findings = check_dataset(args.d, args.c, args.p, args.tr)
    for finding in findings:
        print(finding)
    problems = sum(f.level == PROBLEM for f in findings)
    notes = sum(f.level == NOTE for f in findings)
    print(f"{problems} problem(s), {notes} note(s)" + ("" if problems else ": ready to train"))
    return 1 if problems else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "check", help="verify a dataset's unlabeled data, splits, preprocessed folders and settings",
        description="Before a long run: check that the plans and preprocessed folders exist, that every scan in "
                    "imagesUnlabeled is complete and of the dataset's dimensionality, that the preprocessed "
                    "unlabeled folders match imagesUnlabeled (no scan missing, changed or removed), that "
                    "splits_final.json is consistent (no case twice, none both labeled and unlabeled, all "
                    "preprocessed) and, with -tr, that the trainer's settings resolve and its existing runs' "
                    "checkpoints are readable. Only reads; exit code 1 if a problem was found.",
        epilog="example:\n  nnunet-foundation check -d 4 -c 3d_fullres -tr nnUNetTrainerMeanTeacher",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name (e.g. 4 or Dataset004_Hippocampus)")
    p.add_argument("-c", nargs="+", help="configurations (default: every preprocessed one)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("-tr", help="trainer whose settings and existing runs to check")
    p.set_defaults(func=run)
