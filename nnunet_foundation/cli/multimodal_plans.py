"""``nnunet-foundation multimodal-plans``: plans that build the multi-modal network (methods/multimodal/network.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "multimodal-plans", help="write plans whose network is the multi-modal U-Net (one encoder per modality)",
        description="Copy a dataset's nnU-Net plans with every configuration's network_class_name set to "
                    "MultiModalUNet (one encoder per input channel with channel attention, gated fusion, nnU-Net's "
                    "decoder). The data identifiers stay, so the preprocessed data are reused. Then: "
                    "nnUNetv2_train D C F -p nnUNetPlansMultiModal -tr nnUNetTrainerMultiModalSSL, and "
                    "nnUNetv2_predict ... -p nnUNetPlansMultiModal.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", required=True, help="dataset name or ID (planned)")
    p.add_argument("-p", default="nnUNetPlans", help="plans to copy")
    p.add_argument("-o", default="nnUNetPlansMultiModal", help="name of the new plans")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_foundation.atomic_files import write_json_atomically
    from nnunet_foundation.methods.multimodal.network import multimodal_plans

    try:
        dataset = maybe_convert_to_dataset_name(args.d)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = os.path.join(nnUNet_preprocessed, dataset, f"{args.p}.json")
    target = os.path.join(nnUNet_preprocessed, dataset, f"{args.o}.json")
    if not os.path.isfile(source):
        print(f"error: {source} does not exist: run nnUNetv2_plan_and_preprocess -d {args.d} first", file=sys.stderr)
        return 2
    with open(source) as f:
        plans = json.load(f)
    try:
        new = multimodal_plans(plans, args.o)
    except ValueError as e:
        print(f"error: {source}: {e}", file=sys.stderr)
        return 2
    if os.path.isfile(target):
        with open(target) as f:
            if json.load(f) != new:
                print(f"error: {target} exists with other content; choose another name with -o (nothing was changed)",
                      file=sys.stderr)
                return 2
    write_json_atomically(new, target)
    with open(os.path.join(nnUNet_preprocessed, dataset, "dataset.json")) as f:
        channels = len(json.load(f)["channel_names"])
    print(f"wrote {target}: MultiModalUNet with {channels} modality encoder(s); train with "
          f"nnUNetv2_train {args.d} CONFIGURATION FOLD -p {args.o} -tr nnUNetTrainerMultiModalSSL")
    return 0
