"""``nnunet-foundation convert-multiphase``: a multi-phase study (one folder per patient, one file per phase, labels
for one phase) as an nnU-Net raw dataset of single-phase cases (nnunet_foundation/multiphase.py)."""
from __future__ import annotations

import argparse
import json
import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert-multiphase", help="multi-phase study -> nnU-Net dataset: labeled phase labeled, other phases unlabeled",
        description="Convert INPUT/<patient>/<phase>.nii.gz (+ INPUT/<patient>/<labeled phase>_seg.nii.gz) into "
                    "$nnUNet_raw/DatasetXXX_NAME: the labeled phase of each patient in imagesTr/labelsTr, every other "
                    "phase in imagesUnlabeled (single-channel cases <patient>_<phase>; no registration, phases may be "
                    "missing), patients.json recording case -> patient. --test-patients hold whole patients out "
                    "(labeled phase in imagesTs/labelsTs, other phases not written). Then: nnUNetv2_plan_and_preprocess, "
                    "nnunet-foundation preprocess-unlabeled, and e.g. nnUNetv2_train ... -tr nnUNetTrainerCPS "
                    "[-pretrained_weights FILE].",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-i", required=True, help="input folder: one subfolder per patient")
    p.add_argument("-d", type=int, required=True, help="dataset id of the new dataset")
    p.add_argument("-n", required=True, help="dataset name (DatasetXXX_NAME)")
    p.add_argument("--labeled-phase", required=True, help="the phase whose labels exist, e.g. GED4")
    p.add_argument("--labels", required=True,
                   help='label names and values as JSON, e.g. \'{"background": 0, "liver": 1}\'')
    p.add_argument("--test-patients", type=int, default=0, help="labeled patients held out whole for testing")
    p.add_argument("--seed", type=int, default=0, help="seed of the test-patient draw")
    p.add_argument("--channel-name", default="MRI", help="nnU-Net channel name (sets its normalisation)")
    p.add_argument("--file-ending", default=".nii.gz", help="file ending of images and labels")
    p.set_defaults(func=run)


def run(args) -> int:
    from nnunet_foundation.multiphase import MultiPhaseError, convert_multiphase, summary

    raw = os.environ.get("nnUNet_raw")
    if not raw:
        print("error: nnUNet_raw is not set; export it (nnU-Net's raw data folder) first", file=sys.stderr)
        return 2
    try:
        labels = json.loads(args.labels)
        if not isinstance(labels, dict) or not all(isinstance(v, int) for v in labels.values()):
            raise ValueError("not an object of integer values")
    except ValueError as e:
        print(f"error: --labels: {e}; e.g. '{{\"background\": 0, \"liver\": 1}}'", file=sys.stderr)
        return 2
    try:
        target = convert_multiphase(args.i, raw, args.d, args.n, args.labeled_phase, labels, args.test_patients,
                                    args.seed, args.channel_name, args.file_ending)
    except MultiPhaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(target))
    return 0
