"""How good is an offline pseudo-label cache? Dice of its labels against the ground truth of its cases, per domain.

In a benchmark the "unlabeled" cases are labeled cases whose labels the trainers never see, so the labels a
generalist wrote for them (``nnunet-foundation pseudo-label``) can be scored: this says whether a cached row can
learn more from the cache than its prompting model already knows. Voxels the cache left open (the ignore value:
not prompted, below ``--min-confidence``, outside the image) and voxels nnU-Net marks outside the image (-1) are not
scored; a case where both the cache and the label are empty on the scored voxels counts as Dice 1.

    python benchmarks/pseudo_label_quality.py -d 150 -c 2d \\
        --name nnUNetTrainerEMA_cpu2dpolyps__nnUNetPlans__fold1

Reads ``$nnUNet_preprocessed/<dataset>/<data identifier>_pseudo_labels/<name>/`` and the preprocessed labels beside
it; domains from the raw dataset's ``domains.json`` (``convert-2d``) when ``$nnUNet_raw`` has one. Prints a markdown
table; ``--json FILE`` also writes the per-case numbers.

``--specialist-softmax FOLDER`` (an IFL round's ``round<r>/softmax`` folder: the prompting nnU-Net's softmax per
case) adds the prompting model's own Dice, on the voxels the cache scores and on all voxels: whether the generalist's
labels are better than what the model they would teach already predicts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def case_dice(label: np.ndarray, truth: np.ndarray, classes, ignore_value: int) -> float:
    """Mean over ``classes`` of the Dice on the voxels both the cache and the image cover."""
    scored = (label != ignore_value) & (truth >= 0)
    values = []
    for c in classes:
        p, t = (label == c) & scored, (truth == c) & scored
        total = int(p.sum() + t.sum())
        values.append(1.0 if total == 0 else 2.0 * int((p & t).sum()) / total)
    return float(np.mean(values))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-c", required=True, help="configuration the cache was made for")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    p.add_argument("--name", required=True, help="cache name (pseudo-label's --name) or cache folder")
    p.add_argument("--json", help="write per-case Dice and the summary to this file")
    p.add_argument("--specialist-softmax", help="folder of the prompting nnU-Net's softmax per case (<case>.npz, "
                                                "IFL's round<r>/softmax): scored beside the cache")
    args = p.parse_args(argv)

    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from nnunet_foundation.pseudo_labels import MANIFEST, cache_folder, load_case

    dataset = maybe_convert_to_dataset_name(args.d)
    base = os.path.join(nnUNet_preprocessed, dataset)
    plans = load_json(os.path.join(base, f"{args.p}.json"))
    data_identifier = plans["configurations"][args.c]["data_identifier"]
    folder = args.name if os.path.isdir(args.name) else cache_folder(base, data_identifier, args.name)
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        print(f"error: {folder} is not a pseudo-label cache (no {MANIFEST}); give the --name that "
              f"nnunet-foundation pseudo-label wrote", file=sys.stderr)
        return 2
    manifest = load_json(os.path.join(folder, MANIFEST))
    ignore_value = int(manifest.get("ignore_value", 255))
    labels = load_json(os.path.join(base, "dataset.json"))["labels"]
    classes = sorted(v for k, v in labels.items() if k != "ignore" and isinstance(v, int) and v > 0)
    domains_file = os.path.join(nnUNet_raw or "", dataset, "domains.json")
    domain_of = load_json(domains_file)["domain"] if nnUNet_raw and os.path.isfile(domains_file) else {}

    preprocessed = os.path.join(base, data_identifier)
    data = infer_dataset_class(preprocessed)(preprocessed)
    cases = sorted(f[:-len(".npz")] for f in os.listdir(folder) if f.endswith(".npz"))
    if args.specialist_softmax:
        from nnunet_foundation.methods.ifl.rounds import load_softmax

        cases = [c for c in cases if os.path.isfile(os.path.join(args.specialist_softmax, f"{c}.npz"))]
    per_case, specialist_same, specialist_all = {}, {}, {}
    for index, case in enumerate(cases, 1):
        _, truth, _, _ = data.load_case(case)
        label = load_case(folder, case)["label"]
        truth = np.asarray(truth[0]).reshape(label.shape)
        per_case[case] = case_dice(label, truth, classes, ignore_value)
        if args.specialist_softmax:
            predicted = load_softmax(os.path.join(args.specialist_softmax, f"{case}.npz")).argmax(0)
            specialist_all[case] = case_dice(predicted, truth, classes, ignore_value)
            scored = np.where(label != ignore_value, predicted, ignore_value)  # the cache's voxels only
            specialist_same[case] = case_dice(scored, truth, classes, ignore_value)
        if index % 200 == 0:
            print(f"  {index}/{len(cases)} cases scored", file=sys.stderr, flush=True)

    def summarise(values: dict) -> dict:
        groups = {}
        for case, dice in values.items():
            groups.setdefault(domain_of.get(case, "all cases"), []).append(dice)
        if len(groups) > 1:
            groups["all cases"] = list(values.values())
        return {g: {"cases": len(v), "mean": float(np.mean(v)), "median": float(np.median(v)),
                    "fraction_below_0.1": float(np.mean(np.array(v) < 0.1))} for g, v in groups.items()}

    summary = summarise(per_case)
    specialist = manifest.get("specialist", {})
    if "sfr_generalist" in manifest:  # SFR's cache: a fine-tuned generalist segments prompt-free
        source = f"prompt-free, by SFR's fine-tuned generalist {manifest['sfr_generalist']}"
    else:
        source = (f"prompted by {specialist.get('trainer')} fold {specialist.get('fold')}; "
                  f"generalist {manifest.get('generalist', {}).get('backend')}")
    print(f"Pseudo-label cache {folder}\n({source})\n")
    if args.specialist_softmax:
        same, every = summarise(specialist_same), summarise(specialist_all)
        print("| cases | n | cache: mean Dice | prompting nnU-Net, same voxels | prompting nnU-Net, all voxels |\n"
              "|---|---|---|---|---|")
        for g, s in summary.items():
            print(f"| {g} | {s['cases']} | {s['mean']:.3f} | {same[g]['mean']:.3f} | {every[g]['mean']:.3f} |")
    else:
        print("| cases | n | mean Dice | median | Dice < 0.1 |\n|---|---|---|---|---|")
        for g, s in summary.items():
            print(f"| {g} | {s['cases']} | {s['mean']:.3f} | {s['median']:.3f} | {s['fraction_below_0.1']:.0%} |")
    if args.json:
        out = {"cache": folder, "manifest": manifest, "summary": summary, "per_case": per_case}
        if args.specialist_softmax:
            out.update(specialist_softmax=args.specialist_softmax, specialist_same_voxels=specialist_same,
                       specialist_all_voxels=specialist_all)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
