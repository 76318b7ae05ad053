"""``nnunet-foundation sfr``: SFR stages 1-2 (stitching, fine-tuning; SFR+ with ``--plus``) for one fold, resumable;
then ``nnUNetv2_train D C F -tr nnUNetTrainerSFR`` re-trains nnU-Net (nnunet_foundation/methods/sfr/)."""
from __future__ import annotations

import argparse
import os
import sys
import time

from nnunet_foundation.cli.arguments import add_dataset_and_generalist_arguments, load_configuration


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sfr", help="SFR stages 1-2: fine-tune the generalist on stitched labeled patches (for nnUNetTrainerSFR)",
        description="Stitch the slices of the fold's labeled patches into mosaics at the generalist's input size and "
                    "fine-tune it on them (LoRA on q/v, decoder, prompt-free multi-class head; 0.5 (CE + Dice), "
                    "AdamW, poly schedule). Writes the fine-tuned generalist beside the dataset's trained models, "
                    "where nnUNetTrainerSFR finds it. A killed run continues where it stopped; a finished one is "
                    "skipped. Example: nnunet-foundation sfr -d 4 -c 3d_fullres -f 0 && nnUNetv2_train 4 3d_fullres "
                    "0 -tr nnUNetTrainerSFR",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_and_generalist_arguments(p)
    p.add_argument("-f", type=int, required=True, help="fold: its labeled training cases fine-tune the generalist")
    p.add_argument("--iterations", type=int, default=0,
                   help="fine-tuning iterations per round; 0 = min(6000, 750 x labeled cases) (the paper: 6000 at "
                        "batch 2 with 8 labeled LA volumes)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per iteration (3d) or mosaics of 2D patches (2d)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (poly decay)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank on the image encoder's q/v projections")
    p.add_argument("--seed", type=int, default=0, help="seed of the patch sampling and augmentation")
    p.add_argument("--plus", action="store_true",
                   help="SFR+ (ours): unlabeled cases the generalist segments with mean max-softmax >= "
                        "--plus-threshold join the labeled set for a second fine-tuning round")
    p.add_argument("--plus-threshold", type=float, default=0.985, help="SFR+ confidence threshold")
    p.add_argument("--save-every", type=int, default=25, help="save the resumable state every this many iterations")
    p.add_argument("--pseudo-labels", action="store_true",
                   help="also write the fine-tuned generalist's pseudo-labels of the fold's unlabeled cases as an "
                        "offline cache (set nnUNet_ssl_pseudo_labels to its name: no generalist runs in training)")
    p.add_argument("--name", default=None, help="cache name for --pseudo-labels (default SFR__<plans>__fold<f>)")
    p.add_argument("-part_id", type=int, default=0, help="--pseudo-labels: this machine's part of the cases")
    p.add_argument("-num_parts", type=int, default=1, help="--pseudo-labels: number of parts (fine-tuning must "
                                                           "have finished)")
    p.add_argument("--output", default=None, help="folder of the fine-tuned generalist (default: $nnUNet_results/"
                                                  "<dataset>/SFR_generalist__<plans>__<c>/fold_<f>; then set "
                                                  "nnUNet_ssl_sfr_generalist to it)")
    p.set_defaults(func=run)


