"""``nnunet-foundation benchmark``: labeled-only vs semi-supervised vs fully supervised, end to end."""
from __future__ import annotations

import argparse
import sys


def run(args) -> int:
    from nnunet_foundation.benchmark import Benchmark, BenchmarkError, BenchmarkSettings, write_reports
    from nnunet_foundation.benchmark.report import command_line, load_cost
    from nnunet_foundation.evaluation import EvaluationError, parse_tolerance

    settings = BenchmarkSettings(
        dataset=args.d, configuration=args.c, plans=args.p, labeled=tuple(args.labeled), seeds=tuple(args.seeds),
        other_seeds_at=tuple(args.other_seeds_at or ()),
        trainers=tuple(args.trainers), cached_trainers=tuple(args.cached_trainers or ()),
        pseudo_label_generalist=args.pseudo_label_generalist, generalist_row=args.generalist_row,
        prestage_options=tuple(args.prestage_options or ()), budget=args.budget, num_val=args.num_val,
        test_cases=20 if args.test_cases is None else args.test_cases, test_list=args.test_list,
        test_seed=args.test_seed, test_fraction=tuple(args.test_fraction or ()),
        labeled_domains=tuple(args.labeled_domain or ()), tolerance=tuple(args.tolerance or ()),
        device=args.device, output=args.output, num_processes=args.np, ema_baselines=args.ema_baselines)
    if args.test_cases is not None and (args.test_list or args.test_fraction):
        print("error: --test-cases, --test-list and --test-fraction exclude each other", file=sys.stderr)
        return 2
    modes = [m for m in ("dry_run", "print_commands", "report_only") if getattr(args, m)] + (["run"] if args.run else [])
    try:
        if len(modes) > 1:
            raise BenchmarkError("--dry-run, --print-commands, --report-only and --run exclude each other")
        parse_tolerance(settings.tolerance)  # fail on a typo now, not after the first training
        cost = load_cost(args.cost) if args.cost else None
        bench = Benchmark(settings, adopt_existing=args.adopt_existing)
        n = len(bench.runs)
        print(f"benchmark: {bench.dataset_name} {settings.configuration}, {n} runs ({len(bench.folds)} folds), budget "
              f"'{settings.budget}' ({bench.budget.description}), {len(bench.test_cases)} held-out test cases, "
              f"device {settings.device}, output {bench.output}", flush=True)

        if args.dry_run:
            # writes nothing: shows the splits' state and what each run would do
            print(f"splits_final.json: {bench.splits_status()} "
                  f"({'would be written' if bench.splits_status() == 'missing' else 'kept' if bench.splits_status() == 'same' else 'differs: needs --force'})")
            print(bench.plan_table())
            for run in bench.runs:
                print("  " + " ".join(bench.main_command(run)))
            return 0

        if args.run:
            target = bench.find_run(args.run)
            bench.verify_prepared()
            bench.check_trainers()
            bench.execute([target])
            return 0

        if not args.report_only:
            bench.check_trainers()
        bench.prepare(force=args.force)
        if args.print_commands:
            print(bench.job_script())
            return 0
        if args.report_only:
            results, missing = bench.finished_results()
        else:
            bench.execute()
            results, missing = bench.finished_results()
        if not results:
            raise BenchmarkError("no finished run to report yet")
        written = write_reports(bench, results, missing, command=command_line(args.argv) if args.argv else None,
                                cost=cost)
    except (BenchmarkError, EvaluationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = bench.output
    print(f"\nreport: {out / 'report.md'}\nresults: {out / 'results.json'}\n"
          f"plots: {', '.join(str(out / name) for name in written['plots'])}")
    if missing:
        print(f"incomplete: {len(missing)} run(s) not finished: {', '.join(r.run_id for r in missing)}")
    return 0


def register(subparsers) -> None:
    from nnunet_foundation.training.budgets import BUDGETS

    p = subparsers.add_parser(
        "benchmark", help="labeled-only vs semi-supervised vs fully supervised nnU-Net on label-scarcity splits",
        description="For a fully labeled, planned and preprocessed dataset: write label-scarcity splits (one fold "
                    "per labeled count and seed, one fully supervised fold per seed, a held-out test set in no "
                    "fold), train nnUNetTrainerEMA_<budget> (nnU-Net's training, exporting an EMA of its "
                    "weights; nnUNetTrainer_<budget> with --no-ema-baselines) on the labeled cases only (lower "
                    "bound), each "
                    "semi-supervised trainer <T>_<budget> on the same labeled cases plus the fold's unlabeled ones, "
                    "and the same baseline trainer on all labels (upper bound) with nnUNetv2_train; predict the test "
                    "cases with nnUNetv2_predict (final checkpoint); score Dice, HD95 and NSD; write report.md, "
                    "results.json and PNG plots to --output. Finished runs are skipped and interrupted trainings "
                    "resumed (--c): after an interruption, run the same command again. The raw dataset is only "
                    "read; an existing, different splits_final.json is only replaced with --force (backup kept).",
        epilog="examples:\n"
               "  nnunet-foundation benchmark -d 4 -c 3d_fullres --labeled 2 4 8 --seeds 0 1 --test-cases 40 \\\n"
               "      --num-val 4 --trainers nnUNetTrainerMeanTeacher nnUNetTrainerCPS --budget cpu500 \\\n"
               "      --device cpu --output bench_hippocampus\n"
               "  nnunet-foundation benchmark -d 150 -c 2d --labeled 2 4 8 --test-fraction kvasir=0.25 cvc=0.33 \\\n"
               "      --labeled-domain kvasir ...   (multi-domain dataset from convert-2d: per-domain test metrics)\n"
               "  ... --dry-run            show the runs and their state, write nothing\n"
               "  ... --print-commands     prepare splits and test data, print one job line per run (cluster)\n"
               "  ... --report-only        report the finished runs, train nothing\n"
               f"budgets: {', '.join(BUDGETS)} (docs/benchmarking.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name (fully labeled, planned and preprocessed)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default: 3d_fullres)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--labeled", type=int, nargs="+", default=[2, 4],
                   help="labeled training cases per fold, one fold per count and seed (default: 2 4)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="split seeds (default: 0)")
    p.add_argument("--other-seeds-at", type=int, nargs="+", metavar="N",
                   help="seeds after the first only at these labeled counts, to afford a second seed where it "
                        "matters (default: every count); each seed keeps its fully supervised run")
    p.add_argument("--trainers", nargs="*", default=["nnUNetTrainerMeanTeacher"],
                   help="semi-supervised trainers, without budget suffix (default: nnUNetTrainerMeanTeacher; "
                        "'--trainers' alone: none, for a benchmark of --cached-trainers only); nnUNetTrainerEMA (or "
                        "nnUNetTrainer with --no-ema-baselines) always runs as lower and upper bound. A trainer "
                        "that fine-tunes a SAM of its own (nnUNetTrainerSCSAM, nnUNetTrainerSynFoC) adds a row of "
                        "that SAM (TRAINER+sam: predict-sam-student after its run, no training)")
    p.add_argument("--cached-trainers", nargs="+", metavar="TRAINER",
                   help="trainers that learn from an offline generalist cache (setting 'pseudo_labels', e.g. "
                        "nnUNetTrainerSemiSAM): per scarce fold, the fold's labeled-only model prompts the generalist "
                        "once (nnunet-foundation pseudo-label, cache <labeled-only trainer>__<plans>__fold<F>), then "
                        "they train; the generalist's time is reported apart. A trainer with its own pre-stage "
                        "makes its own cache instead (nnUNetTrainerSFR: nnunet-foundation sfr --pseudo-labels, cache "
                        "SFR__<plans>__fold<F>). A trainer is either here or in --trainers")
    p.add_argument("--pseudo-label-generalist", metavar="JSON",
                   help="generalist configuration of that cache, of --generalist-row and of SFR's pre-stage (JSON "
                        "object or file; "
                        "default: pseudo-label's, LiteMedSAM)")
    p.add_argument("--prestage-options", nargs="+", metavar="TRAINER=OPTIONS",
                   help="extra options of a trainer's per-fold pre-stage, run before its training (nnUNetTrainerSFR: "
                        "nnunet-foundation sfr, e.g. 'nnUNetTrainerSFR=--iterations 300 --plus'); the pre-stage's "
                        "time is reported with the generalist's")
    p.add_argument("--generalist-row", action="store_true",
                   help="per scarce fold, also score the generalist alone on the test set, prompted by the fold's "
                        "labeled-only model (nnunet-foundation predict-generalist after that run; no training): "
                        "what the foundation model brings, and what it inherits from its prompter")
    p.add_argument("--budget", default="cpu500",
                   help=f"training budget suffix, the same for every run (default: cpu500; one of {', '.join(BUDGETS)})")
    p.add_argument("--num-val", type=int, default=2, help="validation cases per seed (default: 2)")
    p.add_argument("--test-cases", type=int,
                   help="held-out test cases drawn from the labeled cases (default: 20)")
    p.add_argument("--test-list", help="JSON list of case ids to hold out instead of drawing them")
    p.add_argument("--test-fraction", nargs="+", metavar="DOMAIN=FRACTION",
                   help="instead: hold out this fraction of each named domain's groups (whole groups, e.g. video "
                        "sequences; single cases in a domain without groups), from the dataset's domains.json "
                        "(convert-2d); the report then also gives the test metrics per domain")
    p.add_argument("--test-seed", type=int, default=0, help="seed of the test-case draw (default: 0)")
    p.add_argument("--labeled-domain", nargs="+", metavar="DOMAIN",
                   help="draw labeled and validation cases from these domains only (in-domain); the non-test cases "
                        "of the other domains are unlabeled in every scarce fold and labeled in the fully "
                        "supervised one (default: all domains)")
    p.add_argument("--tolerance", nargs="+", metavar="MM|CLASS=MM",
                   help="NSD tolerance in mm (pixels for PNG/JPEG/BMP images), for all classes and/or per class "
                        "label value (default: 1.0)")
    p.add_argument("--no-ema-baselines", dest="ema_baselines", action="store_false",
                   help="train the labeled-only and fully supervised runs with nnUNetTrainer_<budget>, which exports "
                        "its last weights, instead of nnUNetTrainerEMA_<budget>, which exports an EMA of its weights "
                        "like the teacher-based methods export their EMA teacher (default: EMA)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"], help="training device (default: cpu)")
    p.add_argument("-np", type=int, default=1,
                   help="prediction/evaluation worker processes (default: 1; 0: none - nnU-Net's sequential "
                        "prediction, quickest for a few test cases on a CPU)")
    p.add_argument("--output", default="benchmark", help="folder for test data, predictions, logs and reports "
                                                         "(default: ./benchmark)")
    p.add_argument("--cost", help="trainer_cost.py --json output to include as a cost table")
    p.add_argument("--dry-run", action="store_true", help="show the plan and each run's state; write nothing")
    p.add_argument("--print-commands", action="store_true",
                   help="prepare splits and test data, then print a job script: one self-contained command per run")
    p.add_argument("--run", metavar="RUN_ID", help="train, predict and evaluate this run only (a job line of "
                                                   "--print-commands)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    p.add_argument("--force", action="store_true",
                   help="replace a different existing splits_final.json (a timestamped backup is kept)")
    p.add_argument("--adopt-existing", action="store_true",
                   help="accept nnU-Net training folders that exist without this benchmark's record (only if they "
                        "were trained on the current splits_final.json folds)")
    p.set_defaults(func=_with_argv(run))


def _with_argv(func):
    """Keep the command line as typed, for the report."""
    def wrapper(args):
        # in-process calls (main([...])) have someone else's sys.argv: the report then shows the canonical command
        args.argv = list(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("nnunet-foundation") else None
        return func(args)
    return wrapper
