"""Multi-phase semi-supervised study on Hippocampus with simulated phases (issue 19, part 3).

No multi-phase dataset is available offline, so phases are simulated from Task04_Hippocampus (say so wherever the
results are quoted): per patient, phase T1 is the original MRI (labeled), T2 its inverted intensities with a gamma
curve, DWI a blurred, noisier version with another gamma; T2 and DWI are shifted by a few voxels each (the phases are
not registered), and DWI is missing for a third of the patients. Everything else is the real pipeline:

1. ``nnunet-foundation convert-multiphase``: T1 of each patient labeled, the other phases unlabeled single-channel
   cases, whole test patients held out (their other phases are never written into the dataset);
2. ``nnUNetv2_plan_and_preprocess -c 2d`` and ``nnunet-foundation preprocess-unlabeled``;
3. splits: ``--labeled`` T1 cases train, 4 validate; fold 1 is the same split as fold 0 (nnU-Net keeps one folder per
   trainer and fold, and the CPS row started from pretrained weights needs its own);
4. trainings at one budget (``nnUNetv2_train``): labeled-only (nnUNetTrainerEMA), CPS over the unlabeled T1 cases and
   every other phase (fresh networks), CPS started from the labeled-only model (``-pretrained_weights``: network A
   those weights, network B those weights + 5% noise; the CPS setting ``pretrained_start``), fully supervised
   (every training patient's T1 labeled);
5. every model predicts the test patients' T1 (the dataset's imagesTs) and their simulated T2 and DWI (written apart,
   with their shifted labels, only for scoring), scored with ``nnunet-foundation evaluate``'s metrics.

    python benchmarks/hippocampus_multiphase.py --work DIR [--data ../shared/data/Task04_Hippocampus]
        [--labeled 4] [--budget cpu2d] [--test-patients 40] [--seed 0] [--device cpu]

Resumable: a finished step (conversion, preprocessing, training, prediction) is skipped when the command is run again.
Writes DIR/report.md, DIR/results.json and DIR/multiphase_dice.png.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

DATASET_ID, DATASET_NAME = 160, "Dataset160_HippocampusPhases"
LABELED_PHASE, OTHER_PHASES = "T1", ("T2", "DWI")
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}
MAX_SHIFT = 3  # voxels, per axis: the phases are not registered
MISSING_DWI = 1 / 3


def simulate_phase(image: np.ndarray, phase: str, rng: np.random.Generator) -> np.ndarray:
    """One simulated phase of a T1 image (float32, non-negative): the contrast changes, the anatomy does not."""
    from scipy.ndimage import gaussian_filter

    x = image.astype(np.float32)
    hi = float(np.percentile(x, 99.5)) or 1.0
    x = np.clip(x / hi, 0, 1)
    if phase == "T2":  # inverted contrast: dark structures bright
        y = (1 - x) ** 0.7 * (x > 0.02)
    elif phase == "DWI":  # blurred, noisy, another curve
        y = gaussian_filter(x, 1.0) ** 1.6
        y = np.abs(y + rng.normal(0, 0.05, y.shape).astype(np.float32))
    else:
        raise ValueError(phase)
    return (y * 1000).astype(np.float32)


def shift(array: np.ndarray, offset) -> np.ndarray:
    """``array`` moved by ``offset`` voxels, zero-filled (no wrap-around)."""
    out = np.zeros_like(array)
    src, dst = [], []
    for d, o in zip(array.shape, offset):
        src.append(slice(max(0, -o), d - max(0, o)))
        dst.append(slice(max(0, o), d - max(0, -o)))
    out[tuple(dst)] = array[tuple(src)]
    return out


def write_like(reference, array: np.ndarray, path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, reference.affine, reference.header)
    img.set_data_dtype(array.dtype)
    nib.save(img, str(path))


def make_phases(data: Path, phases_dir: Path, seed: int) -> None:
    """DATA/imagesTr + labelsTr -> PHASES/<patient>/{T1,T2,DWI}.nii.gz + T1_seg.nii.gz, and PHASES_truth/ with the
    shifted labels of T2 and DWI (read only to score the test patients' predictions)."""
    import nibabel as nib

    done = phases_dir / ".complete"
    if done.exists():
        return
    cases = sorted(p.name[:-len(".nii.gz")] for p in (data / "imagesTr").glob("*.nii.gz") if not p.name.startswith("."))
    if not cases:
        sys.exit(f"error: no images in {data / 'imagesTr'}; --data must be the Task04_Hippocampus folder")
    print(f"== simulating phases of {len(cases)} patients into {phases_dir}", flush=True)
    rng = np.random.default_rng(seed)
    truth = phases_dir.parent / (phases_dir.name + "_truth")
    for k, case in enumerate(cases, 1):
        image = nib.load(str(data / "imagesTr" / f"{case}.nii.gz"))
        label = nib.load(str(data / "labelsTr" / f"{case}.nii.gz"))
        t1, seg = np.asarray(image.dataobj), np.asarray(label.dataobj).astype(np.uint8)
        patient = case.replace("_", "")  # convert-multiphase names cases <patient>_<phase>
        out = phases_dir / patient
        write_like(image, t1.astype(np.float32), out / f"{LABELED_PHASE}.nii.gz")
        write_like(label, seg, out / f"{LABELED_PHASE}_seg.nii.gz")
        for phase in OTHER_PHASES:
            if phase == "DWI" and rng.random() < MISSING_DWI:
                continue
            offset = tuple(int(v) for v in rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=3))
            write_like(image, shift(simulate_phase(t1, phase, rng), offset), out / f"{phase}.nii.gz")
            write_like(label, shift(seg, offset), truth / phase / f"{patient}.nii.gz")
        if k % 50 == 0:
            print(f"   {k}/{len(cases)}", flush=True)
    done.write_text("done\n")


