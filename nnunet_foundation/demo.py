"""The demo: labeled-only nnU-Net, a semi-supervised trainer and SemiSAM guided by the real LiteMedSAM, on a generated
dataset whose few labeled images do not show how the other images look (nnunet_foundation/demo_data.py), with the real
nnU-Net commands.

Everything happens in a private folder tree (its own nnUNet_raw/_preprocessed/_results), so the user's nnU-Net
folders are never touched. Each step is the command a user would type, printed before it runs; finished steps are
skipped when the demo is run again with the same settings, so an interrupted demo resumes.

SemiSAM runs from the offline cache: LiteMedSAM, prompted with one box per object the labeled-only model predicted
(``DEMO_GENERALIST``), labels every unlabeled image once (``nnunet-foundation pseudo-label``), then SemiSAM trains
with those labels as a cross-entropy target on top of Mean Teacher. On a CPU that costs one encoder call per
unlabeled slice instead of one per training iteration.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = f"Dataset{DEMO_DATASET_ID}_Demo"
MARKER = ".nnunet_foundation_demo"
# lines of nnU-Net's training output worth showing live; everything goes to the log file
PROGRESS_MARKERS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "semi-supervised:", "Epoch time",
                    "Unlabeled stream", "pseudo-labels from the offline cache")
LABELED_ONLY = "nnUNetTrainer"
SEMISAM = "nnUNetTrainerSemiSAM"
# SemiSAM's settings in the demo: the cached LiteMedSAM labels are a cross-entropy target of weight 2 for the whole
# run (the trainer's defaults, a 0.1-weighted MSE that fades, were made for an online generalist whose labels get
# worse than the specialist's late in training; the cache's were made once and stay as good as they were), and the
# exported EMA teacher averages over ~20 iterations instead of ~100 (ema_decay 0.95, not 0.99): in a run of 150
# iterations a 0.99 average is mostly a network that has not yet learnt from the pseudo-labels. On the default data
# (24 test images) the labeled-only model scored 0.802 mean Dice, SemiSAM 0.819 with weight 1 and decay 0.99, 0.835
# with weight 2 and decay 0.95, 0.822 with weight 4 and decay 0.95 (one run each; chosen on these numbers, so the
# demo is a demonstration, not a benchmark).
SEMISAM_SETTINGS = {"sam_loss": "ce", "sam_weight": 2.0, "sam_decay": 0.0, "sam_all_scales": True,
                    "ema_decay": 0.95}
# LiteMedSAM's prompts for the cache: one box per connected component of the labeled-only model's prediction, not one
# per class. A weak model scatters false-positive pixels over noisy images, and a single class box stretched over
# them makes LiteMedSAM segment half the image: with one box per class the pseudo-labels of the 16 default unlabeled
# images scored Dice 0.71 / 0.63 (lesion / duct) against their generated truth, below the labeled-only model's own
# 0.82 / 0.81; with these prompts 0.88 / 0.87. Components under 20 pixels give no prompt, and a component's mask is
# dropped when LiteMedSAM's predicted IoU times the model's mean probability inside that mask is below 0.25: the
# generalist's own confidence filters the prompts. The threshold is low because the whole object LiteMedSAM returns
# for a ring the model predicted has only about half its area inside the model's prediction, and filling rings is
# the point (0.5 dropped such objects: 0.83 / 0.71).
DEMO_GENERALIST = {"backend": "litemedsam", "box_mode": "components", "min_component_size": 20,
                   "min_prompt_score": 0.25}


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoSettings:
    labeled: int = 2
    validation: int = 2
    unlabeled: int = 16
    test: int = 24
    budget: str = "demo"
    dimension: str = "2d"
    ssl_trainer: str = "nnUNetTrainerMeanTeacher"
    semisam: bool = True
    seed: int = 0

    @property
    def configuration(self) -> str:
        return "2d" if self.dimension == "2d" else "3d_fullres"

    @property
    def labeled_only(self) -> str:
        return f"{LABELED_ONLY}_{self.budget}"

    @property
    def trainers(self) -> List[str]:
        names = [self.labeled_only, f"{self.ssl_trainer}_{self.budget}"]
        return names + [f"{SEMISAM}_{self.budget}"] if self.semisam else names

    @property
    def cache_name(self) -> str:
        """The pseudo-label cache SemiSAM reads: LiteMedSAM prompted by the labeled-only model (fold 0)."""
        return f"{self.labeled_only}__nnUNetPlans__fold0"


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


def _run(cmd: List[str], env: Dict[str, str], log_file: Path, show=lambda line: False) -> None:
    from nnunet_foundation.subprocesses import CommandFailed, run_logged

    print("$ " + " ".join(cmd), flush=True)
    try:
        run_logged(cmd, env, log_file, show=show)
    except CommandFailed as e:
        raise DemoError(f"{e}. Last lines:\n{e.tail}") from None


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


def _short_name(trainer: str) -> str:
    """'nnUNetTrainer_demo' -> 'labeled only', 'nnUNetTrainerMeanTeacher_demo' -> 'MeanTeacher', 'truth' -> 'truth'
    (plot titles)."""
    return trainer.split("_")[0].replace("nnUNetTrainer", "") or "labeled only"


def _plot_examples(raw: Path, results: Dict[str, dict], path: Path, num_cases: int = 3) -> None:
    """Rows of test images: the image, the truth, then each trainer's prediction (2D data, or the middle slice)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import SimpleITK as sitk

    def middle(file: Path) -> np.ndarray:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(file)))
        return array[array.shape[0] // 2]

    cases = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))[:num_cases]
    columns = ["image", "truth", *results]
    fig, axes = plt.subplots(len(cases), len(columns), figsize=(2.2 * len(columns), 2.3 * len(cases)), squeeze=False)
    for row, case in enumerate(cases):
        truth = middle(raw / "labelsTs" / f"{case}.nii.gz")
        panels = [middle(raw / "imagesTs" / f"{case}_0000.nii.gz"), truth]
        panels += [middle(Path(r["predictions"]) / f"{case}.nii.gz") for r in results.values()]
        for col, (name, panel) in enumerate(zip(columns, panels)):
            ax = axes[row, col]
            if col == 0:
                ax.imshow(panel, cmap="gray")
            else:
                ax.imshow(panel, cmap="viridis", vmin=0, vmax=max(2, int(truth.max())), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(_short_name(name), fontsize=8)
        axes[row, 0].set_ylabel(case, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(workdir: str, settings: DemoSettings, device: str) -> dict:
    from nnunet_foundation.training.budgets import BUDGETS

    if settings.budget not in BUDGETS:
        raise DemoError(f"unknown budget '{settings.budget}'; choose one of {sorted(BUDGETS)}")
    if settings.labeled < 1 or settings.validation < 1 or settings.unlabeled < 1 or settings.test < 1:
        raise DemoError("--labeled, --validation, --unlabeled and --test must each be at least 1")
    if settings.dimension not in ("2d", "3d"):
        raise DemoError("--dimension is 2d or 3d")
    if settings.semisam:
        from nnunet_foundation.foundation.config import MissingBackendError, backend_spec, require_modules

        try:
            require_modules(backend_spec("litemedsam").requires, "litemedsam")
        except MissingBackendError as e:
            raise DemoError(f"SemiSAM needs LiteMedSAM: {e} (or run the demo with --no-semisam)") from None
    workdir = Path(workdir).resolve()
    _prepare_workdir(workdir, settings)
    env = demo_environment(workdir, device)
    logs = workdir / "logs"
    raw = Path(env["nnUNet_raw"]) / DEMO_DATASET_NAME
    configuration = settings.configuration
    started = time.time()
    steps = 7 if settings.semisam else 5

    print(f"[demo] 1/{steps} dataset ({settings.dimension}): {settings.labeled} labeled + {settings.validation} "
          f"validation + {settings.unlabeled} unlabeled training images, {settings.test} test images -> {raw}",
          flush=True)
    if not (raw / "dataset.json").exists():
        if settings.dimension == "2d":
            from nnunet_foundation.demo_data import write_demo_dataset

            write_demo_dataset(env["nnUNet_raw"], DEMO_DATASET_ID, "Demo", settings.labeled, settings.validation,
                               settings.unlabeled, settings.test, seed=settings.seed)
        else:
            from nnunet_foundation.synthetic import write_dataset

            write_dataset(env["nnUNet_raw"], dataset_id=DEMO_DATASET_ID, name="Demo",
                          num_labeled=settings.labeled + settings.validation, num_unlabeled=settings.unlabeled,
                          num_test=settings.test, seed=settings.seed)

    print(f"[demo] 2/{steps} planning and preprocessing (nnU-Net), then the unlabeled images (same plans)", flush=True)
    pre = Path(env["nnUNet_preprocessed"]) / DEMO_DATASET_NAME
    if not (pre / "nnUNetPlans.json").exists() or not any(pre.glob(f"nnUNetPlans_{configuration}")):
        # nnUNet_n_proc_DA=0 is fine for training but breaks planning (set_num_threads needs a positive integer)
        plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        _run(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_DATASET_ID), "-c", configuration, "-np", "1"],
             plan_env, logs / "plan_and_preprocess.log")
    _run(["nnunet-foundation", "preprocess-unlabeled", "-d", str(DEMO_DATASET_ID), "-c", configuration],
         env, logs / "preprocess_unlabeled.log")
    _write_split(env, settings)

    budget = BUDGETS[settings.budget]
    results: Dict[str, dict] = {}

    def train(trainer: str, step: int, extra_env: Dict[str, str] = None) -> None:
        out = Path(env["nnUNet_results"]) / DEMO_DATASET_NAME / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"
        print(f"[demo] {step}/{steps} training {trainer} on {device} ('{settings.budget}' budget: "
              f"{budget.description})", flush=True)
        t0 = time.time()
        if (out / "checkpoint_final.pth").exists():
            print(f"    {trainer}: already trained ({out}), skipped", flush=True)
            previous = _previous_results(workdir).get(trainer, {})
            seconds = previous.get("train_seconds")
        else:
            from nnunet_foundation.training.checkpoint_files import was_interrupted

            resume = ["--c"] if was_interrupted(str(out)) else []
            _run(["nnUNetv2_train", str(DEMO_DATASET_ID), configuration, "0", "-tr", trainer, "-device", device,
                  *resume], {**env, **(extra_env or {})}, logs / f"train_{trainer}.log",
                 show=lambda line: any(m in line for m in PROGRESS_MARKERS))
            seconds = round(time.time() - t0, 1)
        results[trainer] = {"output_folder": str(out), "train_seconds": seconds, "generalist_seconds": 0.0}

    train(settings.labeled_only, 3)
    train(settings.trainers[1], 4)
    if settings.semisam:
        print(f"[demo] 5/{steps} LiteMedSAM pseudo-labels of the unlabeled images, prompted by the labeled-only "
              f"model's boxes", flush=True)
        done_marker = logs / "pseudo_labels.done"
        if done_marker.exists():
            generalist_seconds = json.loads(done_marker.read_text())["seconds"]
            print("    already labelled, skipped", flush=True)
        else:
            t0 = time.time()
            _run(["nnunet-foundation", "pseudo-label", "-d", str(DEMO_DATASET_ID), "-c", configuration,
                  "-tr", settings.labeled_only, "-f", "0", "-device", device, "--name", settings.cache_name,
                  "--generalists", json.dumps(DEMO_GENERALIST)],
                 env, logs / "pseudo_label.log", show=lambda line: line.startswith(("pseudo-label:", "done:")))
            generalist_seconds = round(time.time() - t0, 1)
            done_marker.write_text(json.dumps({"seconds": generalist_seconds}))
        semisam_env = {f"nnUNet_ssl_{k}": json.dumps(v) if not isinstance(v, str) else v
                       for k, v in {**SEMISAM_SETTINGS, "pseudo_labels": settings.cache_name}.items()}
        train(settings.trainers[2], 6, semisam_env)
        results[settings.trainers[2]]["generalist_seconds"] = generalist_seconds

    print(f"[demo] {steps - 1}/{steps} predicting the test images with nnUNetv2_predict", flush=True)
    for trainer in settings.trainers:
        pred = workdir / "predictions" / trainer
        if not (pred / "summary.json").exists():
            shutil.rmtree(pred, ignore_errors=True)  # ours (a previous, interrupted prediction), never user data
            _run(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", str(DEMO_DATASET_ID),
                  "-c", configuration, "-tr", trainer, "-f", "0", "-chk", "checkpoint_final.pth",
                  # no worker processes (nnU-Net's sequential path): each would import torch again, for a few
                  # small test images
                  "-device", device, "--disable_progress_bar", "-npp", "0", "-nps", "0"],
                 env, logs / f"predict_{trainer}.log")
        results[trainer]["predictions"] = str(pred)

    print(f"[demo] {steps}/{steps} evaluating (Dice per class against labelsTs)", flush=True)
    labels = {k: v for k, v in json.loads((raw / "dataset.json").read_text())["labels"].items() if v != 0}
    for trainer in settings.trainers:
        results[trainer]["dice"] = _dice(raw / "labelsTs", Path(results[trainer]["predictions"]), labels)

    report = {"settings": asdict(settings), "device": device, "budget": budget.description,
              "semisam_settings": SEMISAM_SETTINGS if settings.semisam else None,
              "generalist": DEMO_GENERALIST if settings.semisam else None,
              "results": results, "total_seconds": round(time.time() - started, 1)}
    (workdir / "demo_results.json").write_text(json.dumps(report, indent=2))
    title = (f"{settings.labeled} labeled + {settings.unlabeled} unlabeled images, {configuration}, "
             f"budget '{settings.budget}' on {device}")
    _plot(results, list(labels), workdir / "demo_results.png", title)
    _plot_examples(raw, results, workdir / "demo_examples.png")
    print()
    print(format_table(results, list(labels)))
    print(f"\n{title}. Results: {workdir / 'demo_results.json'}, plots: {workdir / 'demo_results.png'} (Dice), "
          f"{workdir / 'demo_examples.png'} (test images)")
    return report


def _previous_results(workdir: Path) -> Dict[str, dict]:
    """Training times of an earlier run of the demo in this folder (a skipped training keeps its time)."""
    record = workdir / "demo_results.json"
    return json.loads(record.read_text()).get("results", {}) if record.exists() else {}


def format_table(results: Dict[str, dict], labels: List[str]) -> str:
    header = "| trainer | " + " | ".join(f"Dice {l}" for l in labels) + \
             " | mean Dice | training time (s) | generalist time (s) |"
    rows = [header, "|" + "---|" * (len(labels) + 4)]
    for trainer, r in results.items():
        train_seconds = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        rows.append(f"| {trainer} | " + " | ".join(f"{r['dice'][l]:.3f}" for l in labels) +
                    f" | {r['dice']['mean']:.3f} | {train_seconds} | {r['generalist_seconds']:.0f} |")
    return "\n".join(rows)
