"""The demo: labeled-only nnU-Net vs a semi-supervised trainer on a generated dataset, with the real nnU-Net commands.

Everything happens in a private folder tree (its own nnUNet_raw/_preprocessed/_results), so the user's nnU-Net
folders are never touched. Each step is the command a user would type, printed before it runs; finished steps are
skipped when the demo is run again with the same settings, so an interrupted demo resumes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = f"Dataset{DEMO_DATASET_ID}_Demo"
MARKER = ".nnunet_foundation_demo"
# lines of nnU-Net's training output worth showing live; everything goes to the log file
PROGRESS_MARKERS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "semi-supervised:", "Epoch time",
                    "Unlabeled stream")


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoSettings:
    labeled: int = 2
    validation: int = 2
    unlabeled: int = 16
    test: int = 6
    budget: str = "demo"
    configuration: str = "3d_fullres"
    ssl_trainer: str = "nnUNetTrainerMeanTeacher"
    seed: int = 0

    @property
    def trainers(self) -> List[str]:
        return [f"nnUNetTrainer_{self.budget}", f"{self.ssl_trainer}_{self.budget}"]


def _prepare_workdir(workdir: Path, settings: DemoSettings) -> None:
    """Create the demo folder, or reuse one written by the demo with the same settings. Never touch anything else."""
    record = workdir / "demo_settings.json"
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / MARKER).exists():
            raise DemoError(f"{workdir} exists and was not created by the demo; choose an empty or new folder with "
                            f"--workdir (nothing was changed).")
        previous = json.loads(record.read_text()) if record.exists() else {}
        if previous != asdict(settings):
            raise DemoError(f"{workdir} holds a demo run with other settings ({previous}); use another --workdir or "
                            f"delete that folder to start over (nothing was changed).")
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("created by nnunet-foundation demo\n")
    record.write_text(json.dumps(asdict(settings), indent=2))


def demo_environment(workdir: Path, device: str) -> Dict[str, str]:
    from nnunet_foundation.paths import trainer_path

    env = dict(os.environ)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[key] = str(workdir / key)
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    env["nnUNet_extTrainer"] = str(trainer_path())
    env.setdefault("nnUNet_compile", "0")  # compiling costs more than it saves in a short run
    if device == "cpu":
        # data-augmentation worker processes compete with the network for the few CPU cores
        env.setdefault("nnUNet_n_proc_DA", "0")
        env.setdefault("nnUNet_def_n_proc", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _command_path(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(cmd: List[str], env: Dict[str, str], log_file: Path, show=lambda line: False) -> None:
    print("$ " + " ".join(cmd), flush=True)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        proc = subprocess.Popen([_command_path(cmd[0]), *cmd[1:]], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if show(line):
                print("    " + line.rstrip(), flush=True)
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-25:])
        raise DemoError(f"'{' '.join(cmd)}' failed (exit code {rc}); full output in {log_file}. Last lines:\n{tail}")


def _write_split(env: Dict[str, str], settings: DemoSettings) -> List[str]:
    """Fold 0: the first `labeled` cases train, the next `validation` cases validate; imagesUnlabeled is the rest."""
    names = sorted(p.name[:-len("_0000.nii.gz")] for p in
                   (Path(env["nnUNet_raw"]) / DEMO_DATASET_NAME / "imagesTr").glob("*_0000.nii.gz"))
    split = [{"train": names[:settings.labeled], "val": names[settings.labeled:]}]
    path = Path(env["nnUNet_preprocessed"]) / DEMO_DATASET_NAME / "splits_final.json"
    path.write_text(json.dumps(split, indent=2))
    return names


def _dice(reference_folder: Path, prediction_folder: Path, labels: Dict[str, int]) -> Dict[str, float]:
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple

    summary_file = prediction_folder / "summary.json"
    compute_metrics_on_folder_simple(str(reference_folder), str(prediction_folder), list(labels.values()),
                                     output_file=str(summary_file), num_processes=1)
    summary = json.loads(summary_file.read_text())
    dice = {name: float(summary["mean"][str(value)]["Dice"]) for name, value in labels.items()}
    dice["mean"] = float(summary["foreground_mean"]["Dice"])
    return dice


def _plot(results: Dict[str, dict], labels: List[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    trainers = list(results)
    groups = labels + ["mean"]
    width = 0.8 / len(trainers)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, trainer in enumerate(trainers):
        values = [results[trainer]["dice"][g] for g in groups]
        bars = ax.bar(np.arange(len(groups)) + i * width, values, width, label=trainer)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(np.arange(len(groups)) + width * (len(trainers) - 1) / 2, groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice on held-out test cases")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(workdir: str, settings: DemoSettings, device: str) -> dict:
    from nnunet_foundation.synthetic import write_dataset
    from nnunet_foundation.training.budgets import BUDGETS

    if settings.budget not in BUDGETS:
        raise DemoError(f"unknown budget '{settings.budget}'; choose one of {sorted(BUDGETS)}")
    if settings.labeled < 1 or settings.validation < 1 or settings.unlabeled < 1 or settings.test < 1:
        raise DemoError("--labeled, --validation, --unlabeled and --test must each be at least 1")
    workdir = Path(workdir).resolve()
    _prepare_workdir(workdir, settings)
    env = demo_environment(workdir, device)
    logs = workdir / "logs"
    raw = Path(env["nnUNet_raw"]) / DEMO_DATASET_NAME
    started = time.time()

    print(f"[demo] 1/5 dataset: {settings.labeled} labeled + {settings.validation} validation + "
          f"{settings.unlabeled} unlabeled training scans, {settings.test} test cases -> {raw}", flush=True)
    if not (raw / "dataset.json").exists():
        write_dataset(env["nnUNet_raw"], dataset_id=DEMO_DATASET_ID, name="Demo",
                      num_labeled=settings.labeled + settings.validation, num_unlabeled=settings.unlabeled,
                      num_test=settings.test, seed=settings.seed)

    print("[demo] 2/5 planning and preprocessing (nnU-Net), then the unlabeled scans (same plans)", flush=True)
    pre = Path(env["nnUNet_preprocessed"]) / DEMO_DATASET_NAME
    if not (pre / "nnUNetPlans.json").exists() or not any(pre.glob(f"nnUNetPlans_{settings.configuration}")):
        # nnUNet_n_proc_DA=0 is fine for training but breaks planning (set_num_threads needs a positive integer)
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-c", settings.configuration, "-np", "1"],
             plan_env, logs / "plan_and_preprocess.log")
    _run(["nnunet-foundation", "preprocess-unlabeled", "-d", str(DEMO_DATASET_ID), "-c", settings.configuration],
         env, logs / "preprocess_unlabeled.log")
    _write_split(env, settings)

    budget = BUDGETS[settings.budget]
    print(f"[demo] 3/5 training on {device} with the '{settings.budget}' budget ({budget.description})", flush=True)
    results: Dict[str, dict] = {}
    for trainer in settings.trainers:
        out = (Path(env["nnUNet_results"]) / DEMO_DATASET_NAME /
               f"{trainer}__nnUNetPlans__{settings.configuration}" / "fold_0")
        t0 = time.time()
        if (out / "checkpoint_final.pth").exists():
            print(f"    {trainer}: already trained ({out}), skipped", flush=True)
        else:
            resume = ["--c"] if (out / "checkpoint_latest.pth").exists() else []
            _run(["nnUNetv2_train", str(DEMO_DATASET_ID), settings.configuration, "0", "-tr", trainer,
                  "-device", device, *resume], env, logs / f"train_{trainer}.log",
                 show=lambda line: any(m in line for m in PROGRESS_MARKERS))
        results[trainer] = {"output_folder": str(out), "train_seconds": round(time.time() - t0, 1)}

    print("[demo] 4/5 predicting the test cases with nnUNetv2_predict", flush=True)
    for trainer in settings.trainers:
        pred = workdir / "predictions" / trainer
        if not (pred / "summary.json").exists():
            shutil.rmtree(pred, ignore_errors=True)  # ours (a previous, interrupted prediction), never user data
            _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DEMO_DATASET_ID),
                  "-c", settings.configuration, "-tr", trainer, "-f", "0", "-chk", "checkpoint_final.pth",
                  "-device", device, "--disable_progress_bar", "-npp", "1", "-nps", "1"],
                 env, logs / f"predict_{trainer}.log")
        results[trainer]["predictions"] = str(pred)

    print("[demo] 5/5 evaluating (Dice per class against labelsTs)", flush=True)
    labels = {k: v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if v != 0}
    for trainer in settings.trainers:
        results[trainer]["dice"] = _dice(raw / "labelsTs", Path(results[trainer]["predictions"]), labels)

    report = {"settings": asdict(settings), "device": device, "budget": budget.description,
              "results": results, "total_seconds": round(time.time() - started, 1)}
    (workdir / "demo_results.json").write_text(json.dumps(report, indent=2))
    title = (f"{settings.labeled} labeled + {settings.unlabeled} unlabeled scans, {settings.configuration}, "
             f"budget '{settings.budget}' on {device}")
    _plot(results, list(labels), workdir / "demo_results.png", title)
    print()
    print(format_table(results, list(labels)))
    print(f"\n{title}. Results: {workdir / 'demo_results.json'}, plot: {workdir / 'demo_results.png'}")
    return report


def format_table(results: Dict[str, dict], labels: List[str]) -> str:
    header = "| trainer | " + " | ".join(f"Dice {l}" for l in labels) + " | mean Dice | training time (s) |"
    rows = [header, "|" + "---|" * (len(labels) + 3)]
    for trainer, r in results.items():
        rows.append(f"| {trainer} | " + " | ".join(f"{r['dice'][l]:.3f}" for l in labels) +
                    f" | {r['dice']['mean']:.3f} | {r['train_seconds']:.0f} |")
    return "\n".join(rows)
