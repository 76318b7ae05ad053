"""WeakMedSAM's prompt affinity mining in isolation: does the random walk on LiteMedSAM's point-prompt affinities
turn a CAM into the object? (issue 18)

The walk is fed seeds made from the ground truth, so that only the affinity is measured, not the classifier:
  narrow  a disc at the object's centroid, radius a quarter of the object's equivalent side (a CAM that fires on
          the object's most typical part only);
  broad   the object's mask shifted by 3 cells and blurred with sigma 4 cells (a CAM that overflows the object).
For each seed the walk (radius 5, beta 4, 4 steps, min-max after each: the method's defaults) runs on the affinity of
each prompt map (``affinity.prompt_response_map``: the 4 x 4 point prompts' summed probabilities, ours, or their
summed raw logits, the released code's), and the walked map thresholded at 0.5 is scored against the mask on the
64 x 64 embedding grid. "seed alone" is the seed thresholded at 0.5 (what the walk must improve on).

    python benchmarks/weakmedsam_affinity.py --images ../shared/data/Polyps/Kvasir-SEG/images \\
        --masks ../shared/data/Polyps/Kvasir-SEG/masks --count 24 --output docs/benchmarks/weakmedsam_affinity

Writes results.json, affinity.md and affinity.png to --output. Images are taken in sorted file-name order.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

GRID = 64  # LiteMedSAM's embedding grid, where the affinity lives
SEEDS = ("narrow", "broad")


def model_input(image: np.ndarray, size: int = 256):
    """RGB ``(h, w, 3)`` -> LiteMedSAM's input: longest side ``size``, intensities min-max to [0, 1], padded
    bottom/right; returns it and the resized ``(h, w)``."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    x = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    return F.pad(x, (0, size - nw, 0, size - nh)), (nh, nw)


def mask_on_grid(mask: np.ndarray, resized, size: int = 256) -> torch.Tensor:
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, size=resized, mode="bilinear", align_corners=False)
    m = F.pad(m, (0, size - resized[1], 0, size - resized[0]))
    return F.adaptive_avg_pool2d(m, GRID)[0, 0] > 0.5


def seed_maps(object_mask: torch.Tensor) -> dict:
    from nnunet_foundation.methods.weakmedsam import affinity as aff

    yy, xx = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    cy, cx = [float(v.float().mean()) for v in torch.nonzero(object_mask, as_tuple=True)]
    radius = max(2.0, 0.25 * float(object_mask.sum()) ** 0.5)
    narrow = (((yy - cy) ** 2 + (xx - cx) ** 2) < radius ** 2).float()[None]
    broad = aff.min_max(aff.gaussian_blur(torch.roll(object_mask.float(), (3, 3), (0, 1))[None], 4.0))
    return {"narrow": narrow, "broad": broad}


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="folder of RGB images")
    p.add_argument("--masks", required=True, help="folder of binary masks with the images' names (any extension)")
    p.add_argument("--count", type=int, default=24, help="images measured (sorted by name)")
    p.add_argument("--output", required=True, help="folder for results.json, affinity.md, affinity.png")
    args = p.parse_args(argv)

    from PIL import Image

    from nnunet_foundation.foundation.config import build_generalist
    from nnunet_foundation.methods.weakmedsam import affinity as aff

    masks = {os.path.splitext(f)[0]: os.path.join(args.masks, f) for f in os.listdir(args.masks)}
    names = sorted(f for f in os.listdir(args.images) if os.path.splitext(f)[0] in masks)[:args.count]
    if not names:
        p.error(f"no image in {args.images} has a mask in {args.masks}")
    generalist = build_generalist({"backend": "litemedsam"})
    rows, started = [], time.time()
    for i, name in enumerate(names):
        image = np.asarray(Image.open(os.path.join(args.images, name)).convert("RGB"))
        gt = np.asarray(Image.open(masks[os.path.splitext(name)[0]]).convert("L")) > 127
        x, resized = model_input(image)
        with torch.no_grad():
            embedding = generalist.encode(x)
            points = aff.uniform_point_grid(resized[0], resized[1], 4)[:, None, :]
            labels = torch.ones(points.shape[0], 1, dtype=torch.int)
            answers, _ = generalist._decode(embedding.expand(points.shape[0], -1, -1, -1), points, labels, None, None)
        target = mask_on_grid(gt, resized)
        row = {"image": name, "object_cells": int(target.sum())}
        for seed_name, seed in seed_maps(target).items():
            row[f"{seed_name}/seed alone"] = dice(seed[0] > 0.5, target)
            for kind in aff.PROMPT_MAPS:
                summed = F.adaptive_avg_pool2d(aff.prompt_response_map(answers, kind)[None], GRID)[0]
                affinity = aff.affinity_matrix(summed, 5.0)
                neighbours = aff.neighbourhood(GRID, GRID, 5.0) & ~torch.eye(GRID * GRID, dtype=torch.bool)
                row[f"median neighbour affinity/{kind}"] = float(affinity[neighbours].median())
                walked = aff.random_walk(seed, aff.transition_matrix(affinity, 4.0), 4)[0]
                row[f"{seed_name}/walk on {kind}"] = dice(walked > 0.5, target)
        rows.append(row)
        print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()
                                                            if k.startswith(SEEDS)), flush=True)

    columns = [k for k in rows[0] if "/" in k]
    means = {k: float(np.mean([r[k] for r in rows])) for k in columns}
    os.makedirs(args.output, exist_ok=True)
    meta = {"images": args.images, "count": len(rows), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "seconds": round(time.time() - started, 1),
            "command": "python benchmarks/weakmedsam_affinity.py " + " ".join(argv or sys.argv[1:])}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump({"meta": meta, "mean": means, "per_image": rows}, f, indent=1)
    lines = [f"Mean over {len(rows)} images ({args.images}); Dice on the 64 x 64 embedding grid.", "",
             "| seed | seed alone | walk on probabilities (ours) | walk on logits (released code) |", "|---|---|---|---|"]
    for seed_name in SEEDS:
        lines.append(f"| {seed_name} | {means[f'{seed_name}/seed alone']:.3f} | "
                     f"{means[f'{seed_name}/walk on probabilities']:.3f} | {means[f'{seed_name}/walk on logits']:.3f} |")
    lines += ["", "| prompt map | median affinity between neighbouring cells (mean over images) |", "|---|---|"]
    lines += [f"| {kind} | {means[f'median neighbour affinity/{kind}']:.2e} |" for kind in aff.PROMPT_MAPS]
    with open(os.path.join(args.output, "affinity.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    bars = ["seed alone", "walk on probabilities", "walk on logits"]
    for j, bar in enumerate(bars):
        values = [means[f"{s}/{bar}"] for s in SEEDS]
        ax.bar(np.arange(len(SEEDS)) + (j - 1) * 0.27, values, width=0.27, label=bar)
    ax.set_xticks(range(len(SEEDS)), [f"{s} seed" for s in SEEDS])
    ax.set_ylabel("Dice vs mask (64 x 64 grid)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Random walk on LiteMedSAM point-prompt affinity ({len(rows)} images)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.output, "affinity.png"), dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
