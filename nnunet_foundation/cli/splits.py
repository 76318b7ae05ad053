"""``nnunet-foundation make-splits``: label-scarcity folds in nnU-Net's splits_final.json."""
from __future__ import annotations

import argparse
import json
import os
import sys


def run(args) -> int:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_foundation.splits import (CaseDomains, SplitError, draw_test_cases, draw_test_cases_by_group,
                                          format_fold_table, labeled_cases, make_label_scarcity_splits,
                                          parse_domain_fractions, raw_dataset_folder, write_splits)

    try:
        try:
            dataset_name = maybe_convert_to_dataset_name(args.d)
        except RuntimeError as e:
            raise SplitError(f"dataset {args.d!r} not found: {e}") from None
        base = os.path.join(nnUNet_preprocessed.require(), dataset_name)
        cases = labeled_cases(base)
        if sum(map(bool, (args.test_list, args.test_cases, args.test_fraction))) > 1:
            raise SplitError("--test-cases, --test-list and --test-fraction exclude each other")
        domains = None
        if args.test_fraction or args.labeled_domain:
            domains = CaseDomains.load(raw_dataset_folder(base))
            domains.check_covers(cases)
        if args.test_list:
            with open(args.test_list) as f:
                test = sorted(json.load(f))
        elif args.test_fraction:
            test = draw_test_cases_by_group(cases, domains, parse_domain_fractions(args.test_fraction),
                                            args.test_seed)
        else:
            test = draw_test_cases(cases, args.test_cases, args.test_seed)
        labeled_from = None
        if args.labeled_domain:
            domains.check_names(args.labeled_domain, "--labeled-domain")
            labeled_from = domains.cases_of(args.labeled_domain, cases)
        available = len(set(cases if labeled_from is None else labeled_from) - set(test))
        counts = list(args.num_labeled or [])
        counts += [max(1, round(f * available)) for f in (args.fraction or [])]
        num_val = args.num_val
        if args.val_fraction is not None:
            if not 0 < args.val_fraction < 1:
                raise SplitError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
            num_val = max(1, round(args.val_fraction * available))
        folds, infos = make_label_scarcity_splits(cases, counts, args.seeds, num_val, test, args.with_full,
                                                  labeled_from=labeled_from, other_seeds_at=args.other_seeds_at)
        request = {k: v for k, v in vars(args).items() if k != "func"}
        written = write_splits(base, folds, infos, test, force=args.force, request=request)
    except (SplitError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_fold_table(folds, infos))
    if test:
        per_domain = ""
        if domains is not None:
            counts_by_domain = {d: len(domains.cases_of([d], test)) for d in domains.names}
            per_domain = " (" + ", ".join(f"{d} {n}" for d, n in counts_by_domain.items()) + ")"
        print(f"held-out test cases: {len(test)}{per_domain} (in no fold) -> {written['test']}")
    if "backup" in written:
        print(f"previous splits kept as {written['backup']}")
    print(f"wrote {written['splits']} and {written['info']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "make-splits", help="write label-scarcity folds (train / unlabeled / val) into splits_final.json",
        description="Write nnU-Net's splits_final.json for a fully labeled, preprocessed dataset so that each fold "
                    "keeps the labels of a few cases ('train'), hides those of the other training cases "
                    "('unlabeled': semi-supervised trainers read their images only) and validates on 'val'. One "
                    "fold per (labeled count, seed), in that order; per seed the validation cases are shared and "
                    "the labeled sets nested. Plain nnUNetTrainer on a fold is the labeled-only baseline. An "
                    "existing, different splits_final.json is only replaced with --force (a backup is kept). For "
                    "multi-domain datasets made by convert-2d (domains.json), --test-fraction holds out whole groups "
                    "per domain and --labeled-domain restricts labeled and validation cases to some domains.",
        epilog="examples:\n"
               "  nnunet-foundation make-splits -d 4 --num-labeled 2 4 --seeds 0 1 --num-val 4\n"
               "  nnunet-foundation make-splits -d 4 --fraction 0.05 --test-cases 40 --with-full\n"
               "  nnunet-foundation make-splits -d 150 --num-labeled 2 4 8 --test-fraction kvasir=0.25 cvc=0.33 \\\n"
               "      --labeled-domain kvasir     (test: 25% of kvasir cases, a third of cvc's sequences)\n"
               "then: nnUNetv2_train 4 3d_fullres FOLD -tr nnUNetTrainerMeanTeacher (fold numbers as printed)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("--num-labeled", type=int, nargs="+", help="labeled training cases per fold (one or more)")
    p.add_argument("--fraction", type=float, nargs="+",
                   help="labeled cases as a fraction of the non-test cases (one or more)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one set of folds per seed (default: 0)")
    p.add_argument("--other-seeds-at", type=int, nargs="+", metavar="N",
                   help="seeds after the first only at these labeled counts (default: every count)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--num-val", type=int, default=2, help="validation cases per seed (default: 2)")
    val.add_argument("--val-fraction", type=float,
                     help="validation cases per seed as a fraction of the non-test cases (instead of --num-val)")
    p.add_argument("--test-cases", type=int, default=0,
                   help="hold out this many cases as a test set excluded from every fold (default: 0)")
    p.add_argument("--test-list", help="JSON file with a list of case ids to hold out instead")
    p.add_argument("--test-fraction", nargs="+", metavar="DOMAIN=FRACTION",
                   help="hold out this fraction of a domain's groups (of its cases if it has none), as whole groups, "
                        "per domain of domains.json (written by convert-2d); other domains keep all their cases")
    p.add_argument("--labeled-domain", nargs="+", metavar="DOMAIN",
                   help="draw labeled and validation cases from these domains only; the other domains' non-test "
                        "cases are unlabeled in every fold (labeled in the --with-full fold)")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the held-out test draw (default: 0)")
    p.add_argument("--with-full", action="store_true",
                   help="add a fully supervised fold per seed (upper bound: all non-val, non-test cases labeled)")
    p.add_argument("--force", action="store_true", help="replace a different existing splits_final.json")
    p.set_defaults(func=run)