def run(cmd, env, log: Path) -> None:
    from nnunet_foundation.subprocesses import CommandFailed, run_logged

    print("   $ " + " ".join(map(str, cmd)), flush=True)
    try:
        run_logged([str(c) for c in cmd], env, log, show=lambda line: "Epoch time" in line or "Pseudo dice" in line)
    except CommandFailed as e:
        sys.exit(f"error: {e}\n{e.tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="study folder (nnU-Net folders, logs, report)")
    p.add_argument("--data", type=Path,
                   default=Path(__file__).resolve().parents[2] / "shared" / "data" / "Task04_Hippocampus")
    p.add_argument("--labeled", type=int, default=4, help="labeled T1 cases (default 4)")
    p.add_argument("--budget", default="cpu2d", help="training budget of every row (default cpu2d)")
    p.add_argument("--test-patients", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from nnunet_foundation.subprocesses import nnunet_environment
    from nnunet_foundation.training.checkpoint_files import was_interrupted

    work = args.work.resolve()
    env = nnunet_environment()
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[key] = str(work / key)
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    if args.device == "cpu":  # worker processes compete with the network for a few cores
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "2")
    logs = work / "logs"
    started = time.time()

    make_phases(args.data, work / "phases", args.seed)
    raw = Path(env["nnUNet_raw"]) / DATASET_NAME
    if not (raw / "dataset.json").exists():
        print("== convert-multiphase", flush=True)
        run(["nnunet-foundation", "convert-multiphase", "-i", work / "phases", "-d", DATASET_ID, "-n",
             "HippocampusPhases", "--labeled-phase", LABELED_PHASE, "--labels", json.dumps(LABELS),
             "--test-patients", args.test_patients, "--seed", args.seed], env, logs / "convert.log")
    pre = Path(env["nnUNet_preprocessed"]) / DATASET_NAME
    if not (pre / "nnUNetPlans_2d").is_dir():
        print("== planning and preprocessing (2d)", flush=True)
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}  # 0 workers break planning
        run(["nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", "2"], plan_env, logs / "plan.log")
    if not (pre / "nnUNetPlans_2d_unlabeled").is_dir():
        run(["nnunet-foundation", "preprocess-unlabeled", "-d", DATASET_ID, "-c", "2d"], env, logs / "unlabeled.log")

    patients = json.loads((raw / "patients.json").read_text())
    train_cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    test_cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
    rng = random.Random(args.seed)
    shuffled = train_cases[:]
    rng.shuffle(shuffled)
    labeled, val = sorted(shuffled[:args.labeled]), sorted(shuffled[args.labeled:args.labeled + 4])
    rest = sorted(shuffled[args.labeled + 4:])
    scarce = {"train": labeled, "val": val, "unlabeled": rest}
    full = {"train": sorted(labeled + rest), "val": val}
    splits = [scarce, scarce, full]  # fold 1 = fold 0, for the pretrained CPS row
    (pre / "splits_final.json").write_text(json.dumps(splits, indent=1))

    b = args.budget
    rows = [  # (row, trainer, fold, extra arguments)
        ("labeled-only", f"nnUNetTrainerEMA_{b}", 0, []),
        ("CPS, all phases", f"nnUNetTrainerCPS_{b}", 0, []),
        ("CPS, all phases, from the labeled-only model", f"nnUNetTrainerCPS_{b}", 1, "pretrained"),
        ("fully supervised (T1 of every training patient)", f"nnUNetTrainerEMA_{b}", 2, []),
    ]
    results_root = Path(env["nnUNet_results"]) / DATASET_NAME

    def folder(trainer, fold):
        return results_root / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"

    for name, trainer, fold, extra in rows:
        out = folder(trainer, fold)
        if (out / "checkpoint_final.pth").exists():
            print(f"== {name}: trained", flush=True)
            continue
        print(f"== [{(time.time() - started) / 60:.0f} min] training {name}: {trainer} fold {fold}", flush=True)
        cmd = ["nnUNetv2_train", DATASET_ID, "2d", fold, "-tr", trainer, "-device", args.device]
        if was_interrupted(str(out)):
            cmd.append("--c")
        elif extra == "pretrained":
            cmd += ["-pretrained_weights", folder(f"nnUNetTrainerEMA_{b}", 0) / "checkpoint_final.pth"]
        t0 = time.time()
        run(cmd, env, logs / f"train_{trainer}_fold{fold}.log")
        (out / "wall_seconds.txt").write_text(f"{time.time() - t0:.0f}\n")

    # test sets: T1 from the dataset's imagesTs, the other phases of the same test patients from the simulation
    test_patients = {c: patients["cases"][c]["patient"] if "cases" in patients else c.rsplit("_", 1)[0]
                     for c in test_cases}
    sets = {LABELED_PHASE: (raw / "imagesTs", raw / "labelsTs")}
    truth = work / "phases_truth"
    for phase in OTHER_PHASES:
        images, labels = work / "test_phases" / phase / "imagesTs", work / "test_phases" / phase / "labelsTs"
        if not labels.is_dir():
            for case, patient in test_patients.items():
                src = work / "phases" / patient / f"{phase}.nii.gz"
                if src.exists():
                    images.mkdir(parents=True, exist_ok=True)
                    labels.mkdir(parents=True, exist_ok=True)
                    shutil.copy(src, images / f"{patient}_{phase}_0000.nii.gz")
                    shutil.copy(truth / phase / f"{patient}.nii.gz", labels / f"{patient}_{phase}.nii.gz")
        sets[phase] = (images, labels)

    from nnunet_foundation.evaluation import evaluate_folder

    dataset_json = json.loads((raw / "dataset.json").read_text())
    import platform

    results = {"budget": b, "labeled": args.labeled, "seed": args.seed, "test_patients": len(test_cases),
               "phases_simulated": True, "machine": f"{platform.processor() or platform.machine()}, "
                                                     f"{os.cpu_count()} CPU cores, device {args.device}",
               "command": "python benchmarks/hippocampus_multiphase.py " + " ".join(argv or sys.argv[1:]),
               "rows": {}}
    for name, trainer, fold, _ in rows:
        entry = {"trainer": trainer, "fold": fold, "dice": {},
                 "train_seconds": float((folder(trainer, fold) / "wall_seconds.txt").read_text())
                 if (folder(trainer, fold) / "wall_seconds.txt").exists() else None}
        for phase, (images, labels) in sets.items():
            pred = work / "predictions" / f"{trainer}_fold{fold}" / phase
            if not (pred / "summary_surface.json").exists():
                shutil.rmtree(pred, ignore_errors=True)
                run(["nnUNetv2_predict", "-i", images, "-o", pred, "-d", DATASET_ID, "-c", "2d", "-f", fold, "-tr",
                     trainer, "-device", args.device, "-npp", 2, "-nps", 2, "--disable_progress_bar"], env,
                    logs / f"predict_{trainer}_fold{fold}_{phase}.log")
                evaluate_folder(str(labels), str(pred), dataset_json, num_processes=2,
                                output_file=str(pred / "summary_surface.json"))
            summary = json.loads((pred / "summary_surface.json").read_text())
            entry["dice"][phase] = {"mean": summary["foreground_mean"]["Dice"]["mean"],
                                    "cases": len(summary["per_case"])}
        results["rows"][name] = entry
        print(f"   {name}: " + ", ".join(f"{ph} {d['mean']:.3f}" for ph, d in entry["dice"].items()), flush=True)
    write_report(work, results)
    print(f"== done in {(time.time() - started) / 60:.0f} min: {work / 'report.md'}", flush=True)
    return 0


