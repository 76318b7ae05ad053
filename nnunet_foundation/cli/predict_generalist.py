"""``nnunet-foundation predict-generalist``: segment a folder with the generalist alone, prompted by a trained nnU-Net
(nnunet_foundation/generalist_prediction.py)."""
from __future__ import annotations

import argparse
import sys

from nnunet_foundation.cli.arguments import add_dataset_and_generalist_arguments, add_prompting_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict-generalist", help="segment a folder with the generalist, prompted by a trained nnU-Net model",
        description="For every case in -i: nnU-Net's preprocessing and sliding-window prediction with the trained "
                    "model (-tr/-f), prompts from that prediction (the generalist configuration's prompt settings; "
                    "never labels), the generalist's class probabilities as the prediction, exported by nnU-Net "
                    "into the input's geometry. The 'generalist alone' row of a study: score it with nnunet-foundation "
                    "evaluate like any nnU-Net prediction. Example: nnunet-foundation predict-generalist -d 150 -c 2d "
                    "-tr nnUNetTrainerEMA -f 0 -i imagesTs -o pred_generalist",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_and_generalist_arguments(p)
    add_prompting_model_arguments(p, required=True)
    p.add_argument("-f", nargs="+", default=["0"], help="folds of the prompting model (several are ensembled)")
    p.add_argument("-i", required=True, help="input folder (nnU-Net raw naming: CASE_0000.png / .nii.gz ...)")
    p.add_argument("-o", required=True, help="output folder for the segmentations")
    p.add_argument("-np", type=int, default=1, help="preprocessing and export worker processes (0: none, nnU-Net's "
                                                    "sequential prediction; quickest for a few cases on a CPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from nnunet_foundation.cli.arguments import generalists_for_dataset, load_configuration
    from nnunet_foundation.foundation.checkpoints import CheckpointError
    from nnunet_foundation.foundation.config import GeneralistConfigError, MissingBackendError, describe_generalist
    from nnunet_foundation.generalist_prediction import predict_with_generalist

    try:
        dataset, base, _, configuration = load_configuration(args.d, args.p, args.c)
        configs = generalists_for_dataset(args.generalists, "predict-generalist", base, configuration)
        if len(configs) != 1:
            raise GeneralistConfigError("predict-generalist segments with one generalist: give one configuration")
        print(f"predict-generalist: {describe_generalist(configs[0])} prompted by {args.tr} (folds "
              f"{', '.join(args.f)}, {args.chk}) on {args.i} -> {args.o}", flush=True)
        count = predict_with_generalist(dataset, args.tr, args.p, args.c, args.f, args.chk, configs[0], args.i,
                                        args.o, torch.device(args.device), args.np)
    except (GeneralistConfigError, MissingBackendError, CheckpointError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{count} case(s) segmented by the generalist into {args.o}")
    return 0
