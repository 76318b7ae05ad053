"""``nnunet-foundation generalist-quality``: zero-shot Dice of generalists on a dataset's labeled cases, prompted from
the ground truth (the ceiling) and from a trained nnU-Net model (what SemiSAM gets); see foundation/quality.py."""
from __future__ import annotations

import argparse
import json
import os
import sys

from nnunet_foundation.cli.arguments import (add_dataset_and_generalist_arguments, add_prompting_model_arguments,
                                             load_configuration)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generalist-quality", help="Dice of foundation models on labeled cases: oracle prompts vs a trained model's",
        description="Segment a dataset's labeled (preprocessed) cases with one or more generalists, prompted from the "
                    "ground truth ('oracle': the ceiling of prompting) and from a trained nnU-Net model's prediction "
                    "('specialist': what SemiSAM and offline pseudo-labels get; needs -tr). Prints a table and writes "
                    "generalist_quality.md/.json/.png to -o.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_and_generalist_arguments(p)
    add_prompting_model_arguments(p, required=False)
    p.add_argument("-f", nargs="+", default=["0"], help="fold(s) of that model")
    p.add_argument("--cases", nargs="+", default=None, help="case identifiers (default: --num-cases of the "
                                                              "preprocessed cases, sorted)")
    p.add_argument("--exclude-fold-training", type=int, default=None, metavar="FOLD",
                   help="leave out the cases the prompting model trained on in this fold of splits_final.json "
                        "(so 'specialist' is measured on cases it has not seen)")
    p.add_argument("--num-cases", type=int, default=20, help="how many cases when --cases is not given")
    p.add_argument("--modes", nargs="+", default=None,
                   choices=("oracle", "specialist", "proposals", "proposals-head", "localiser", "localiser-alone"),
                   help="prompting modes (default: oracle, plus specialist when -tr is given); 'proposals': the "
                        "generalist segments a grid of boxes and the specialist's agreement picks the objects; "
                        "'proposals-head': a small head on the generalist's embedding, fitted on the labeled "
                        "training cases of --head-fold, picks them (foundation/proposals.py); 'localiser': the "
                        "generalist prompted by a copy of itself fine-tuned (LoRA, decoder, multi-class head) on "
                        "those labeled cases, 'localiser-alone': that copy's own map (foundation/localiser.py)")
    p.add_argument("--localiser-steps", type=int, default=60,
                   help="training steps (batch 4) of the fine-tuned localiser")
    p.add_argument("--head-fold", type=int, default=None,
                   help="fold of splits_final.json whose training (labeled) cases fit the proposals-head "
                        "(default: the first -f)")
    p.add_argument("--proposal-settings", default=None,
                   help="JSON object overriding ProposalSettings (scales, overlap, min_score, nms_iou, match_iou)")
    p.add_argument("-o", required=True, help="output folder of the report")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_foundation.foundation.config import (GeneralistConfigError, MissingBackendError, build_generalist,
                                                     describe_generalist, generalists_for_configuration)
    from nnunet_foundation.foundation.quality import evaluate_generalist, load_preprocessed_cases, write_report
    from nnunet_foundation.specialist import load_specialist

    modes = args.modes or (["oracle", "specialist"] if args.tr else ["oracle"])
    prompted = [m for m in modes if m in ("specialist", "proposals", "proposals-head")]
    if prompted and not args.tr:
        print(f"error: {', '.join(prompted)}: each of these modes needs the trained model that prompts: -tr TRAINER "
              f"[-f FOLD]", file=sys.stderr)
        return 2
    from nnunet_foundation.foundation.proposals import ProposalSettings
    try:
        proposal_overrides = json.loads(args.proposal_settings) if args.proposal_settings else {}
        ProposalSettings(**proposal_overrides)  # checked here, before any model is loaded (as pseudo-label does)
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        print(f"error: --proposal-settings: {e}", file=sys.stderr)
        return 2
    try:
        dataset, base, _, configuration = load_configuration(args.d, args.p, args.c)
        folder = os.path.join(base, configuration["data_identifier"])
        dataset_json = load_json(os.path.join(base, "dataset.json"))
        configs = generalists_for_configuration(args.generalists, "generalist-quality", configuration,
                                                cache_embeddings=True)
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

        cases = args.cases or sorted(infer_dataset_class(folder).get_identifiers(folder))
        if args.exclude_fold_training is not None:
            seen = set(load_json(os.path.join(base, "splits_final.json"))[args.exclude_fold_training]["train"])
            cases = [c for c in cases if c not in seen]
        cases = cases if args.cases else cases[:args.num_cases]
        device = torch.device(args.device)
        specialist = load_specialist(args.d, args.tr, args.p, args.c, args.f, args.chk, device) \
            if args.tr else None
        head_fold = args.head_fold if args.head_fold is not None else \
            (int(args.f[0]) if str(args.f[0]).isdigit() else None)
        head_cases = []
        if {"proposals-head", "localiser", "localiser-alone"} & set(modes):
            if head_fold is None:
                raise KeyError("proposals-head and localiser need --head-fold: the fold whose labeled cases fit them")
            head_cases = load_json(os.path.join(base, "splits_final.json"))[head_fold]["train"]
            overlap = sorted(set(head_cases) & set(cases))
            if overlap:
                raise KeyError(f"the head's training cases (fold {head_fold}) would be scored: "
                               f"{', '.join(overlap[:5])}; use --exclude-fold-training {head_fold}")
    except (GeneralistConfigError, MissingBackendError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    classes = {int(v): k for k, v in dataset_json["labels"].items() if isinstance(v, int) and v > 0}
    results = []
    for config in configs:
        name = describe_generalist(config)
        print(f"== {name}: {len(cases)} case(s), modes {', '.join(modes)}")
        generalist = build_generalist(config).to(device)
        segmenters = _proposers(generalist, modes, proposal_overrides, folder, head_cases, specialist,
                                max(classes) + 1)
        segmenters.update(_localisers(generalist, config, modes, folder, head_cases, max(classes) + 1,
                                      args.localiser_steps, device))
        rows = evaluate_generalist(generalist, load_preprocessed_cases(folder, cases), classes, specialist, modes,
                                   segmenters=segmenters)
        for r in rows:
            r.name = "nnU-Net" if r.mode == "specialist alone" else \
                f"{name}, fine-tuned on the labeled cases" if r.mode == "localiser-alone" else name
        # the prompting model alone is the same row for every generalist: report it once
        results += [r for r in rows if not (r.mode == "specialist alone" and
                                            any(o.mode == "specialist alone" for o in results))]
    specialist_note = f"prompting model: {args.tr} fold(s) {' '.join(args.f)} ({args.chk}); " if args.tr else ""
    notes = [f"Dataset {dataset}, configuration {args.c}, {len(cases)} labeled case(s): {' '.join(cases)}.",
             f"{specialist_note}device {args.device}. Command: nnunet-foundation generalist-quality "
             f"{' '.join(sys.argv[2:]) if len(sys.argv) > 2 else ''}".rstrip()]
    print(write_report(results, args.o, f"Generalist quality on {dataset} ({args.c})", notes))
    with open(os.path.join(args.o, "generalist_configs.json"), "w") as f:
        json.dump(configs, f, indent=2)
    return 0


def _proposers(generalist, modes, overrides: dict, folder: str, head_cases, specialist, num_classes: int) -> dict:
    """The region proposers of the proposal modes, sharing each slice's candidates."""
    from nnunet_foundation.foundation.proposals import build_proposer

    shared = {}
    return {mode: build_proposer(generalist, "head" if mode == "proposals-head" else "agreement", overrides, folder,
                                 head_cases, specialist, num_classes, shared_cache=shared)
            for mode in modes if mode in ("proposals", "proposals-head")}


def _localisers(generalist, config: dict, modes, folder: str, head_cases, num_classes: int, steps: int,
                device) -> dict:
    """The fine-tuned localiser's modes: the generalist prompted by it, and its own map."""
    wanted = [m for m in modes if m in ("localiser", "localiser-alone")]
    if not wanted:
        return {}
    from nnunet_foundation.foundation.localiser import (LocaliserPrompted, fine_tune_localiser, labeled_slices,
                                                        localiser_prompting_model)
    from nnunet_foundation.foundation.config import single_image_channel
    from nnunet_foundation.foundation.quality import load_preprocessed_cases

    print(f"== fine-tuning a localiser on {len(head_cases)} labeled case(s), {steps} steps")
    from nnunet_foundation.foundation.geometry import choose_slice_axis

    # the generalist's own slicing: the configured axis, else the lowest-resolution one
    axis = config["axis"] if config.get("axis") is not None else choose_slice_axis(config.get("spacing"))
    slices = labeled_slices(load_preprocessed_cases(folder, head_cases), axis,
                            single_image_channel(config, "generalist-quality's localiser"))
    predict = localiser_prompting_model(fine_tune_localiser(config, slices, num_classes, steps=steps, device=device))
    return {m: LocaliserPrompted(generalist, predict, alone=m == "localiser-alone") for m in wanted}
