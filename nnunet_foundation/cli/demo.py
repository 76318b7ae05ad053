"""``nnunet-foundation demo``: labeled-only nnU-Net vs Mean Teacher on a generated dataset, start to finish."""
from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    from nnunet_foundation.demo import DemoError, DemoSettings, run_demo

    device = args.device
    if device is None:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = DemoSettings(labeled=args.labeled, validation=args.validation, unlabeled=args.unlabeled,
                            test=args.test, budget=args.budget, configuration=args.c, ssl_trainer=args.ssl_trainer,
                            seed=args.seed)
    try:
        run_demo(args.workdir, settings, device)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="generate a small dataset and compare labeled-only nnU-Net with Mean Teacher",
        description="With no data of yours: generate a small synthetic 3D dataset (labeled, unlabeled and test "
                    "scans), run nnUNetv2_plan_and_preprocess, preprocess the unlabeled scans, train "
                    "nnUNetTrainer (labeled cases only) and a semi-supervised trainer with the same budget, predict "
                    "the test cases with nnUNetv2_predict and print their Dice. Everything lives in --workdir (its "
                    "own nnUNet_raw/_preprocessed/_results); your nnU-Net folders are not touched. Run it again "
                    "to resume; finished steps are skipped. About 5-10 minutes on a 2-core CPU with the default "
                    "budget.",
        epilog="example:\n  nnunet-foundation demo\n"
               "  nnunet-foundation demo --workdir /tmp/demo --labeled 4 --ssl-trainer nnUNetTrainerCPS",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="nnunet_foundation_demo",
                   help="folder for all demo files (default: ./nnunet_foundation_demo)")
    p.add_argument("--labeled", type=int, default=2, help="labeled training cases (default: 2)")
    p.add_argument("--validation", type=int, default=2, help="labeled validation cases (default: 2)")
    p.add_argument("--unlabeled", type=int, default=16, help="unlabeled training scans (default: 16)")
    p.add_argument("--test", type=int, default=6, help="held-out test cases (default: 6)")
    p.add_argument("--budget", default="demo",
                   help="training budget name, a trainer-class suffix (default: demo = 15 epochs x 10 iterations, "
                        "batch 2); see the README for the list")
    p.add_argument("--ssl-trainer", default="nnUNetTrainerMeanTeacher",
                   help="semi-supervised trainer to compare (default: nnUNetTrainerMeanTeacher)")
    p.add_argument("-c", default="3d_fullres", help="nnU-Net configuration (default: 3d_fullres)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset (default: 0)")
    p.set_defaults(func=run)
