"""``nnunet-foundation weak-labels``: WeakMedSAM pseudo-masks from slice-level labels (run), and slice-level labels
derived from masks for benchmarking (derive). See nnunet_foundation/methods/weakmedsam/."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

SETTING_HELP = {
    "num_subclasses": "k-means sub-classes per class (K)",
    "subclass_weight": "weight of the (K+1)-way sub-class BCE beside the class BCE",
    "trainable": "'lora': LoRA on the encoder + heads (paper-like); 'heads': frozen encoder, heads on cached pooled "
                 "embeddings (CPU-affordable)",
    "lora_rank": "LoRA rank (trainable lora)",
    "classifier_steps": "classifier optimiser steps (one-cycle schedule)",
    "batch_size": "slices per classifier step",
    "lr": "AdamW peak learning rate of LoRA", "head_lr": "AdamW peak learning rate of the heads",
    "weight_decay": "AdamW weight decay",
    "points_per_side": "uniform grid of N x N single-point prompts",
    "prompt_map": "what the affinity compares: 'probabilities' (the prompts' summed sigmoid; ours) or 'logits' "
                  "(their summed raw logits, the released code)",
    "affinity_radius": "affinity neighbourhood radius in embedding cells",
    "beta": "power of the affinity", "walk_steps": "random-walk steps",
    "blur_sigma": "Gaussian blur sigma in px of a 256-px model input (scaled with the input size)",
    "threshold": "pseudo-mask threshold on the refined maps",
    "gate": "which image labels gate the maps: 'predicted' (the classifier's, as the paper) or 'weak-label' (the "
            "side file's)",
    "seed": "seed of k-means, head initialisation and batch sampling",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "weak-labels", help="WeakMedSAM: pseudo-masks from slice-level labels, as a new nnU-Net dataset",
        description="WeakMedSAM (TMI 2025) on an nnU-Net raw dataset whose cases carry slice-level labels "
                    "(imageLabelsTr.json beside dataset.json). 'run' writes a new raw dataset with pseudo-masks for "
                    "the stock nnUNetv2_plan_and_preprocess / nnUNetv2_train (e.g. -tr nnUNetTrainerWeakMedSAM) / "
                    "nnUNetv2_predict; 'derive' writes imageLabelsTr.json from labelsTr (benchmarking).")
    sub = p.add_subparsers(dest="weak_command", metavar="ACTION", required=True)

    run_p = sub.add_parser(
        "run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="features -> sub-classes -> classifier -> CAM + prompt-affinity random walk -> pseudo-mask dataset",
        description="Example: nnunet-foundation weak-labels run -d 4 -o_d 504 --trainable heads  then  "
                    "nnUNetv2_plan_and_preprocess -d 504 -c 2d && nnUNetv2_train 504 2d 0 -tr "
                    "nnUNetTrainerWeakMedSAM. Finished stages and cases are skipped (a killed run continues); an "
                    "output dataset made from other inputs or settings is refused.")
    run_p.add_argument("-d", required=True, help="source raw dataset (name or ID) with imageLabelsTr.json")
    run_p.add_argument("-o_d", type=int, required=True, help="ID of the output raw dataset (created)")
    run_p.add_argument("--name", default=None, help="name of the output dataset (default: <source name>WeakMedSAM)")
    run_p.add_argument("--side-file", default=None, help="slice-label file (default: <source>/imageLabelsTr.json)")
    run_p.add_argument("--generalists", default=None,
                       help="generalist configuration (one JSON object or file); default LiteMedSAM. Its image "
                            "encoder classifies, its prompt encoder and mask decoder give the affinity")
    run_p.add_argument("--settings", default=None, help="JSON object of settings (the flags below win)")
    defaults = _settings_class()()
    for field in dataclasses.fields(defaults):
        value = getattr(defaults, field.name)
        run_p.add_argument("--" + field.name.replace("_", "-"), dest=field.name, type=type(value), default=None,
                           help=f"{SETTING_HELP.get(field.name, '')} (default {value})")
    run_p.add_argument("--stop-after", choices=("features", "subclasses", "classifier"), default=None,
                       help="stop after this stage (e.g. train the classifier once, then pseudo-label in parts)")
    run_p.add_argument("-part_id", type=int, default=0, help="this machine's part of the pseudo-masks")
    run_p.add_argument("-num_parts", type=int, default=1, help="number of parts the cases are split into")
    run_p.add_argument("-device", default="cpu", choices=("cpu", "cuda"), help="device for the models")
    run_p.set_defaults(func=run)

    derive_p = sub.add_parser(
        "derive", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="benchmarking: write imageLabelsTr.json from the masks in labelsTr (reads those masks)",
        description="Writes the classes present in each slice of each labelsTr mask along --axis (an axis of "
                    "nnU-Net's (z, y, x) array) to imageLabelsTr.json. This READS the masks: it exists to benchmark "
                    "slice-level supervision on a fully labeled dataset. Train from the slice labels alone on a copy "
                    "of the dataset without those masks (see --copy-to).")
    derive_p.add_argument("-d", required=True, help="raw dataset (name or ID)")
    derive_p.add_argument("--axis", type=int, default=0, help="slice axis of nnU-Net's (z, y, x) array")
    derive_p.add_argument("--cases", nargs="+", default=None, help="only these cases (default: all of labelsTr)")
    derive_p.add_argument("--copy-to", type=int, default=None, metavar="ID",
                          help="instead of writing into the dataset, create raw dataset ID with its images, "
                               "dataset.json and the side file and WITHOUT labelsTr for the listed cases (the "
                               "masks of cases not listed in --cases are kept)")
    derive_p.set_defaults(func=derive)


def _settings_class():
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakMedSAMSettings

    return WeakMedSAMSettings


def _raw_folder(dataset: str) -> str:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if nnUNet_raw is None:
        raise FileNotFoundError("nnUNet_raw is not set: export nnUNet_raw=<folder of the raw datasets>")
    folder = os.path.join(nnUNet_raw, maybe_convert_to_dataset_name(dataset))
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        raise FileNotFoundError(f"{folder}/dataset.json does not exist")
    return folder


def _output_folder(dataset_id: int, name: str) -> str:
    from nnunetv2.paths import nnUNet_raw

    prefix = f"Dataset{dataset_id:03d}_"
    others = [d for d in os.listdir(nnUNet_raw) if d.startswith(prefix) and d != prefix + name]
    if others:
        raise ValueError(f"dataset id {dataset_id} is taken by {os.path.join(nnUNet_raw, others[0])}: choose another "
                         f"-o_d")
    return os.path.join(nnUNet_raw, prefix + name)


def run(args) -> int:
    from nnunet_foundation.foundation.checkpoints import CheckpointError
    from nnunet_foundation.foundation.config import GeneralistConfigError, MissingBackendError, describe_generalist, \
        resolve_generalists
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset, WeakMedSAMRun, WeakMedSAMSettings
    from nnunet_foundation.methods.weakmedsam.weak_labels import WeakLabelError

    if not 0 <= args.part_id < args.num_parts:
        print("error: need 0 <= -part_id < -num_parts", file=sys.stderr)
        return 2
    try:
        values = json.loads(args.settings) if args.settings else {}
        if not isinstance(values, dict):
            raise WeakLabelError("--settings must be a JSON object")
        values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(WeakMedSAMSettings)
                       if getattr(args, f.name) is not None})
        settings = WeakMedSAMSettings.from_dict(values)
        source = WeakDataset(_raw_folder(args.d), args.side_file)
        source_name = os.path.basename(os.path.normpath(source.folder)).split("_", 1)[1]
        output = _output_folder(args.o_d, args.name or f"{source_name}WeakMedSAM")
        if os.path.realpath(output) == os.path.realpath(source.folder):
            raise WeakLabelError("the output dataset must differ from the source dataset")
        generalist = resolve_generalists(args.generalists, "weak-labels", exactly_one=True)[0]
        pipeline = WeakMedSAMRun(source, output, generalist, settings, args.device)
        print(f"weak-labels: {len(source.weak)} slice-labelled case(s) (axis {source.axis}), "
              f"{len(source.labeled)} case(s) with masks, classes {source.classes}; generalist "
              f"{describe_generalist(generalist)}; part {args.part_id + 1}/{args.num_parts} -> {output}", flush=True)
        counts = pipeline.run(args.part_id, args.num_parts, args.stop_after)
    except (WeakLabelError, GeneralistConfigError, MissingBackendError, CheckpointError, FileNotFoundError,
            ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.stop_after:
        print(f"stopped after {args.stop_after}; rerun without --stop-after to continue")
        return 0
    print(f"done: {counts['done']} pseudo-mask(s) written, {counts['skipped']} already there, {counts['missing']} "
          f"still missing (other parts); next: nnUNetv2_plan_and_preprocess -d {args.o_d} -c 2d, then nnUNetv2_train "
          f"{args.o_d} 2d <fold> -tr nnUNetTrainerWeakMedSAM")
    return 0


def derive(args) -> int:
    import shutil

    from nnunet_foundation.methods.weakmedsam.weak_labels import SIDE_FILE, WeakLabelError, derive_weak_labels

    try:
        folder = _raw_folder(args.d)
        if args.copy_to is None:
            path = derive_weak_labels(folder, args.axis, args.cases)
            print(f"wrote {path} (derived from the masks in {folder}/labelsTr)")
            return 0
        name = os.path.basename(os.path.normpath(folder)).split("_", 1)[1]
        target = _output_folder(args.copy_to, f"{name}SliceLabels")
        if os.path.exists(target):
            raise ValueError(f"{target} exists; choose another --copy-to id or delete it yourself")
        os.makedirs(os.path.join(target, "labelsTr"))
        try:
            side = derive_weak_labels(folder, args.axis, args.cases, output=os.path.join(target, SIDE_FILE))
        except BaseException:
            shutil.rmtree(target)  # only what this command just created
            raise
        with open(side) as f:
            weak_cases = set(json.load(f)["cases"])
        shutil.copytree(os.path.join(folder, "imagesTr"), os.path.join(target, "imagesTr"))
        shutil.copyfile(os.path.join(folder, "dataset.json"), os.path.join(target, "dataset.json"))
        with open(os.path.join(folder, "dataset.json")) as f:
            ending = json.load(f)["file_ending"]
        kept = 0
        for file in os.listdir(os.path.join(folder, "labelsTr")):
            if file.endswith(ending) and file[:-len(ending)] not in weak_cases:
                shutil.copyfile(os.path.join(folder, "labelsTr", file), os.path.join(target, "labelsTr", file))
                kept += 1
        print(f"created {target}: {len(weak_cases)} case(s) with slice labels only ({SIDE_FILE}, axis {args.axis}), "
              f"{kept} case(s) with their masks")
        return 0
    except (WeakLabelError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
