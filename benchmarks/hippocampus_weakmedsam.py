"""WeakMedSAM on Hippocampus (issue 18's benchmark): nnU-Net from slice-level labels against labeled-only and fully
supervised nnU-Net, on the committed Hippocampus study's split, in one command:

    python benchmarks/hippocampus_weakmedsam.py OUTPUT [--num-weak 40] [--budget cpu2d] [--device cpu]

What it does (every step is skipped when its result exists, so the same command continues a killed run):

1. the split of the committed Hippocampus study (docs/benchmarks/hippocampus_cpu2d_ssl/results.json, fold 0): its 40
   held-out test cases, its 4 validation cases and its 2 labeled cases; the slice-labelled cases are the first
   ``--num-weak`` of fold 0's unlabeled pool in a seeded shuffle (``--seed``);
2. raw dataset 540 (these cases with their masks), then ``weak-labels derive -d 540 --copy-to 541`` (the weak cases'
   masks become slice labels along axis 0 - the 2d configuration's slicing axis - and are dropped; the labeled and
   validation cases keep theirs), then ``weak-labels run -d 541 -o_d 542`` (``--weak-args``, default ``--trainable
   heads``, the CPU choice);
3. the pseudo-masks scored against the hidden masks (benchmarks/weakmedsam_quality.py);
4. nnU-Net 2d at the same budget for each row, fold 0 = train on the cases below, validate on the 4 validation cases:
   - ``labeled-only``: the 2 labeled cases (dataset 540, ``nnUNetTrainerEMA``, the benchmark's bound trainer);
   - ``weakmedsam``: the weak cases' pseudo-masks + the 2 labeled cases' masks (dataset 542,
     ``nnUNetTrainerWeakMedSAM``: weighted CE as the reference);
   - ``weakmedsam, Dice + CE``: the same with ``ce_background_weight`` 1 and ``dice_weight`` 1 (nnU-Net's loss);
   - ``fully supervised``: the same cases with their true masks (dataset 540, ``nnUNetTrainerEMA``): the bound for
     what the weak cases could give;
5. each row predicted on the 40 test cases with the stock ``nnUNetv2_predict`` and scored (Dice, HD95, NSD);
   OUTPUT/report.md, results.json and dice.png.

Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results exported; converts the MSD data (``--msd``, default
../shared/data/Task04_Hippocampus) into Dataset004_Hippocampus when it is not there. The test cases are never part of
datasets 540-542.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPLIT_SOURCE = REPO / "docs" / "benchmarks" / "hippocampus_cpu2d_ssl" / "results.json"
IDS = {"masks": 540, "slice_labels": 541, "pseudo": 542}
NAMES = {540: "HippocampusWeakStudy", 541: "HippocampusWeakStudySliceLabels", 542: "HippocampusWeakStudyWeakMedSAM"}


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run(cmd, log_file: Path, env=None) -> None:
    log(f"$ {' '.join(map(str, cmd))}  (log: {log_file})")
    started = time.time()
    with open(log_file, "a") as f:
        code = subprocess.call([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env)
    if code:
        tail = log_file.read_text().splitlines()[-15:]
        raise SystemExit(f"command failed (exit {code}), last lines of {log_file}:\n" + "\n".join(tail))
    log(f"  done in {(time.time() - started) / 60:.1f} min")


def raw_folder(dataset_id: int) -> Path:
    return Path(os.environ["nnUNet_raw"]) / f"Dataset{dataset_id:03d}_{NAMES[dataset_id]}"


def study_cases(num_weak: int, seed: int) -> dict:
    with open(SPLIT_SOURCE) as f:
        committed = json.load(f)
    fold = next(f for f in committed["folds"] if f["fold"] == 0)
    pool = sorted(fold["unlabeled"])
    random.Random(seed).shuffle(pool)
    if num_weak > len(pool):
        raise SystemExit(f"--num-weak {num_weak}: fold 0 has only {len(pool)} unlabeled cases")
    cases = {"test": sorted(committed["test_cases"]), "labeled": sorted(fold["train"]), "val": sorted(fold["val"]),
             "weak": sorted(pool[:num_weak])}
    assert not set(cases["test"]) & set(cases["weak"] + cases["labeled"] + cases["val"])
    return cases


def make_masks_dataset(cases: dict, source: Path) -> None:
    """Dataset 540: the study's training, labeled and validation cases with their masks (images and masks copied)."""
    target = raw_folder(IDS["masks"])
    members = cases["weak"] + cases["labeled"] + cases["val"]
    if (target / "dataset.json").is_file():
        present = sorted(p.name[:-len(".nii.gz")] for p in (target / "labelsTr").iterdir())
        if present != sorted(members):
            raise SystemExit(f"{target} holds other cases than this study's ({len(present)} vs {len(members)}): "
                             f"delete it (and datasets 541/542) or use another nnUNet_raw")
        return
    tmp = target.with_name(target.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    for case in members:
        shutil.copyfile(source / "imagesTr" / f"{case}_0000.nii.gz", tmp / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copyfile(source / "labelsTr" / f"{case}.nii.gz", tmp / "labelsTr" / f"{case}.nii.gz")
    with open(source / "dataset.json") as f:
        dataset_json = json.load(f)
    dataset_json["numTraining"] = len(members)
    dataset_json["description"] = "Hippocampus WeakMedSAM study (benchmarks/hippocampus_weakmedsam.py)"
    with open(tmp / "dataset.json", "w") as f:
        json.dump(dataset_json, f, indent=1)
    os.replace(tmp, target)
    log(f"created {target} ({len(members)} cases)")


def write_splits(dataset_id: int, folds) -> None:
    folder = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{dataset_id:03d}_{NAMES[dataset_id]}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "splits_final.json", "w") as f:
        json.dump([{"train": sorted(t), "val": sorted(v)} for t, v in folds], f, indent=1)


def preprocessed(dataset_id: int, configuration: str, num_cases: int) -> bool:
    folder = Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{dataset_id:03d}_{NAMES[dataset_id]}"
    data = folder / f"nnUNetPlans_{configuration}"
    return data.is_dir() and len(list(data.glob("*.pkl"))) == num_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--num-weak", type=int, default=40, help="slice-labelled cases (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle of the unlabeled pool (default 0)")
    parser.add_argument("--budget", default="cpu2d", help="trainer budget suffix for every row (default cpu2d)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("-np", type=int, default=2, help="processes for preprocessing and prediction (default 2)")
    parser.add_argument("--weak-args", default="--trainable heads",
                        help="options of 'weak-labels run' (default '--trainable heads')")
    parser.add_argument("--msd", default=str(REPO.parent / "shared" / "data" / "Task04_Hippocampus"))
    args = parser.parse_args(argv)
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if variable not in os.environ:
            raise SystemExit(f"export {variable} first")
    out = Path(args.output).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("nnUNet_extTrainer", str(REPO / "trainers"))
    bin_dir = Path(sys.executable).parent

    def tool(name):
        return str(bin_dir / name) if (bin_dir / name).exists() else name

    source = Path(os.environ["nnUNet_raw"]) / "Dataset004_Hippocampus"
    if not (source / "dataset.json").is_file():
        run([tool("nnUNetv2_convert_MSD_dataset"), "-i", args.msd, "-np", max(1, args.np)], out / "logs" / "convert.log")
    cases = study_cases(args.num_weak, args.seed)
    with open(out / "cases.json", "w") as f:
        json.dump(cases, f, indent=1)
    log(f"cases: {len(cases['weak'])} slice-labelled, {len(cases['labeled'])} labeled, {len(cases['val'])} "
        f"validation, {len(cases['test'])} test")

    # 2. datasets and pseudo-masks
    make_masks_dataset(cases, source)
    if not raw_folder(IDS["slice_labels"]).is_dir():
        run([tool("nnunet-foundation"), "weak-labels", "derive", "-d", IDS["masks"], "--copy-to", IDS["slice_labels"],
             "--axis", "0", "--cases", *cases["weak"]], out / "logs" / "derive.log", env)
    started = time.time()
    run([tool("nnunet-foundation"), "weak-labels", "run", "-d", IDS["slice_labels"], "-o_d", IDS["pseudo"],
         "--name", NAMES[IDS["pseudo"]], *args.weak_args.split()], out / "logs" / "weak_labels.log", env)
    weak_seconds = time.time() - started
    timing_file = out / "weak_labels_seconds.json"
    if not timing_file.is_file() or weak_seconds > 60:  # a rerun that only skipped stages keeps the first timing
        timing_file.write_text(json.dumps({"seconds": weak_seconds}))

    # 3. pseudo-mask quality (its log is the committed table: written anew, not appended to)
    (out / "logs" / "quality.log").unlink(missing_ok=True)
    run([sys.executable, REPO / "benchmarks" / "weakmedsam_quality.py", "--pseudo", raw_folder(IDS["pseudo"]),
         "--truth", raw_folder(IDS["masks"]), "--json", out / "pseudo_mask_quality.json"],
        out / "logs" / "quality.log", env)
    shutil.copyfile(out / "logs" / "quality.log", out / "pseudo_mask_quality.md")

    # 4. preprocessing, splits, training
    train_all = cases["weak"] + cases["labeled"]
    for dataset_id in (IDS["masks"], IDS["pseudo"]):
        total = len(train_all) + len(cases["val"])
        if not preprocessed(dataset_id, "2d", total):
            run([tool("nnUNetv2_plan_and_preprocess"), "-d", dataset_id, "-c", "2d", "-np", max(1, args.np),
                 "--verify_dataset_integrity"], out / "logs" / f"preprocess_{dataset_id}.log", env)
    write_splits(IDS["masks"], [(train_all, cases["val"]), (cases["labeled"], cases["val"])])
    write_splits(IDS["pseudo"], [(train_all, cases["val"])])
    # name, dataset, trainer, fold, settings (nnUNet_ssl_*; a row with settings of its own trains into its own
    # results folder, since a trainer's output folder records its settings and refuses others)
    weak_trainer = f"nnUNetTrainerWeakMedSAM_{args.budget}"
    rows = [("labeled-only", IDS["masks"], f"nnUNetTrainerEMA_{args.budget}", 1, {}),
            ("weakmedsam", IDS["pseudo"], weak_trainer, 0, {}),
            ("weakmedsam, Dice + CE", IDS["pseudo"], weak_trainer, 0,
             {"nnUNet_ssl_ce_background_weight": "1", "nnUNet_ssl_dice_weight": "1"}),
            ("fully supervised", IDS["masks"], f"nnUNetTrainerEMA_{args.budget}", 0, {})]
    test_images = out / "test_images"
    test_labels = out / "test_labels"
    for folder, sub, suffix in ((test_images, "imagesTr", "_0000"), (test_labels, "labelsTr", "")):
        folder.mkdir(exist_ok=True)
        for case in cases["test"]:
            target = folder / f"{case}{suffix}.nii.gz"
            if not target.is_file():
                shutil.copyfile(source / sub / f"{case}{suffix}.nii.gz", target)
    results = {}
    for name, dataset_id, trainer, fold, settings in rows:
        tag = name.replace(",", "").replace(" ", "_").replace("+", "plus")
        row_env = dict(env, **settings)
        if settings:
            row_env["nnUNet_results"] = str(out / f"results_{tag}")
        folder = (Path(row_env["nnUNet_results"]) / f"Dataset{dataset_id:03d}_{NAMES[dataset_id]}" /
                  f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}")
        if not (folder / "checkpoint_final.pth").is_file():
            resume = ["--c"] if (folder / "checkpoint_latest.pth").is_file() else []
            run([tool("nnUNetv2_train"), dataset_id, "2d", fold, "-tr", trainer, "-device", args.device, *resume],
                out / "logs" / f"train_{tag}.log", row_env)
        predictions = out / "predictions" / tag
        if len(list(predictions.glob("*.nii.gz"))) != len(cases["test"]):
            run([tool("nnUNetv2_predict"), "-d", dataset_id, "-c", "2d", "-tr", trainer, "-f", fold, "-i", test_images,
                 "-o", predictions, "-device", args.device, "-npp", max(1, args.np), "-nps", max(1, args.np)],
                out / "logs" / f"predict_{tag}.log", row_env)
        from nnunet_foundation.evaluation import evaluate_folder

        evaluation = evaluate_folder(str(test_labels), str(predictions), str(source / "dataset.json"))
        results[name] = {"dataset": dataset_id, "trainer": trainer, "fold": fold, "settings": settings,
                         "num_train": len(train_all) if fold == 0 else len(cases["labeled"]),
                         "foreground_mean": evaluation["foreground_mean"], "per_class": evaluation["per_class"],
                         "per_case": evaluation["per_case"], "training_log": str(folder)}
        log(f"{name}: test Dice {evaluation['foreground_mean']['Dice']['mean']:.3f}")
    write_report(out, cases, results, args, json.loads(timing_file.read_text())["seconds"])
    return 0


def write_report(out: Path, cases: dict, results: dict, args, weak_seconds: float) -> None:
    from nnunet_foundation.benchmark.machine import describe, machine_info

    with open(out / "pseudo_mask_quality.json") as f:
        quality = json.load(f)
    lower, upper = (results[k]["foreground_mean"]["Dice"]["mean"] for k in ("labeled-only", "fully supervised"))
    data = {"cases": cases, "budget": args.budget, "weak_args": args.weak_args, "seed": args.seed,
            "machine": machine_info(args.device), "pseudo_mask_quality": quality["summary"],
            "slice_label_accuracy": quality["slice_label_accuracy"], "weak_labels_seconds": weak_seconds,
            "rows": {k: {x: v[x] for x in v if x != "per_case"} for k, v in results.items()},
            "per_case": {k: v["per_case"] for k, v in results.items()}}
    with open(out / "results.json", "w") as f:
        json.dump(data, f, indent=1)
    lines = [f"# WeakMedSAM on Hippocampus: {len(cases['weak'])} slice-labelled cases + {len(cases['labeled'])} "
             f"labeled", "",
             f"Machine: {describe(data['machine'])}. Budget `{args.budget}` for every nnU-Net row (2d). "
             f"`weak-labels run {args.weak_args}`: {weak_seconds / 60:.0f} min. Test set: the {len(cases['test'])} "
             f"held-out cases of the committed Hippocampus study; validation: its {len(cases['val'])} cases.", "",
             "## Pseudo-masks of the slice-labelled cases against their hidden masks", "",
             "| class | Dice |", "|---|---|"]
    lines += [f"| {k} | {v['mean']:.3f} ± {v['std']:.3f} |" for k, v in quality["summary"].items()]
    if quality["slice_label_accuracy"] is not None:
        lines += ["", f"Slices whose predicted class set equals the slice label: {quality['slice_label_accuracy']:.3f}"]
    lines += ["", "## nnU-Net on the test set", "",
              "| row | trained on | Dice | HD95 | NSD | gap closed |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["foreground_mean"]
        gap = "" if not name.startswith("weakmedsam") else f"{(m['Dice']['mean'] - lower) / (upper - lower):.0%}"
        what = {"labeled-only": f"{len(cases['labeled'])} masks",
                "fully supervised": f"{len(cases['weak']) + len(cases['labeled'])} masks"}.get(
            name, f"{len(cases['weak'])} pseudo-masks + {len(cases['labeled'])} masks")
        lines.append(f"| {name} | {what} | {m['Dice']['mean']:.3f} ± {m['Dice']['std']:.3f} | "
                     f"{m['HD95']['mean']:.2f} | {m['NSD']['mean']:.3f} | {gap} |")
    lines += ["", "Gap closed: (WeakMedSAM - labeled-only) / (fully supervised - labeled-only), test Dice. "
              "`weakmedsam`: nnUNetTrainerWeakMedSAM's defaults (the reference's cross-entropy weighted background "
              "10 : foreground 1, no Dice term); `weakmedsam, Dice + CE`: the same trainer with "
              "`ce_background_weight` 1 and `dice_weight` 1 (nnU-Net's own loss).", "",
              "![Dice](dice.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = ["pseudo-masks\n(train cases)"] + [n.replace(", ", ",\n").replace("fully ", "fully\n")
                                                      for n in results]
    values = [quality["summary"]["foreground_mean"]["mean"]] + \
        [r["foreground_mean"]["Dice"]["mean"] for r in results.values()]
    errors = [quality["summary"]["foreground_mean"]["std"]] + \
        [r["foreground_mean"]["Dice"]["std"] for r in results.values()]
    colours = ["#bbbbbb", "#4c72b0", "#dd8452", "#c44e52", "#55a868", "#8172b3"]
    ax.bar(names, values, yerr=errors, color=colours[:len(names)], capsize=4)
    for i, (v, e) in enumerate(zip(values, errors)):
        ax.text(i, v + e + 0.02, f"{v:.3f}", ha="center")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice (mean of classes)")
    ax.set_title(f"Hippocampus, {len(cases['weak'])} slice-labelled + {len(cases['labeled'])} labeled cases",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "dice.png", dpi=120)
    plt.close(fig)
    log(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
