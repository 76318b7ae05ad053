#!/usr/bin/env python
"""Cost of each generalist backend per nnU-Net patch, and its share of a semi-supervised training iteration.

    python benchmarks/foundation_cost.py --patch-size 40 56 40 --batch 7 --classes 3 --device cuda \
        --mt-iteration-s 0.034          # Mean Teacher s/iteration from benchmarks/trainer_cost.py, same machine

Each backend is built with randomly initialised weights of the real architecture (ViT-B for SAM/MedSAM, Hiera-T for
SAM2; ``--tiny`` for the small test models), frozen, on the device, and called the way nnUNetTrainerSemiSAM calls it:
one batch of patches (nnU-Net-like intensities) plus a specialist softmax with one confident blob per foreground
class in the middle of the patch, so that the prompted slices are those the blob covers (``--prompted-fraction``).
Weights do not change the cost, so random ones measure what a downloaded checkpoint would cost. Prints a Markdown
table (ms per call, ms per patch, encoder images per call, share = generalist / (MT iteration + generalist));
``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

BACKENDS = {
    "sam": {"backend": "sam", "model_type": "vit_b"},
    "sam_stitch": {"backend": "sam", "model_type": "vit_b", "stitch": True},
    "medsam": {"backend": "medsam", "model_type": "vit_b"},
    "sam2": {"backend": "sam2", "model_type": "hiera_t"},
    "sam2_video": {"backend": "sam2_video", "model_type": "hiera_t"},
    # the real LiteMedSAM weights (bundled); 'precision' compares CPU bfloat16 (auto where native) with float32
    "litemedsam": {"backend": "litemedsam"},
    "litemedsam_fp32": {"backend": "litemedsam", "precision": "float32"},
    "litemedsam_stitch": {"backend": "litemedsam", "stitch": True},
}
#: backends that have no tiny test model (their real weights are small enough to measure as they are)
REAL_ONLY = ("litemedsam", "litemedsam_fp32", "litemedsam_stitch")


def specialist_softmax(batch, classes, patch, fraction):
    """A softmax with one confident centred box per foreground class covering ``fraction`` of each axis."""
    import torch

    probs = torch.zeros(batch, classes, *patch)
    probs[:, 0] = 1.0
    for k in range(1, classes):
        region = tuple(slice(int(s * (0.5 - fraction / 2)) + (k - 1), max(int(s * (0.5 + fraction / 2)) - (k - 1),
                                                                           int(s * (0.5 - fraction / 2)) + k))
                       for s in patch)
        probs[(slice(None), 0) + region] = 0.0
        probs[(slice(None), k) + region] = 1.0
    return probs


def measure(name, config, args):
    import torch

    from nnunet_foundation.foundation import build_generalist

    device = torch.device(args.device)
    config = {**config, "allow_random_init": True}
    if args.tiny and name not in REAL_ONLY:
        config["model_type"] = "tiny"
    if len(args.patch_size) == 3:
        config["spacing"] = args.spacing or [1.0, 1.0, 1.0]
    generalist = build_generalist(config).to(device)
    images = torch.randn(args.batch, 1, *args.patch_size, device=device)
    probs = specialist_softmax(args.batch, args.classes, args.patch_size, args.prompted_fraction).to(device)
    for _ in range(args.warmup):
        generalist(images, probs)
    seconds, encoded = [], 0
    for _ in range(args.iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generalist(images, probs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        encoded = out.num_encoded
    per_call = sorted(seconds)[len(seconds) // 2]  # median: robust to a stray slow call
    row = {"backend": name, "model_type": generalist.config.model_type, "ms_per_call": 1000 * per_call,
           "ms_per_patch": 1000 * per_call / args.batch, "encoder_images_per_call": encoded}
    if args.mt_iteration_s:
        row["share_of_iteration"] = per_call / (args.mt_iteration_s + per_call)
        row["x_mean_teacher_iteration"] = (args.mt_iteration_s + per_call) / args.mt_iteration_s
    del generalist
    if device.type == "cuda":
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--backends", nargs="+", default=["sam", "sam_stitch", "medsam", "sam2", "sam2_video"],
                   choices=sorted(BACKENDS), help="backends to measure (default: all)")
    p.add_argument("--patch-size", type=int, nargs="+", default=[40, 56, 40],
                   help="patch size, 3 values (3d) or 2 (2d); default: Hippocampus 3d_fullres 40 56 40")
    p.add_argument("--spacing", type=float, nargs=3, help="voxel spacing (picks the slicing axis; default isotropic)")
    p.add_argument("--batch", type=int, default=2, help="patches per call (the unlabeled batch size; default 2)")
    p.add_argument("--classes", type=int, default=3, help="classes including background (default 3)")
    p.add_argument("--prompted-fraction", type=float, default=0.5,
                   help="fraction of each axis the specialist's objects cover (default 0.5)")
    p.add_argument("--device", default="cuda", help="cuda or cpu (default cuda)")
    p.add_argument("--tiny", action="store_true", help="use the tiny test models (CPU smoke runs)")
    p.add_argument("--iterations", type=int, default=5, help="timed calls (default 5; the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    p.add_argument("--mt-iteration-s", type=float,
                   help="Mean Teacher seconds per iteration on this machine (benchmarks/trainer_cost.py), for the "
                        "generalist's share of a SemiSAM iteration")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if len(args.patch_size) not in (2, 3):
        p.error("--patch-size takes 2 or 3 values")

    import torch

    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    rows = []
    for name in args.backends:
        print(f"[{len(rows) + 1}/{len(args.backends)}] {name} ...", flush=True)
        try:
            rows.append(measure(name, BACKENDS[name], args))
        except ImportError as e:  # an optional backend package that is not installed
            print(f"    skipped: {e}")
            continue
        print(f"    {rows[-1]['ms_per_call']:.1f} ms per call", flush=True)
    print(f"\nGeneralist cost: patch {'x'.join(map(str, args.patch_size))}, batch {args.batch}, {args.classes} "
          f"classes, objects over {args.prompted_fraction:.0%} of each axis, {'tiny' if args.tiny else 'released-size'}"
          f" random weights (LiteMedSAM: its real weights), device {args.device} ({device_name}; torch "
          f"{torch.__version__})")
    header = "| backend | model | ms/call | ms/patch | encoder images/call |"
    rule = "|---|---|---|---|---|"
    if args.mt_iteration_s:
        header += " share of a SemiSAM iteration | SemiSAM / MT iteration |"
        rule += "---|---|"
    print(header + "\n" + rule)
    for r in rows:
        line = (f"| {r['backend']} | {r['model_type']} | {r['ms_per_call']:.1f} | {r['ms_per_patch']:.1f} | "
                f"{r['encoder_images_per_call']} |")
        if args.mt_iteration_s:
            line += f" {r['share_of_iteration']:.0%} | {r['x_mean_teacher_iteration']:.2f}x |"
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "device": device_name, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