def fold_training_cases(base: str, preprocessed_folder: str, fold: int) -> list:
    """The fold's labeled training cases exactly as nnU-Net's trainer splits them (splits_final.json, or the seeded
    5-fold split nnU-Net writes when there is none)."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_foundation.methods.sfr.fine_tune import SFRError

    splits_file = os.path.join(base, "splits_final.json")
    if os.path.isfile(splits_file):
        splits = load_json(splits_file)
        if fold >= len(splits):
            raise SFRError(f"{splits_file} has {len(splits)} fold(s); fold {fold} does not exist")
        return list(splits[fold]["train"])
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    identifiers = sorted(infer_dataset_class(preprocessed_folder).get_identifiers(preprocessed_folder))
    if fold >= 5:
        raise SFRError(f"no {splits_file}: nnU-Net's default split has folds 0-4, not {fold}")
    return list(generate_crossval_split(identifiers, seed=12345, n_splits=5)[fold]["train"])


def _save_torch(obj, path: str) -> None:
    import torch

    from nnunet_foundation.atomic_files import write_atomically

    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def run(args) -> int:
    import json

    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.atomic_files import write_json_atomically
    from nnunet_foundation.foundation.checkpoints import CheckpointError, file_sha256
    from nnunet_foundation.foundation.config import (GeneralistConfigError, MissingBackendError,
                                                     describe_generalist, generalists_by_content)
    from nnunet_foundation.methods.sfr import fine_tune as ft
    from nnunet_foundation.unlabeled import UnlabeledDataError, UnlabeledImageDataset, plans_fingerprint

    for name, value, low in (("--batch-size", args.batch_size, 1), ("--lora-rank", args.lora_rank, 1),
                             ("--save-every", args.save_every, 1), ("--iterations", args.iterations, 0)):
        if value < low:
            print(f"error: {name} must be >= {low}, got {value}", file=sys.stderr)
            return 2
    if not 0.0 <= args.plus_threshold <= 1.0:
        print("error: --plus-threshold is a probability in [0, 1]", file=sys.stderr)
        return 2
    try:
        dataset, base, plans, entry = load_configuration(args.d, args.p, args.c)
        pm = PlansManager(plans)
        cm = pm.get_configuration(args.c)
        dataset_json = load_json(os.path.join(base, "dataset.json"))
        label_manager = pm.get_label_manager(dataset_json)
        if label_manager.has_regions:
            raise ft.SFRError("SFR's generalist predicts one class per pixel; region-based datasets "
                              "(regions_class_order) are not supported")
        preprocessed = os.path.join(base, entry["data_identifier"])
        labeled = fold_training_cases(base, preprocessed, args.f)
        unlabeled = pl.fold_unlabeled_cases(base, plans, args.c, args.f)
        config = ft.sfr_generalist_config(args.generalists, "nnunet-foundation sfr", cm,
                                          label_manager.num_segmentation_heads, args.lora_rank, dataset_json)
        from nnunetv2.paths import nnUNet_results

        folder = args.output or ft.generalist_folder(os.path.join(nnUNet_results, dataset), args.p, args.c, args.f)
        iterations = args.iterations or ft.auto_iterations(len(labeled))
        inputs = {"dataset": dataset, "configuration": args.c, "plans": args.p,
                  "plans_fingerprint": plans_fingerprint(plans, args.c), "fold": args.f, "labeled_cases": labeled,
                  "generalist": generalists_by_content([config])[0],
                  "settings": {"iterations": iterations, "batch_size": args.batch_size, "lr": args.lr,
                               "weight_decay": args.weight_decay, "lora_rank": args.lora_rank, "seed": args.seed,
                               "plus": args.plus, "plus_threshold": args.plus_threshold if args.plus else None}}
        manifest = ft.read_manifest(folder)
        if manifest is not None and manifest.get("inputs") != inputs:
            changed = sorted(k for k in set(inputs) | set(manifest.get("inputs", {}))
                             if inputs.get(k) != manifest.get("inputs", {}).get(k))
            raise ft.SFRError(f"{os.path.join(folder, ft.MANIFEST)} records a fine-tuning with other inputs "
                              f"({', '.join(changed)} differ): give another --output, or delete {folder} to start "
                              f"over")
        if (args.plus or args.pseudo_labels) and not unlabeled:
            raise UnlabeledDataError(f"fold {args.f} of {dataset} has no unlabeled cases (needed by --plus / "
                                     f"--pseudo-labels): list them in splits_final.json ('unlabeled') or put scans in "
                                     f"imagesUnlabeled and run nnunet-foundation preprocess-unlabeled")
        finished = manifest is not None and manifest.get("finished")
        if args.num_parts > 1 and not finished:
            raise ft.SFRError("-part_id/-num_parts split the --pseudo-labels pass, which needs a finished "
                              "fine-tuning: run once without them first")
        part = pl.cases_of_part(list(unlabeled), args.part_id, args.num_parts) if args.pseudo_labels else []
    except (GeneralistConfigError, MissingBackendError, CheckpointError, FileNotFoundError, KeyError, ValueError,
            UnlabeledDataError, pl.PseudoLabelError, ft.SFRError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    device = torch.device(args.device)
    is_2d = len(cm.patch_size) == 2
    axis = ft.slice_axis(config, is_2d)
    tile_hw = ft.in_plane(cm.patch_size, axis, is_2d)
    channel = config["image_channel"]  # an index, or "rgb" (channels 0-2 in colour)
    print(f"SFR: {dataset} {args.c}, fold {args.f}: {len(labeled)} labeled and {len(unlabeled)} unlabeled case(s); "
          f"generalist {describe_generalist(config)}; {iterations} iteration(s) per round at batch "
          f"{args.batch_size}{' (SFR+: two rounds)' if args.plus else ''} -> {folder}", flush=True)

    if finished:
        print(f"SFR: fine-tuning finished earlier ({folder}); nothing to fine-tune", flush=True)
        final = ft.load_final(folder)
        generalist = ft.build_sfr_generalist(final["config"], final["adapted"], device)
        final_sha = manifest["final_sha256"]
    else:
        os.makedirs(folder, exist_ok=True)
        if manifest is None:
            manifest = {"inputs": inputs, "finished": False}
            write_json_atomically(manifest, os.path.join(folder, ft.MANIFEST), indent=2, sort_keys=True)
        generalist = ft.build_sfr_generalist(config, None, device)
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        dataset_class = infer_dataset_class(preprocessed)
        labeled_data = dataset_class(preprocessed, identifiers=labeled)
        cases = []
        for case in labeled:
            data, seg, _, _ = labeled_data.load_case(case)
            cases.append((np.asarray(data[:], dtype=np.float32),
                          ft.labels_for_training(seg[:], label_manager.ignore_label)))
        state_file = os.path.join(folder, ft.STATE_FILE)
        state = torch.load(state_file, map_location="cpu", weights_only=True) if os.path.isfile(state_file) else None

        def saver(round_index):
            return lambda snapshot: _save_torch({**snapshot, "round": round_index}, state_file)

        def sampler_for(case_list, seed):
            return ft.LabeledPatchSampler(case_list, cm.patch_size, axis, is_2d, channel, generalist.img_size, seed)

        common = dict(iterations=iterations, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      save_every=args.save_every)
        losses = {}
        resume1 = state if state is not None and state["round"] == 1 else None
        if state is None or state["round"] == 1:
            losses["round 1"] = ft.fine_tune(generalist, sampler_for(cases, args.seed), resume=resume1,
                                             save=saver(1), tag="round 1", **common)
        moved = []
        if args.plus:
            if state is not None and state["round"] == 2:
                with open(os.path.join(folder, ft.CONFIDENCE_FILE)) as f:
                    moved = json.load(f)["moved"]
            else:
                moved = sfr_plus_selection(generalist, unlabeled, folder, axis, channel, tile_hw, args.plus_threshold)
            plus_cases = []
            for case in moved:
                with np.load(os.path.join(folder, ft.PLUS_LABELS, f"{case}.npz")) as npz:
                    plus_cases.append((np.asarray(UnlabeledImageDataset(unlabeled).load_case(case)[0][:],
                                                  dtype=np.float32), npz["label"].astype(np.int64)))
            print(f"SFR+: {len(moved)} of {len(unlabeled)} unlabeled case(s) join the {len(cases)} labeled one(s) "
                  f"for round 2", flush=True)
            if moved:  # without a new case a second round would only train longer on the same labels
                resume2 = state if state is not None and state["round"] == 2 else None
                losses["round 2"] = ft.fine_tune(generalist, sampler_for(cases + plus_cases, args.seed + 1),
                                                 resume=resume2, save=saver(2), tag="round 2 (SFR+)", **common)
            else:
                print(f"SFR+: no case reached mean max-softmax {args.plus_threshold}: round 2 skipped", flush=True)
        rounds = 2 if moved else 1
        from nnunet_foundation.foundation.lora import adaptable_state_dict

        final_file = os.path.join(folder, ft.FINAL_FILE)
        _save_torch({"config": config, "adapted": {k: v.detach().cpu() for k, v in
                                                   adaptable_state_dict(generalist).items()},
                     "rounds": rounds}, final_file)
        final_sha = file_sha256(final_file)
        tail = {k: float(np.mean(v[-10:])) for k, v in losses.items() if v}
        manifest.update({"finished": True, "final_sha256": final_sha, "rounds": rounds,
                         "sfr_plus_moved": moved, "final_loss_last10": tail,
                         "trainable_tensors": sorted(adaptable_state_dict(generalist))})
        write_json_atomically(manifest, os.path.join(folder, ft.MANIFEST), indent=2, sort_keys=True)
        where = f"export nnUNet_ssl_sfr_generalist={folder}; " if args.output else ""
        print(f"SFR: fine-tuned generalist written to {final_file}; next: {where}nnUNetv2_train {args.d} {args.c} "
              f"{args.f} -tr nnUNetTrainerSFR", flush=True)

    if args.pseudo_labels:
        name = args.name or f"SFR__{args.p}__fold{args.f}"
        cache = pl.cache_folder(base, entry["data_identifier"], name)
        try:
            pl.check_or_write_manifest(cache, {
                "dataset": dataset, "configuration": args.c, "plans": args.p,
                "plans_fingerprint": plans_fingerprint(plans, args.c), "sfr_generalist": folder,
                "sfr_generalist_sha256": final_sha, "ignore_value": pl.IGNORE})
        except pl.PseudoLabelError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        write_pseudo_labels(generalist, UnlabeledImageDataset(unlabeled), part, cache, axis, channel, tile_hw)
        print(f"SFR: pseudo-labels in {cache}; train from them with: export nnUNet_ssl_pseudo_labels={name}",
              flush=True)
    return 0


def _each_case(cases, what: str):
    """Yield ``(index, case)`` with a progress line after each case."""
    started = time.perf_counter()
    for index, case in enumerate(cases, 1):
        yield index, case
        elapsed = time.perf_counter() - started
        print(f"  [{index}/{len(cases)}] {what} {case}: {elapsed:.0f} s elapsed, about "
              f"{elapsed / index * (len(cases) - index):.0f} s left", flush=True)


def sfr_plus_selection(generalist, unlabeled: dict, folder: str, axis: int, channel: int, tile_hw, threshold: float
                       ) -> list:
    """SFR+: segment every unlabeled case with the round-1 generalist; those with mean max-softmax >= ``threshold``
    get their hard labels saved for round 2. Per-case results are written as they come (a killed run continues)."""
    import json

    import numpy as np

    from nnunet_foundation.atomic_files import write_atomically, write_json_atomically
    from nnunet_foundation.methods.sfr import fine_tune as ft
    from nnunet_foundation.unlabeled import UnlabeledImageDataset

    record_file = os.path.join(folder, ft.CONFIDENCE_FILE)
    record = {"threshold": threshold, "confidence": {}, "moved": [], "complete": False}
    if os.path.isfile(record_file):
        with open(record_file) as f:
            record = json.load(f)
    os.makedirs(os.path.join(folder, ft.PLUS_LABELS), exist_ok=True)
    images = UnlabeledImageDataset(unlabeled)
    todo = [c for c in sorted(unlabeled) if c not in record["confidence"]]
    print(f"SFR+: confidence of {len(unlabeled)} unlabeled case(s) ({len(unlabeled) - len(todo)} done earlier)",
          flush=True)
    for _, case in _each_case(todo, "SFR+ confidence of"):
        probs = ft.predict_case(generalist, images.load_case(case)[0][:], axis, channel, tile_hw)
        confidence = ft.mean_max_softmax(probs)
        if confidence >= threshold:
            label = probs.argmax(0).numpy().astype(np.uint8)

            def write(tmp, label=label):
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, label=label)

            write_atomically(os.path.join(folder, ft.PLUS_LABELS, f"{case}.npz"), write)
            record["moved"].append(case)
        record["confidence"][case] = confidence
        print(f"    {case}: mean max-softmax {confidence:.4f} -> "
              f"{'labeled for round 2' if confidence >= threshold else 'stays unlabeled'}", flush=True)
        write_json_atomically(record, record_file, indent=2, sort_keys=True)
    record["moved"] = sorted(record["moved"])
    record["complete"] = True
    write_json_atomically(record, record_file, indent=2, sort_keys=True)
    return record["moved"]


def write_pseudo_labels(generalist, images, cases: list, cache: str, axis: int, channel: int, tile_hw) -> None:
    """The fine-tuned generalist's hard labels (and probabilities) of ``cases`` in the offline-cache format of
    nnunet_foundation/pseudo_labels.py; finished cases are skipped."""
    import numpy as np

    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.methods.sfr import fine_tune as ft

    todo = [c for c in cases if not os.path.isfile(os.path.join(cache, f"{c}.npz"))]
    print(f"SFR pseudo-labels: {len(cases)} case(s) in this part, {len(cases) - len(todo)} done earlier", flush=True)
    for _, case in _each_case(todo, "pseudo-labelled"):
        probs = ft.predict_case(generalist, images.load_case(case)[0][:], axis, channel, tile_hw)
        pl.save_case(cache, case, {"probabilities": probs.numpy().astype(np.float16),
                                   "covered": np.ones(probs.shape[1:], dtype=bool),
                                   "label": probs.argmax(0).numpy().astype(np.uint8)})
