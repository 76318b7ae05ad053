"""``nnunet-foundation ifl``: IFL's outer loop for one fold (nnunet_foundation/methods/ifl/): round 0 trains nnU-Net
on the labeled cases; each later round prompts the generalist at key slices of the previous rounds' predictions of
the unlabeled cases, propagates through each volume, caches the pseudo-labels and retrains nnU-Net, warm-started."""
from __future__ import annotations

import argparse
import os
import sys
import time

from nnunet_foundation.cli.arguments import (add_dataset_and_generalist_arguments, generalists_for_dataset,
                                             load_configuration)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ifl", help="IFL rounds: nnU-Net prompts the generalist, which propagates pseudo-labels; nnU-Net retrains",
        description="Iterative foundation-dedicated learning (Yin et al., MICCAI 2025; only the abstract is "
                    "published, so the design is ours: README, 'IFL'). Round 0 trains nnU-Net on the fold's labeled "
                    "cases (nnUNetTrainerEMA); round r >= 1 predicts the fold's unlabeled cases with round r-1's "
                    "model, chooses key slices per class from the last --history rounds' predictions (certain, "
                    "stable, spread through the structure; labels are never read), lets the generalist segment them "
                    "from boxes and walk slice by slice through the volume, one class at a time, writes the round's "
                    "pseudo-labels to an offline cache and trains nnUNetTrainerIFLRound<r> on labeled + "
                    "pseudo-labelled cases, warm-started from round r-1 (-pretrained_weights). Stops after --rounds "
                    "rounds or when consecutive rounds' pseudo-labels agree (Dice >= --converged). Every round is an "
                    "nnU-Net run folder (nnUNetv2_predict -tr <its trainer>); the final model is the last round's. "
                    "A killed run continues where it stopped when the same command is run again. Per round, the "
                    "pseudo-label change, the generalist / nnU-Net agreement and the validation Dice go to "
                    "ifl_log.json and ifl_progress.png in $nnUNet_results/<dataset>/IFL__<plans>__<c>/fold_<f>.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataset_and_generalist_arguments(p)
    p.add_argument("-f", type=int, required=True, help="fold: its labeled cases train, its unlabeled cases are "
                                                       "pseudo-labelled")
    p.add_argument("--rounds", type=int, default=3, help="foundation rounds after round 0 (at most 5)")
    p.add_argument("--budget", default=None,
                   help="training budget of every round's nnU-Net (a trainer suffix such as 250epochs or cpu2d; "
                        "default: nnU-Net's 1000 epochs)")
    p.add_argument("--converged", type=float, default=0.95,
                   help="stop when the mean Dice between two consecutive rounds' pseudo-labels reaches this")
    p.add_argument("--history", type=int, default=2, help="rounds of predictions the key-slice choice looks back on")
    p.add_argument("--num-key-slices", type=int, default=3, help="key slices per class and case")
    p.add_argument("--min-agreement", type=float, default=0.5,
                   help="a walk stops at a slice where its mask and nnU-Net's region of the class have Dice below "
                        "this")
    p.add_argument("--min-confidence", type=float, default=0.5,
                   help="pseudo-labelled voxels less confident than this are ignored in training")
    p.add_argument("-part_id", type=int, default=0,
                   help="with -num_parts > 1: pseudo-label only this part of the next round's cases, then exit "
                        "(run the command without them afterwards to finish and train)")
    p.add_argument("-num_parts", type=int, default=1, help="number of parts the cases are split into")
    p.set_defaults(func=run)


class IFLCommandError(RuntimeError):
    pass


def _trainer(round_index: int, budget) -> str:
    base = "nnUNetTrainerEMA" if round_index == 0 else f"nnUNetTrainerIFLRound{round_index}"
    return f"{base}_{budget}" if budget else base


def _train(cmd, log_file: str, env: dict) -> None:
    """nnUNetv2_train as a subprocess, its output in ``log_file``, epochs shown as progress."""
    from nnunet_foundation.subprocesses import CommandFailed, run_logged

    print(f"  $ {' '.join(cmd)}   (log: {log_file})", flush=True)
    try:
        run_logged(cmd, env, log_file, show=lambda line: "Epoch " in line or "Mean Validation Dice" in line)
    except CommandFailed as e:
        raise IFLCommandError(f"{e}. Run the same ifl command again to resume. Last lines:\n{e.tail}") from None


