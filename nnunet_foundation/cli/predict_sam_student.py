"""``nnunet-foundation predict-sam-student``: segment a folder with the SAM a co-training run (SynFoC, SC-SAM)
fine-tuned."""
from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_foundation.foundation.cotrained_sam import predict_sam_student

    folds = [f if f == "all" else int(f) for f in args.f]
    try:
        if not args.model_folder and not args.d:
            raise ValueError("give the dataset (-d, with -c/-tr/-p) or the training output folder (-m)")
        model_folder = args.model_folder or get_output_folder(args.d, args.tr, args.p, args.c)
        device = torch.device(args.device)
        which = "EMA teacher" if args.teacher else "student"
        print(f"SAM {which} of {model_folder}, folds {', '.join(map(str, folds))} ({args.chk})", flush=True)
        count, info = predict_sam_student(
            model_folder, args.i, args.o, folds=folds, checkpoint_name=args.chk, use_teacher=args.teacher,
            sam_checkpoint=args.sam_checkpoint, device=device, use_mirroring=not args.disable_tta,
            tile_step_size=args.step_size, num_processes_preprocessing=args.npp,
            num_processes_segmentation_export=args.nps, save_probabilities=args.save_probabilities)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{count} case(s) segmented by the SAM {which} (trainer {info['trainer_name']}, "
          f"{info['configuration']}) into {args.o}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict-sam-student",
        help="segment a folder with the SAM a SynFoC or SC-SAM run fine-tuned (nnUNetv2_predict runs its nnU-Net)",
        description="Segment every case in -i with the SAM model that nnUNetTrainerSynFoC or nnUNetTrainerSCSAM "
                    "fine-tuned beside nnU-Net (LoRA, decoder and the method's own parts from the run's checkpoint, "
                    "base weights from the SAM checkpoint it was trained from; SynFoC's SAM segments with its "
                    "multi-class head, SC-SAM's is prompted by the run's trained nnU-Net), through nnU-Net's own "
                    "predictor: same preprocessing, sliding window, mirroring and export as nnUNetv2_predict, so the "
                    "two models' predictions can be evaluated side by side (nnunet-foundation evaluate).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", required=True, help="input folder (nnU-Net raw naming: CASE_0000.nii.gz, ...)")
    p.add_argument("-o", required=True, help="output folder for the segmentations")
    p.add_argument("-d", help="dataset name or id (with -c, -tr, -p: finds the training output folder)")
    p.add_argument("-c", default="3d_fullres", help="configuration")
    p.add_argument("-tr", default="nnUNetTrainerSynFoC", help="SynFoC or SC-SAM trainer class name (budget variants too)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-m", "--model-folder", help="the training output folder itself (instead of -d/-c/-tr/-p)")
    p.add_argument("-f", nargs="+", default=["0"], help="folds; several are ensembled like nnUNetv2_predict does")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name in each fold folder")
    p.add_argument("--teacher", action="store_true", help="use the SAM EMA teacher instead of the student (SynFoC)")
    p.add_argument("--sam-checkpoint", help="base SAM/MedSAM weights, if the file recorded at training has moved")
    p.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    p.add_argument("--save-probabilities", action="store_true", help="also write softmax probabilities (.npz)")
    p.add_argument("-npp", type=int, default=3, help="preprocessing processes")
    p.add_argument("-nps", type=int, default=3,
                   help="segmentation export processes (-npp 0 -nps 0: no worker processes, as nnUNetv2_predict)")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="device to predict on")
    p.set_defaults(func=run)