def write_report(work: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (work / "results.json").write_text(json.dumps(results, indent=2))
    phases = list(next(iter(results["rows"].values()))["dice"])
    lines = [f"# Multi-phase SSL on Hippocampus with simulated phases ({results['labeled']} labeled T1 cases, budget "
             f"{results['budget']}, seed {results['seed']}, {results['test_patients']} held-out test patients)", "",
             "T1 is the real MRI, the only labeled phase; T2 and DWI are simulated from it (inverted / blurred and "
             "noisy, other intensity curves, shifted up to 3 voxels, DWI missing for a third of the patients), so "
             "these numbers show the pipeline and the direction of an effect, not what real phases would give. Test "
             "patients are held out whole; Dice is the mean over foreground classes and test cases of each phase. "
             f"Machine: {results.get('machine', 'not recorded')}. Command: `{results.get('command', '')}`.", "",
             "| row | " + " | ".join(f"Dice {p}" for p in phases) + " | training s |",
             "|---" * (len(phases) + 2) + "|"]
    for name, entry in results["rows"].items():
        lines.append(f"| {name} | " + " | ".join(f"{entry['dice'][p]['mean']:.3f} (n={entry['dice'][p]['cases']})"
                                               for p in phases) + f" | {entry['train_seconds'] or ''} |")
    (work / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(results["rows"])
    for k, (name, entry) in enumerate(results["rows"].items()):
        ax.bar(np.arange(len(phases)) + k * width, [entry["dice"][p]["mean"] for p in phases], width, label=name)
    ax.set_xticks(np.arange(len(phases)) + width * (len(results["rows"]) - 1) / 2, phases)
    ax.set_ylabel("mean foreground Dice (test patients)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title("Hippocampus, simulated phases: labels for T1 only")
    fig.tight_layout()
    fig.savefig(work / "multiphase_dice.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