def run(args) -> int:
    try:
        return _run(args)
    except IFLCommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import numpy as np
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunet_foundation import pseudo_labels as pl
    from nnunet_foundation.foundation.checkpoints import CheckpointError
    from nnunet_foundation.foundation.config import (RGB, GeneralistConfigError, MissingBackendError,
                                                     build_generalist, describe_generalist, generalists_by_content,
                                                     single_image_channel)
    from nnunet_foundation.methods.ifl import rounds as ifl
    from nnunet_foundation.methods.ifl.keyframes import KeySliceSettings
    from nnunet_foundation.methods.ifl.propagation import PropagationSettings
    from nnunet_foundation.methods.ifl.trainer import MAX_ROUNDS, ifl_cache_name
    from nnunet_foundation.subprocesses import nnunet_environment
    from nnunet_foundation.training.checkpoint_files import was_interrupted
    from nnunet_foundation.specialist import checkpoint_digest, load_specialist
    from nnunet_foundation.training.budgets import BUDGETS
    from nnunet_foundation.unlabeled import UnlabeledDataError, UnlabeledImageDataset, plans_fingerprint

    if not 1 <= args.rounds <= MAX_ROUNDS:
        raise IFLCommandError(f"--rounds must be 1..{MAX_ROUNDS} (one trainer class per round: "
                              f"nnUNetTrainerIFLRound1..{MAX_ROUNDS})")
    if args.budget is not None and args.budget not in BUDGETS:
        raise IFLCommandError(f"unknown --budget {args.budget!r}; one of {', '.join(BUDGETS)}")
    if args.history < 1 or not 0 <= args.converged <= 1 or not 0 <= args.min_confidence <= 1:
        raise IFLCommandError("--history must be >= 1; --converged and --min-confidence are in [0, 1]")
    settings = ifl.RoundSettings(history=args.history, min_confidence=args.min_confidence,
                                 key=KeySliceSettings(num_key_slices=args.num_key_slices),
                                 propagation=PropagationSettings(min_agreement=args.min_agreement))
    try:
        dataset, base, plans, configuration = load_configuration(args.d, args.p, args.c)
        # a natural RGB dataset (convert-2d) is walked in colour unless the setting names a channel
        configs = generalists_for_dataset(args.generalists, "ifl", base, configuration)
        if len(configs) != 1:
            raise GeneralistConfigError("ifl propagates with one generalist: give one configuration")
        cases = sorted(pl.fold_unlabeled_cases(base, plans, args.c, args.f))
        if not cases:
            raise pl.PseudoLabelError(f"fold {args.f} of {dataset} has no unlabeled cases: list them in "
                                      f"splits_final.json ('unlabeled') or put scans in imagesUnlabeled and run "
                                      f"nnunet-foundation preprocess-unlabeled")
        part = pl.cases_of_part(cases, args.part_id, args.num_parts)
    except (GeneralistConfigError, MissingBackendError, CheckpointError, FileNotFoundError, KeyError,
            UnlabeledDataError, pl.PseudoLabelError) as e:
        raise IFLCommandError(str(e)) from e

    from dataclasses import asdict

    results_dataset = os.path.dirname(get_output_folder(dataset, "x", args.p, args.c))
    work = ifl.work_folder(results_dataset, args.p, args.c, args.f)
    os.makedirs(work, exist_ok=True)
    header = {"dataset": dataset, "configuration": args.c, "plans": args.p, "fold": args.f, "budget": args.budget,
              "generalist": generalists_by_content(configs)[0], "settings": asdict(settings),
              "unlabeled_cases": len(cases)}
    log_path = os.path.join(work, ifl.LOG_FILE)
    if os.path.isfile(log_path):
        import json

        with open(log_path) as f:
            recorded = {k: v for k, v in json.load(f).items() if k != "rounds"}
        changed = sorted(k for k in set(recorded) | set(header) if recorded.get(k) != header.get(k))
        if changed:
            raise IFLCommandError(f"{log_path} records IFL rounds made with other inputs ({', '.join(changed)} "
                                  f"differ): continuing would mix them. Use the recorded options, or delete {work} "
                                  f"and the IFL__{args.p}__fold{args.f}__round* caches to start over.")
    log = ifl.read_log(work)
    env = nnunet_environment()
    env.pop("nnUNet_ssl_pseudo_labels", None)  # each round trainer names its own round's cache

    def fold_folder(r: int) -> str:
        return os.path.join(get_output_folder(dataset, _trainer(r, args.budget), args.p, args.c), f"fold_{args.f}")

    def train_round(r: int) -> None:
        folder = fold_folder(r)
        if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
            return
        cmd = ["nnUNetv2_train", str(args.d), args.c, str(args.f), "-tr", _trainer(r, args.budget), "-p", args.p,
               "-device", args.device]
        if was_interrupted(folder):
            cmd.append("--c")  # a killed training resumes (nnU-Net refuses --c together with -pretrained_weights)
        elif r > 0:
            cmd += ["-pretrained_weights", os.path.join(fold_folder(r - 1), "checkpoint_final.pth")]
        _train(cmd, os.path.join(work, "logs", f"round{r}.train.log"), env)

    def record(entry: dict) -> None:
        nonlocal log
        log = [e for e in log if e["round"] != entry["round"]] + [entry]
        log.sort(key=lambda e: e["round"])
        ifl.write_log(work, log, header)

    print(f"ifl: {dataset} {args.c}, fold {args.f}, {len(cases)} unlabeled case(s), up to {args.rounds} round(s) "
          f"after round 0, budget {args.budget or 'nnU-Net default'}, generalist {describe_generalist(configs[0])}; "
          f"log {log_path}", flush=True)
    if args.num_parts == 1 and not any(e["round"] == 0 for e in log):
        t0 = time.time()
        print(f"== round 0: {_trainer(0, args.budget)} on the labeled cases", flush=True)
        train_round(0)
        record({"round": 0, "trainer": _trainer(0, args.budget), "validation_dice": ifl.validation_dice(
            fold_folder(0)), "agreement": None, "pseudo_label_change": None, "seconds": round(time.time() - t0)})

    device = torch.device(args.device)
    generalist = None
    images = UnlabeledImageDataset(pl.fold_unlabeled_cases(base, plans, args.c, args.f))
    for r in range(1, args.rounds + 1):
        done = next((e for e in log if e["round"] == r), None)
        if done is not None:
            if done.get("converged"):
                print(f"== converged at round {r} earlier: nothing to do", flush=True)
                break
            continue
        if not os.path.isfile(os.path.join(fold_folder(r - 1), "checkpoint_final.pth")):
            raise IFLCommandError(f"round {r} is prompted by round {r - 1}'s model, which is not trained "
                                  f"({fold_folder(r - 1)}): run this command without -part_id/-num_parts first")
        t0 = time.time()
        cache = pl.cache_folder(base, configuration["data_identifier"], ifl_cache_name(args.p, args.f, r))
        prompting = _trainer(r - 1, args.budget)
        pl.check_or_write_manifest(cache, {
            "dataset": dataset, "configuration": args.c, "plans": args.p,
            "plans_fingerprint": plans_fingerprint(plans, args.c),
            "specialist": {"trainer": prompting, "fold": args.f, "checkpoint": "checkpoint_final.pth",
                           "sha256": checkpoint_digest(dataset, prompting, args.p, args.c, [args.f],
                                                       "checkpoint_final.pth")},
            "generalist": header["generalist"], "ifl": {"round": r, **header["settings"]},
            "min_confidence": args.min_confidence, "ignore_value": pl.IGNORE})
        mine = part if args.num_parts > 1 else cases
        todo = [c for c in mine if not os.path.isfile(os.path.join(cache, f"{c}.npz"))]
        print(f"== round {r}: pseudo-labels prompted by {prompting} -> {cache}", flush=True)
        if todo:
            if generalist is None:
                # the walks of a case's classes revisit its slices: the frozen encoder's embeddings are cached (the
                # same numbers, so the cache manifest's generalist is unchanged)
                generalist = build_generalist({**configs[0], "cache_embeddings": True}).to(device).eval()
            specialist = load_specialist(dataset, prompting, args.p, args.c, [str(args.f)], "checkpoint_final.pth",
                                         device)
            try:
                ifl.run_round_cases(work, cache, r, mine, lambda case: np.asarray(images.load_case(case)[0][:]),
                                    specialist, generalist, generalist.slice_axis(),
                                    RGB if generalist.config.image_channel == RGB else
                                    single_image_channel(generalist.config, "ifl"),
                                    settings, progress=lambda m: print(m, flush=True))
            except GeneralistConfigError as e:
                raise IFLCommandError(str(e)) from e
        if args.num_parts > 1:
            print(f"part {args.part_id + 1}/{args.num_parts} of round {r} done; when every part is, run the command "
                  f"without -part_id/-num_parts to finish the round and train it", flush=True)
            return 0
        ifl.forget_old_rounds(work, r + 1, args.history)  # round r + 1 looks back at rounds r+1-history..r
        change = None
        if r >= 2:
            previous = pl.cache_folder(base, configuration["data_identifier"], ifl_cache_name(args.p, args.f, r - 1))
            change = ifl.pseudo_label_change(previous, cache, cases, _num_classes(base))
        print(f"== round {r}: training {_trainer(r, args.budget)} (warm start from round {r - 1})", flush=True)
        train_round(r)
        converged = change is not None and change >= args.converged
        record({"round": r, "trainer": _trainer(r, args.budget), "validation_dice": ifl.validation_dice(
            fold_folder(r)), "agreement": ifl.round_agreement(work, r, cases), "pseudo_label_change": change,
            "converged": converged, "seconds": round(time.time() - t0)})
        entry = log[-1]
        print(f"== round {r} done: validation Dice {entry['validation_dice']}, pseudo-label vs nnU-Net "
              f"{entry['agreement']:.3f}" + (f", vs previous round {change:.3f}" if change is not None else ""),
              flush=True)
        if converged:
            print(f"== converged: round {r}'s pseudo-labels agree with round {r - 1}'s (Dice {change:.3f} >= "
                  f"{args.converged})", flush=True)
            break
    final = max(e["round"] for e in log) if log else 0
    print(f"done: the final model is round {final}'s: nnUNetv2_predict -d {args.d} -c {args.c} -p {args.p} "
          f"-f {args.f} -tr {_trainer(final, args.budget)} -i INPUT -o OUTPUT; rounds in {log_path} and "
          f"{os.path.join(work, ifl.PLOT_FILE)}", flush=True)
    return 0


def _num_classes(base: str) -> int:
    from batchgenerators.utilities.file_and_folder_operations import load_json

    labels = load_json(os.path.join(base, "dataset.json"))["labels"]
    return len({v for v in labels.values() if isinstance(v, int)})
