#!/usr/bin/env python
"""Cost of each trainer per training iteration, relative to the stock nnUNetTrainer under the same plans.

    python benchmarks/trainer_cost.py -d 4 -c 3d_fullres -f 0 --trainers nnUNetTrainerMeanTeacher nnUNetTrainerCPS

For each trainer, one worker process (so peak memory is per trainer) builds the trainer exactly as nnUNetv2_train
does (get_trainer_from_args), starts its data streams, pre-fetches batches, and times `train_step` on them after a
warm-up: data loading is excluded from the step time and reported separately (time to draw one labeled and one
unlabeled batch). Labeled and unlabeled batch sizes are equal (the unlabeled batch size setting's default).
Memory: peak CUDA memory allocated on a GPU; on the CPU the worker's peak resident set size (whole process: model,
optimiser, activations and data), which is comparable between trainers only in the same run.

Needs a preprocessed dataset whose fold has unlabeled data (a make-splits fold with an 'unlabeled' list, or
preprocessed imagesUnlabeled scans). Output folders of the trainers go to a temporary nnUNet_results, so existing
results are never touched. Prints a Markdown table; --json writes the numbers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

DEFAULT_TRAINERS = ["nnUNetTrainerMeanTeacher", "nnUNetTrainerUAMT", "nnUNetTrainerCPS"]
BASELINE = "nnUNetTrainer"


def machine_description(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        hw = torch.cuda.get_device_name(0)
    else:
        hw = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                hw = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            pass
        hw += f", {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{hw}; torch {torch.__version__}"


def worker(args) -> dict:
    """Runs in a fresh process: measure one trainer."""
    import resource

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    device = torch.device(args.device)
    fold = "all" if args.f == "all" else int(args.f)
    trainer = get_trainer_from_args(args.d, args.c, fold, args.trainer, device=device)
    if args.batch_size:
        trainer.configuration_manager.configuration["batch_size"] = args.batch_size
    trainer.on_train_start()
    ssl = hasattr(trainer, "dataloader_unlabeled")

    # pre-fetch, and time the data streams on the way
    t0 = time.perf_counter()
    labeled = [next(trainer.dataloader_train) for _ in range(args.prefetch)]
    unlabeled = [next(trainer.dataloader_unlabeled) for _ in range(args.prefetch)] if ssl else []
    data_seconds = (time.perf_counter() - t0) / args.prefetch
    if ssl:
        trainer.dataloader_unlabeled = itertools.cycle(unlabeled)
    batches = itertools.cycle(labeled)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    trainer.network.train()
    for _ in range(args.warmup):
        trainer.train_step(next(batches))
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.iterations):
        trainer.train_step(next(batches))
    sync()
    step_seconds = (time.perf_counter() - t0) / args.iterations
    if device.type == "cuda":
        memory_mb = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    result = {"trainer": args.trainer, "seconds_per_iteration": step_seconds, "memory_mb": memory_mb,
              "data_seconds_per_batch": data_seconds, "batch_size": trainer.batch_size,
              "unlabeled_batch_size": getattr(trainer, "unlabeled_batch_size", 0),
              "patch_size": list(trainer.configuration_manager.patch_size)}
    for loader in ("dataloader_train", "dataloader_val"):
        if hasattr(getattr(trainer, loader, None), "_finish"):
            getattr(trainer, loader)._finish()
    return result


def format_table(rows: list, header: str) -> str:
    base = next((r for r in rows if r["trainer"] == BASELINE), None)
    lines = [header, "",
             "| trainer | s/iteration | x nnUNetTrainer | peak memory (MB) | x nnUNetTrainer | data s/batch | "
             "batch (labeled + unlabeled) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel_t = r["seconds_per_iteration"] / base["seconds_per_iteration"] if base else float("nan")
        rel_m = r["memory_mb"] / base["memory_mb"] if base else float("nan")
        lines.append(f"| {r['trainer']} | {r['seconds_per_iteration']:.3f} | {rel_t:.2f} | {r['memory_mb']:.0f} | "
                     f"{rel_m:.2f} | {r['data_seconds_per_batch']:.3f} | {r['batch_size']} + "
                     f"{r['unlabeled_batch_size']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", required=True, help="dataset id or name (preprocessed)")
    p.add_argument("-c", default="3d_fullres", help="configuration (default: 3d_fullres)")
    p.add_argument("-f", default="0", help="fold whose split provides the unlabeled cases (default: 0)")
    p.add_argument("--trainers", nargs="+", default=DEFAULT_TRAINERS,
                   help=f"trainers to compare with {BASELINE} (default: {' '.join(DEFAULT_TRAINERS)})")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per trainer (default: 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default: 2)")
    p.add_argument("--prefetch", type=int, default=4, help="batches pre-fetched and cycled (default: 4)")
    p.add_argument("--batch-size", type=int, default=0, help="labeled batch size (default: the plan's)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu", help="cpu or cuda (default: cuda if present)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--worker", dest="trainer", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.trainer:  # worker mode
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return 0

    trainers = [BASELINE] + [t for t in args.trainers if t != BASELINE]
    rows = []
    with tempfile.TemporaryDirectory(prefix="trainer_cost_") as results:
        env = dict(os.environ, nnUNet_results=results)
        for i, trainer in enumerate(trainers, 1):
            print(f"[{i}/{len(trainers)}] {trainer} ...", file=sys.stderr, flush=True)
            own_args = sys.argv[1:] if argv is None else list(argv)
            cmd = [sys.executable, os.path.abspath(__file__), *own_args, "--worker", trainer]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"error: {trainer} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(line[len("RESULT "):]))
            print(f"    {rows[-1]['seconds_per_iteration']:.3f} s/iteration", file=sys.stderr, flush=True)
    header = (f"Trainer cost: dataset {args.d}, {args.c}, fold {args.f}, {args.iterations} timed iterations after "
              f"{args.warmup} warm-up, device {args.device} ({machine_description(args.device)})")
    print(format_table(rows, header))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
    return 0


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
