"""How good are WeakMedSAM's pseudo-masks? Dice of a ``weak-labels run`` output dataset against the hidden masks.

In a benchmark the slice-labelled cases are labeled cases whose masks ``weak-labels derive --copy-to`` removed, so the
pseudo-masks that ``weak-labels run`` wrote for them can be scored against the masks of the original dataset:

    python benchmarks/weakmedsam_quality.py --pseudo $nnUNet_raw/Dataset016_HippoWeakMedSAM \\
        --truth $nnUNet_raw/Dataset004_Hippocampus [--json quality.json]

Scores only the cases of the output's ``weakmedsam_work/manifest.json`` ``weak_cases`` (the labeled cases it copied
are the user's own masks). Per case and class: Dice over the whole image or volume (a class absent from both counts 1) and the
foreground fractions (an over-segmenting CAM shows there first); the fraction of slices whose predicted class set
matches the slice labels, from the run's ``pseudo_stats_part*.json``. Prints markdown; ``--json`` writes the numbers.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

from nnunet_foundation.evaluation import dice_coefficient as dice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pseudo", required=True, help="raw dataset folder written by weak-labels run")
    parser.add_argument("--truth", required=True, help="raw dataset folder with the true masks in labelsTr")
    parser.add_argument("--json", default=None, help="also write per-case numbers here")
    args = parser.parse_args(argv)

    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    with open(os.path.join(args.pseudo, "weakmedsam_work", "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(args.pseudo, "dataset.json")) as f:
        dataset_json = json.load(f)
    ending = dataset_json["file_ending"]
    classes = sorted(int(v) for k, v in dataset_json["labels"].items() if k != "background" and not
                     isinstance(v, list) and int(v) > 0)
    names = {int(v): k for k, v in dataset_json["labels"].items() if not isinstance(v, list)}
    per_case, io = {}, None
    for case in manifest["weak_cases"]:
        path = os.path.join(args.pseudo, "labelsTr", case + ending)
        if not os.path.isfile(path):
            continue
        io = io or determine_reader_writer_from_dataset_json(dataset_json, path, verbose=False)()
        pred = np.asarray(io.read_seg(path)[0][0])
        truth = np.asarray(io.read_seg(os.path.join(args.truth, "labelsTr", case + ending))[0][0])
        per_case[case] = {str(c): dice(pred == c, truth == c) for c in classes}
        per_case[case]["foreground_fraction_pseudo"] = float((pred > 0).mean())
        per_case[case]["foreground_fraction_truth"] = float((truth > 0).mean())
    if not per_case:
        raise SystemExit(f"no pseudo-mask of a weak case in {args.pseudo}/labelsTr yet")
    slices = correct = 0
    for stats_file in glob.glob(os.path.join(args.pseudo, "weakmedsam_work", "pseudo_stats_part*.json")):
        with open(stats_file) as f:
            for case, s in json.load(f).items():
                if case in per_case:
                    slices += s["slices"]
                    correct += s["label_correct"]
    print(f"{len(per_case)} of {len(manifest['weak_cases'])} weak case(s) scored against {args.truth}/labelsTr\n")
    print("| class | Dice mean | std | min | max |\n|---|---|---|---|---|")
    summary = {}
    for c in classes:
        v = np.array([per_case[k][str(c)] for k in per_case])
        summary[names.get(c, str(c))] = {"mean": float(v.mean()), "std": float(v.std()), "n": int(v.size)}
        print(f"| {names.get(c, c)} | {v.mean():.3f} | {v.std():.3f} | {v.min():.3f} | {v.max():.3f} |")
    fg = np.mean([[per_case[k][str(c)] for c in classes] for k in per_case], axis=1)
    summary["foreground_mean"] = {"mean": float(fg.mean()), "std": float(fg.std()), "n": int(fg.size)}
    print(f"| mean of classes | {fg.mean():.3f} | {fg.std():.3f} | {fg.min():.3f} | {fg.max():.3f} |")
    fp = np.mean([per_case[k]["foreground_fraction_pseudo"] for k in per_case])
    ft = np.mean([per_case[k]["foreground_fraction_truth"] for k in per_case])
    print(f"\nforeground fraction: pseudo-masks {fp:.3f}, true masks {ft:.3f}")
    if slices:
        print(f"slices whose predicted class set equals the slice label: {correct}/{slices} ({correct / slices:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"pseudo": args.pseudo, "truth": args.truth, "settings": manifest["settings"],
                       "summary": summary, "slice_label_accuracy": correct / slices if slices else None,
                       "per_case": per_case}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
