"""``nnunet-foundation demo``: labeled-only nnU-Net vs semi-supervised nnU-Net vs SemiSAM guided by LiteMedSAM on a
generated dataset, start to finish."""
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
                            test=args.test, budget=args.budget, dimension=args.dimension,
                            ssl_trainer=args.ssl_trainer, semisam=not args.no_semisam, seed=args.seed)
    try:
        run_demo(args.workdir, settings, device)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="generate a small dataset and compare labeled-only nnU-Net, Mean Teacher and SemiSAM (LiteMedSAM)",
        description="With no data of yours: generate a small 2D dataset whose few labeled images do not show how the "
                    "unlabeled and test images look (contrast, noise, size, position, background and faint object "
                    "cores vary), run nnUNetv2_plan_and_preprocess, preprocess the unlabeled images, then train with "
                    "the same labeled images and budget: nnUNetTrainer (labeled images only), a semi-supervised "
                    "trainer, and SemiSAM with pseudo-labels of the real LiteMedSAM prompted by the boxes of the "
                    "labeled-only model's objects (nnunet-foundation pseudo-label, once per unlabeled image). "
                    "Predicts the test images with nnUNetv2_predict and prints their Dice with training and "
                    "generalist times; writes demo_results.png (Dice) and demo_examples.png (test images and "
                    "predictions). Everything lives in --workdir (its own nnUNet_raw/_preprocessed/_results); your "
                    "nnU-Net folders are not touched. Run it again to resume; finished steps are skipped. About 10 "
                    "minutes on a 2-core CPU.",
        epilog="example:\n  nnunet-foundation demo\n"
               "  nnunet-foundation demo --workdir /tmp/demo --labeled 4 --ssl-trainer nnUNetTrainerCPS\n"
               "  nnunet-foundation demo --dimension 3d --no-semisam   # the 3D variant, without the generalist",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="nnunet_foundation_demo",
                   help="folder for all demo files (default: ./nnunet_foundation_demo)")
    p.add_argument("--labeled", type=int, default=2, help="labeled training cases (default: 2)")
    p.add_argument("--validation", type=int, default=2, help="labeled validation cases (default: 2)")
    p.add_argument("--unlabeled", type=int, default=16, help="unlabeled training images (default: 16)")
    p.add_argument("--test", type=int, default=24, help="held-out test images (default: 24)")
    p.add_argument("--budget", default="demo",
                   help="training budget name, a trainer-class suffix (default: demo = 15 epochs x 10 iterations, "
                        "batch 2); see the README for the list")
    p.add_argument("--ssl-trainer", default="nnUNetTrainerMeanTeacher",
                   help="semi-supervised trainer to compare (default: nnUNetTrainerMeanTeacher)")
    p.add_argument("--dimension", choices=["2d", "3d"], default="2d",
                   help="2d (default): the generated 2D images, nnU-Net's 2d configuration; 3d: generated 3D volumes "
                        "(two ellipsoids), 3d_fullres")
    p.add_argument("--no-semisam", action="store_true",
                   help="leave out SemiSAM and its LiteMedSAM pseudo-labelling (no generalist needed)")
    p.add_argument("--device", choices=["cpu", "cuda", "mps"], default=None,
                   help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated dataset (default: 0)")
    p.set_defaults(func=run)
