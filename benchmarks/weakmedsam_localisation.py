"""Where does WeakMedSAM lose its pseudo-masks? Localisation of its maps on the slices that contain a class.

For some weak cases of a ``weak-labels run`` output dataset (its classifier and settings, read from
``weakmedsam_work``), recomputes per slice the plain CAM (parent head on the embedding, min-max over the image) and the
refined map the pseudo-masks are thresholded from (walk, upsampling, blur), and scores both against the hidden masks
on the slices whose slice label contains the class:

- ROC AUC over the pixels of those slices: 0.5 = the map ranks object pixels no higher than the rest (no threshold
  can then give a good mask), 1 = perfect ranking;
- the Dice at the threshold used (``settings.threshold``) and the best Dice over thresholds 0.1-0.95 - an oracle
  that reads the masks, reported only to tell a bad threshold from a bad map; never use it to pick settings.

    python benchmarks/weakmedsam_localisation.py --pseudo $nnUNet_raw/Dataset542_HippocampusWeakStudyWeakMedSAM \\
        --source $nnUNet_raw/Dataset541_HippocampusWeakStudySliceLabels \\
        --truth $nnUNet_raw/Dataset540_HippocampusWeakStudy --cases 6 [--json FILE]

Recomputing costs what the pseudo-mask stage cost for those cases (LiteMedSAM on two CPU cores: about 45 s a case of
35 slices).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from nnunet_foundation.evaluation import dice_coefficient as dice
import torch
import torch.nn.functional as F


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney form of the ROC AUC (ties count half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pseudo", required=True, help="output dataset of weak-labels run")
    parser.add_argument("--source", required=True, help="its source dataset (images + imageLabelsTr.json)")
    parser.add_argument("--truth", required=True, help="dataset with the hidden masks in labelsTr")
    parser.add_argument("--cases", type=int, default=6, help="first N weak cases (default 6)")
    parser.add_argument("--generalists", default='{"backend": "litemedsam"}',
                        help="the generalist configuration the run was made with (default LiteMedSAM)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from nnunet_foundation.foundation.geometry import resize_from_model
    from nnunet_foundation.methods.weakmedsam.classifier import content_cells
    from nnunet_foundation.methods.weakmedsam.pipeline import WeakDataset, WeakMedSAMRun, WeakMedSAMSettings
    from nnunet_foundation.methods.weakmedsam.weak_labels import reader_writer

    with open(os.path.join(args.pseudo, "weakmedsam_work", "manifest.json")) as f:
        manifest = json.load(f)
    source = WeakDataset(args.source)
    settings = WeakMedSAMSettings.from_dict(manifest["settings"])
    generalist = json.loads(args.generalists)
    run = WeakMedSAMRun(source, args.pseudo, generalist, settings, log=lambda m: None)
    run.train_classifier({}, [])  # loads classifier.pt; refuses nothing, trains nothing
    model = run.classifier()
    ending = source.ending
    io = None
    maps = {"cam": {c: [] for c in source.classes}, "refined": {c: [] for c in source.classes}}
    truths = {c: [] for c in source.classes}
    cases = source.weak[:args.cases]
    for case in cases:
        path = os.path.join(args.truth, "labelsTr", case + ending)
        io = io or reader_writer(source.dataset_json, path)
        truth = np.moveaxis(np.asarray(io.read_seg(path)[0][0]), source.axis, 0)
        slices, _, _ = source.slices(case, single_channel(generalist))
        for i, image in enumerate(torch.from_numpy(slices)):
            label = source.weak_labels[case][i]
            if not label:
                continue
            with torch.no_grad():
                embedding, geometry = model.embed(image[None])
                rows, cols = content_cells(geometry, embedding.shape[-2:])
                logits = model.parent_head(embedding)[0]
                cam = torch.zeros_like(logits)
                cam[:, :rows, :cols] = model.cams(embedding[..., :rows, :cols])[0]
                up = F.interpolate(cam[None], size=(geometry.target,) * 2, mode="bilinear", align_corners=False)
                plain = resize_from_model(up, geometry)[0].numpy()
            refined, _, _ = run.slice_maps(image, label)
            for k, c in enumerate(source.classes):
                if c in label:
                    maps["cam"][c].append(plain[k].ravel())
                    maps["refined"][c].append(refined[k].numpy().ravel())
                    truths[c].append((truth[i] == c).ravel())
        print(f"{case}: {len(slices)} slice(s)", flush=True)
    names = {int(v): k for k, v in source.dataset_json["labels"].items() if not isinstance(v, list)}
    result = {"cases": cases, "settings": manifest["settings"], "classes": {}}
    print(f"\n{len(cases)} weak case(s), slices whose label contains the class\n")
    print("| class | map | ROC AUC | Dice at threshold | best Dice (oracle) |\n|---|---|---|---|---|")
    for c in source.classes:
        t = np.concatenate(truths[c])
        result["classes"][names.get(c, str(c))] = {}
        for kind in ("cam", "refined"):
            m = np.concatenate(maps[kind][c])
            best = max((dice(m > th, t), float(th)) for th in np.linspace(0.1, 0.95, 18))
            row = {"auc": roc_auc(m, t), "dice_at_threshold": dice(m > settings.threshold, t),
                   "best_dice": best[0], "best_threshold": best[1], "pixels": int(t.size)}
            result["classes"][names.get(c, str(c))][kind] = row
            print(f"| {names.get(c, c)} | {kind} | {row['auc']:.3f} | {row['dice_at_threshold']:.3f} | "
                  f"{row['best_dice']:.3f} (at {row['best_threshold']:.2f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def single_channel(generalist_config) -> int:
    from nnunet_foundation.foundation.config import single_image_channel

    return single_image_channel(generalist_config, "weak-labels")


if __name__ == "__main__":
    raise SystemExit(main())
