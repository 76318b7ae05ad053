"""``nnunet-foundation pseudo-label``: offline generalist pseudo-labels of a fold's unlabeled cases, prompted by a
trained nnU-Net model (see nnunet_foundation/pseudo_labels.py)."""
from __future__ import annotations

import argparse
import os
import sys

from nnunet_foundation.cli.arguments import (add_dataset_and_generalist_arguments, add_prompting_model_arguments,
                                             generalists_for_dataset, load_configuration)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pseudo-label", help="generalist pseudo-labels of a fold's unlabeled cases, prompted by a trained model",
        description="Predict each unlabeled case of the fold (the split's 'unlabeled' list and imagesUnlabeled) with a "
                    "trained nnU-Net model, prompt the generalist from that prediction (never from labels) and write "
                    "its class probabilities, the slices it segmented and a hard label with an ignore value beside "
                    "the preprocessed data, with a manifest of what made them. Finished cases are skipped, so a "
                    "killed run continues; -part_id/-num_parts split the cases across machines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_and_generalist_arguments(p)
    add_prompting_model_arguments(p, required=True)
    p.add_argument("-f", type=int, required=True, help="fold: its model prompts and its unlabeled cases are labelled")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="voxels whose pseudo-label probability is below this get the ignore value in 'label'")
    p.add_argument("--proposals", default=None, choices=("agreement", "head"),
                   help="instead of prompting the generalist with the model's components, let it propose regions "
                        "from a grid of boxes and keep those the model agrees with ('agreement') or that a small head "
                        "on the generalist's embedding, fitted on the fold's labeled cases, calls objects ('head'): "
                        "finds objects the model missed (foundation/proposals.py)")
    p.add_argument("--proposal-settings", default=None,
                   help="JSON object overriding ProposalSettings (scales, overlap, min_score, nms_iou, match_iou)")
    p.add_argument("--name", default=None, help="cache name (default: <trainer>__<plans>__fold<f>, "
                                                     "+ __proposals-<scoring> with --proposals)")
    p.add_argument("-part_id", type=int, default=0, help="this machine's part of the cases")
    p.add_argument("-num_parts", type=int, default=1, help="number of parts the cases are split into")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.foundation.checkpoints import CheckpointError
    from nnunet_foundation.foundation.config import (GeneralistConfigError, MissingBackendError, build_generalist,
                                                     describe_generalist, generalists_by_content)
    from nnunet_foundation.specialist import checkpoint_digest, load_specialist
    from nnunet_foundation.unlabeled import UnlabeledDataError, UnlabeledImageDataset, plans_fingerprint

    if not 0.0 <= args.min_confidence <= 1.0:
        print("error: --min-confidence is a probability in [0, 1]", file=sys.stderr)
        return 2
    import json

    from nnunet_foundation.foundation.proposals import ProposalSettings
    try:
        proposal_overrides = json.loads(args.proposal_settings) if args.proposal_settings else {}
        proposal_settings = ProposalSettings(**{**proposal_overrides, "scoring": args.proposals or "agreement"})
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        print(f"error: --proposal-settings: {e}", file=sys.stderr)
        return 2
    try:
        dataset, base, plans, configuration = load_configuration(args.d, args.p, args.c)
        configs = generalists_for_dataset(args.generalists, "pseudo-label", base, configuration)
        if len(configs) != 1:
            raise GeneralistConfigError("pseudo-label writes one generalist's labels: give one configuration")
        cases = pl.fold_unlabeled_cases(base, plans, args.c, args.f)
        if not cases:
            raise pl.PseudoLabelError(f"fold {args.f} of {dataset} has no unlabeled cases: list them in "
                                      f"splits_final.json ('unlabeled') or put scans in imagesUnlabeled and run "
                                      f"nnunet-foundation preprocess-unlabeled")
        name = args.name or f"{args.tr}__{args.p}__fold{args.f}" + (f"__proposals-{args.proposals}"
                                                                   if args.proposals else "")
        folder = pl.cache_folder(base, configuration["data_identifier"], name)
        manifest = {
            "dataset": dataset, "configuration": args.c, "plans": args.p,
            "plans_fingerprint": plans_fingerprint(plans, args.c),
            "specialist": {"trainer": args.tr, "fold": args.f, "checkpoint": args.chk,
                           "sha256": checkpoint_digest(dataset, args.tr, args.p, args.c, [args.f], args.chk)},
            "generalist": generalists_by_content(configs)[0], "min_confidence": args.min_confidence,
            "ignore_value": pl.IGNORE,
        }
        labeled_cases = []
        if args.proposals:
            from dataclasses import asdict

            from batchgenerators.utilities.file_and_folder_operations import load_json

            labeled_cases = load_json(os.path.join(base, "splits_final.json"))[args.f]["train"]
            manifest["proposals"] = {**asdict(proposal_settings), "head_fitted_on": labeled_cases
                                     if args.proposals == "head" else None}
        pl.check_or_write_manifest(folder, manifest)
        device = torch.device(args.device)
        specialist = load_specialist(dataset, args.tr, args.p, args.c, [str(args.f)], args.chk, device)
        part = pl.cases_of_part(list(cases), args.part_id, args.num_parts)
    except (GeneralistConfigError, MissingBackendError, CheckpointError, FileNotFoundError, KeyError,
            UnlabeledDataError, pl.PseudoLabelError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pseudo-label: {dataset} {args.c}, fold {args.f}, prompting model {args.tr} ({args.chk}), generalist "
          f"{describe_generalist(configs[0])}; part {args.part_id + 1}/{args.num_parts} -> {folder}")
    generalist = build_generalist(configs[0]).to(device)
    if args.proposals:
        from nnunet_foundation.foundation.proposals import build_proposer

        try:
            generalist = build_proposer(generalist, args.proposals, proposal_overrides,
                                        os.path.join(base, configuration["data_identifier"]), labeled_cases,
                                        specialist, max(plans_labels(base)) + 1,
                                        head_file=os.path.join(folder, "region_head.pt"))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    images = UnlabeledImageDataset(cases)  # image arrays only: labels of split-unlabeled cases are never opened
    counts = pl.run_cases(folder, part, lambda case: images.load_case(case)[0][:], specialist, generalist,
                          args.min_confidence)
    print(f"done: {counts['done']} case(s) labelled, {counts['skipped']} already there; cache {folder}")
    return 0


def plans_labels(base: str) -> list:
    """The dataset's label values (background included), from its dataset.json."""
    from batchgenerators.utilities.file_and_folder_operations import load_json

    labels = load_json(os.path.join(base, "dataset.json"))["labels"]
    return sorted({v for v in labels.values() if isinstance(v, int)})
