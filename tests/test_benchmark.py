"""The one-command benchmark end to end on generated data with the `smoke` budget: held-out test set, reports whose
numbers agree with the per-case evaluation, resuming without retraining, refusing to mix splits or foreign
trainings, and the cluster flow (--print-commands, --run, --report-only)."""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

from conftest import SYNTHETIC_ID, SYNTHETIC_NAME, copy_nnunet_tree, run_cli, tree_digest
from nnunet_foundation.benchmark import Benchmark, BenchmarkError, BenchmarkSettings
from nnunet_foundation.benchmark.runner import FINISHED, PREDICT, RESUME, TRAIN, WAITING
from nnunet_foundation.benchmark.settings import LOWER, SSL, UPPER
from nnunet_foundation.evaluation import gap_closed

e2e = pytest.mark.e2e

CONFIGURATION = "3d_fullres"
# one labeled count keeps the real trainings to three (both bounds and one SSL row); nested folds of several labeled
# counts are checked on the plan, where nothing trains
BENCHMARK_ARGS = ["nnunet-foundation", "benchmark", "-d", SYNTHETIC_ID, "-c", CONFIGURATION, "--labeled", 2,
                  "--seeds", 0, "--num-val", 2, "--test-cases", 2, "--trainers", "nnUNetTrainerMeanTeacher",
                  "--budget", "smoke", "--device", "cpu", "-np", 0]  # 0: nnU-Net's sequential prediction
# both bounds train nnUNetTrainerEMA by default: an EMA export like Mean Teacher's teacher (--no-ema-baselines:
# nnUNetTrainer)
BASELINE = "nnUNetTrainerEMA_smoke"
RUN_IDS = [f"labeled-2_seed-0_{BASELINE}", "labeled-2_seed-0_nnUNetTrainerMeanTeacher_smoke",
           f"labeled-all_seed-0_{BASELINE}"]


# ------------------------------------------------------------------------------ fast: planning, state, safety
@pytest.fixture
def make_benchmark(nnunet_tree, monkeypatch, tmp_path):
    """Benchmark objects on a private copy of the planned synthetic dataset (nothing trains)."""
    root, env = nnunet_tree
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, env[key])

    def make(adopt_existing=False, **overrides):
        settings = dict(dataset=str(SYNTHETIC_ID), configuration=CONFIGURATION, labeled=(2, 4), seeds=(0, 1),
                        test_cases=2, budget="smoke", output=str(tmp_path / "out"))
        settings.update(overrides)
        return Benchmark(BenchmarkSettings(**settings), adopt_existing=adopt_existing)

    make.env = env
    return make


def test_plan_has_both_bounds_and_every_ssl_trainer_per_fold(make_benchmark):
    bench = make_benchmark(trainers=("nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS_smoke"))  # suffix is optional
    assert len(bench.runs) == 2 * (2 * 3 + 1) and len(bench.folds) == 6
    assert len({r.run_id for r in bench.runs}) == len({bench.training_folder(r) for r in bench.runs}) == 14
    for run in bench.runs:
        fold = bench.folds[run.fold]
        assert run.split == fold
        if run.role == UPPER:
            assert run.trainer == BASELINE and fold["unlabeled"] == [] and run.num_labeled is None
        else:
            assert len(fold["train"]) == run.num_labeled
            assert run.trainer == (BASELINE if run.role == LOWER else f"{run.method}_smoke")
    # per seed, the 2 labeled cases are among the 4 (a bigger labeled set only adds cases) and the unlabeled pool is
    # the rest of the training cases
    for seed_folds in (bench.folds[:3], bench.folds[3:]):
        two, four, full = seed_folds
        assert set(two["train"]) < set(four["train"]) and full["unlabeled"] == []
        assert set(two["train"]) | set(two["unlabeled"]) == set(four["train"]) | set(four["unlabeled"])
    assert sorted(r.method for r in bench.runs if r.role == SSL and r.fold == 0) == \
        ["nnUNetTrainerCPS", "nnUNetTrainerMeanTeacher"]
    # the command written into job scripts and reports reproduces exactly these settings
    from nnunet_foundation.cli import build_parser

    args = build_parser().parse_args(bench.settings.command_args("/somewhere"))
    assert (tuple(args.labeled), tuple(args.seeds), tuple(args.trainers), args.budget, args.test_cases) == \
        ((2, 4), (0, 1), ("nnUNetTrainerMeanTeacher", "nnUNetTrainerCPS"), "smoke", 2)
    assert args.ema_baselines
    # --no-ema-baselines: the stock trainer, exporting its last weights, for both bounds; the command keeps the flag
    stock = make_benchmark(ema_baselines=False)
    assert {r.trainer for r in stock.runs if r.role != SSL} == {"nnUNetTrainer_smoke"}
    assert not build_parser().parse_args(stock.settings.command_args("/somewhere")).ema_baselines


def test_cached_trainers_learn_from_the_generalist_labels_their_folds_labeled_only_model_prompted(make_benchmark):
    generalist = '{"backend": "sam", "model_type": "tiny", "allow_random_init": true}'
    bench = make_benchmark(cached_trainers=("nnUNetTrainerSemiSAM",), pseudo_label_generalist=generalist)
    cached = [r for r in bench.runs if r.pseudo_labels]
    assert len(cached) == 4 and all(r.role == SSL and r.trainer == "nnUNetTrainerSemiSAM_smoke" for r in cached)
    for run in cached:
        lower = bench.labeled_only_run(run)
        assert lower.role == LOWER and lower.fold == run.fold and bench.runs.index(lower) < bench.runs.index(run)
        # the fold's own labeled-only model prompts the generalist; the cache is the fold's, read by the training
        assert run.pseudo_labels == f"{BASELINE}__nnUNetPlans__fold{run.fold}"
        cmd = bench.pseudo_label_command(run)
        assert cmd[:2] == ["nnunet-foundation", "pseudo-label"] and cmd[cmd.index("-tr") + 1] == BASELINE
        assert cmd[cmd.index("-f") + 1] == str(run.fold) and cmd[cmd.index("--name") + 1] == run.pseudo_labels
        assert cmd[cmd.index("--generalists") + 1] == generalist
        assert bench.training_environment(run)["nnUNet_ssl_pseudo_labels"] == run.pseudo_labels
    assert all("nnUNet_ssl_pseudo_labels" not in bench.training_environment(r) for r in bench.runs
               if not r.pseudo_labels)
    # the reproducing command keeps both options; a job script says which job waits for which
    from nnunet_foundation.cli import build_parser

    args = build_parser().parse_args(bench.settings.command_args("/somewhere"))
    assert args.cached_trainers == ["nnUNetTrainerSemiSAM"] and args.pseudo_label_generalist == generalist
    bench.prepare()
    script = bench.job_script()
    assert script.count("#   after labeled-") == 4 and f"after labeled-2_seed-0_{BASELINE}" in script
    # online and cached at once would share nnU-Net's training folder; a generalist needs a cached trainer
    with pytest.raises(BenchmarkError, match="either"):
        make_benchmark(trainers=("nnUNetTrainerSemiSAM",), cached_trainers=("nnUNetTrainerSemiSAM_smoke",))
    with pytest.raises(BenchmarkError, match="--cached-trainers"):
        make_benchmark(pseudo_label_generalist=generalist)
    with pytest.raises(BenchmarkError, match="--pseudo-label-generalist"):
        make_benchmark(cached_trainers=("nnUNetTrainerSemiSAM",), pseudo_label_generalist='{"backend": "sam", "x": 1}')


def test_sfr_runs_its_fine_tuning_per_fold_before_training_and_reads_its_own_cache(make_benchmark):
    generalist = '{"backend": "sam", "model_type": "tiny", "allow_random_init": true}'
    bench = make_benchmark(trainers=("nnUNetTrainerMeanTeacher",), cached_trainers=("nnUNetTrainerSFR",),
                           pseudo_label_generalist=generalist,
                           prestage_options=("nnUNetTrainerSFR_smoke=--iterations 3 --save-every 2",))
    sfr = [r for r in bench.runs if r.method == "nnUNetTrainerSFR"]
    assert len(sfr) == 4 and all(r.prestage for r in sfr)
    assert not any(r.prestage for r in bench.runs if r.method != "nnUNetTrainerSFR")
    for run in sfr:
        # the fine-tuning on the fold's labeled cases, then its pseudo-labels: the cache the training reads
        cmd = bench.prestage_command(run)
        assert cmd[:2] == ["nnunet-foundation", "sfr"] and cmd[cmd.index("-f") + 1] == str(run.fold)
        assert cmd[cmd.index("--generalists") + 1] == generalist and "--pseudo-labels" in cmd
        assert cmd[cmd.index("--iterations") + 1] == "3" and cmd[cmd.index("--save-every") + 1] == "2"
        assert run.pseudo_labels == f"SFR__nnUNetPlans__fold{run.fold}"
        assert bench.training_environment(run)["nnUNet_ssl_pseudo_labels"] == run.pseudo_labels
    # the reproducing command keeps the options; the job script shows the pre-stage before the training
    from nnunet_foundation.cli import build_parser

    args = build_parser().parse_args(bench.settings.command_args("/somewhere"))
    assert args.prestage_options == ["nnUNetTrainerSFR=--iterations 3 --save-every 2"]
    bench.prepare()
    assert bench.job_script().count("#   first, per fold: nnunet-foundation sfr") == 4
    # online SFR: the same fine-tuning, no cache (the trainer segments unlabeled patches itself)
    online = make_benchmark(trainers=("nnUNetTrainerSFR",))
    run = next(r for r in online.runs if r.method == "nnUNetTrainerSFR")
    assert run.prestage and not run.pseudo_labels and "--pseudo-labels" not in online.prestage_command(run)
    # --pseudo-label-generalist configures online SFR's pre-stage too (no cached trainer, no generalist row needed)
    online = make_benchmark(trainers=("nnUNetTrainerSFR",), pseudo_label_generalist=generalist)
    run = next(r for r in online.runs if r.method == "nnUNetTrainerSFR")
    command = online.prestage_command(run)
    assert command[command.index("--generalists") + 1] == generalist
    # IFL's rows: the pre-stage trains them (every round up to the row's, round 0 the fold's labeled-only model)
    ifl = make_benchmark(trainers=("nnUNetTrainerIFLRound1", "nnUNetTrainerIFLRound2"), pseudo_label_generalist=generalist)
    for run in (r for r in ifl.runs if r.method.startswith("nnUNetTrainerIFLRound")):
        rounds = run.method[-1]
        command = ifl.prestage_command(run)
        assert ifl.prestage_trains(run) and ifl.main_command(run) == command
        assert command[:2] == ["nnunet-foundation", "ifl"] and command[command.index("--rounds") + 1] == rounds
        assert command[command.index("--budget") + 1] == "smoke" and command[command.index("-f") + 1] == str(run.fold)
        assert run.pseudo_labels == f"IFL__nnUNetPlans__fold{run.fold}__round{rounds}"
    assert not any(ifl.prestage_trains(r) for r in ifl.runs if not r.method.startswith("nnUNetTrainerIFL"))
    ifl.prepare()
    script = ifl.job_script()
    assert script.count("(trains the run), then nnUNetv2_predict") == 8
    assert "first the generalist's labels" not in script  # IFL's labels are its own command's, not the cache's
    # options for a trainer without a pre-stage, or one not in the benchmark, are refused before anything runs
    with pytest.raises(BenchmarkError, match="has no pre-stage"):
        make_benchmark(prestage_options=("nnUNetTrainerMeanTeacher=--iterations 3",))
    with pytest.raises(BenchmarkError, match="TRAINER=OPTIONS"):
        make_benchmark(prestage_options=("nnUNetTrainerSFR=--iterations 3",))


def test_a_generalist_row_follows_each_labeled_only_run_and_trains_nothing(make_benchmark):
    from nnunet_foundation.benchmark.settings import GENERALIST

    generalist = '{"backend": "sam", "model_type": "tiny", "allow_random_init": true}'
    bench = make_benchmark(generalist_row=True, pseudo_label_generalist=generalist)
    rows = [r for r in bench.runs if r.role == GENERALIST]
    assert len(rows) == 4  # one per scarce fold, none for the fully supervised fold
    for run in rows:
        lower = bench.labeled_only_run(run)
        assert bench.runs.index(lower) == bench.runs.index(run) - 1 and run.prompted_by == lower.trainer
        assert bench.training_folder(run) == bench.training_folder(lower)  # its model is the labeled-only one
        cmd = bench.predict_generalist_command(run)
        assert cmd[:2] == ["nnunet-foundation", "predict-generalist"] and cmd[cmd.index("-tr") + 1] == BASELINE
        assert cmd[cmd.index("-f") + 1] == str(run.fold) and cmd[cmd.index("--generalists") + 1] == generalist
        assert cmd[cmd.index("-o") + 1] == str(bench.predictions_folder(run))
        # shown as what it does (--dry-run): a prediction that waits for its model, never a training
        assert bench.main_command(run) == cmd and bench.status(run) == WAITING
        assert bench.main_command(lower) == bench.train_command(lower) and bench.status(lower) == TRAIN
    from nnunet_foundation.cli import build_parser

    args = build_parser().parse_args(bench.settings.command_args("/somewhere"))
    assert args.generalist_row and args.pseudo_label_generalist == generalist
    bench.prepare()
    script = bench.job_script()
    assert script.count("predict-generalist") == 4 and script.count("#   after labeled-") == 4
    with pytest.raises(BenchmarkError, match="train that run first"):  # a job started before its labeled-only run
        bench.execute([rows[0]])
    assert make_benchmark(trainers=(), generalist_row=True).runs  # the generalist row alone is a study


def test_a_co_training_trainer_adds_a_row_of_its_own_sam_after_its_run(make_benchmark):
    """SC-SAM (and SynFoC) fine-tune a SAM beside nnU-Net; the paper reports that SAM, so the benchmark scores it
    too, as a row that trains nothing and predicts with the run's checkpoint (predict-sam-student)."""
    from nnunet_foundation.benchmark.runner import SAM_WAITING
    from nnunet_foundation.benchmark.settings import COTRAINED_SAM

    bench = make_benchmark(trainers=("nnUNetTrainerMeanTeacher", "nnUNetTrainerSCSAM"))
    rows = [r for r in bench.runs if r.role == COTRAINED_SAM]
    assert len(rows) == 4  # one per scarce fold; Mean Teacher has no SAM, the bounds have none
    for run in rows:
        scsam = bench.co_training_run(run)
        assert scsam.trainer == "nnUNetTrainerSCSAM_smoke" and scsam.fold == run.fold and scsam.role == SSL
        assert run.run_id == scsam.run_id + "+sam" and bench.runs.index(scsam) == bench.runs.index(run) - 1
        assert bench.training_folder(run) == bench.training_folder(scsam)  # the SAM is in that run's checkpoint
        cmd = bench.predict_sam_command(run)
        assert cmd[:2] == ["nnunet-foundation", "predict-sam-student"] and cmd[cmd.index("-tr") + 1] == scsam.trainer
        assert cmd[cmd.index("-f") + 1] == str(run.fold)
        assert cmd[cmd.index("-o") + 1] == str(bench.predictions_folder(run))
        assert cmd[cmd.index("-i") + 1] == str(bench.test_images)
        assert bench.main_command(run) == cmd and bench.status(run) == SAM_WAITING
        assert bench.main_command(scsam) == bench.train_command(scsam) and bench.status(scsam) == TRAIN
    bench.check_trainers()  # 'nnUNetTrainerSCSAM_smoke+sam' is a row, not a class nnU-Net must find
    bench.prepare()
    script = bench.job_script()
    assert script.count("predict-sam-student") == 4 and script.count("its checkpoint holds the SAM") == 4
    with pytest.raises(BenchmarkError, match="train that run first"):  # a job started before its co-training run
        bench.execute([rows[0]])
    assert not [r for r in make_benchmark().runs if r.role == COTRAINED_SAM]


@pytest.mark.parametrize("overrides,message", [
    (dict(budget="fast"), "unknown budget"),
    (dict(trainers=("nnUNetTrainer",)), "always runs"),
    (dict(trainers=("nnUNetTrainerEMA",)), "always runs"),
    (dict(test_cases=0), "held-out cases only"),
    (dict(labeled=(0, 2)), "at least 1"),
    (dict(labeled=(8,)), "leave no unlabeled case"),
    (dict(configuration="3d_lowres"), "not in"),
    (dict(dataset="977"), "not found"),
    (dict(num_processes=-1), "-np must be 0"),
])
def test_bad_settings_fail_before_anything_is_written(make_benchmark, tmp_path, overrides, message):
    with pytest.raises(BenchmarkError, match=message):
        make_benchmark(**overrides)
    assert not (tmp_path / "out").exists()


def test_run_states_follow_the_files_and_resume_with_c(make_benchmark):
    bench = make_benchmark()
    bench.prepare()
    run = bench.runs[0]
    folder = bench.training_folder(run)
    assert bench.status(run) == TRAIN and "--c" not in bench.train_command(run)
    folder.mkdir(parents=True)
    (folder / "checkpoint_latest.pth").write_bytes(b"interrupted")
    assert bench.status(run) == RESUME and bench.train_command(run, resume=True)[-1] == "--c"
    (folder / "checkpoint_final.pth").write_bytes(b"trained")
    assert bench.status(run) == PREDICT
    result = {"checkpoint": bench._checkpoint_signature(folder / "checkpoint_final.pth"),
              "split_digest": json.loads((bench.run_folder(run) / "run.json").read_text())["split_digest"]}
    (bench.run_folder(run) / "result.json").write_text(json.dumps(result))
    assert bench.status(run) == FINISHED
    (folder / "checkpoint_final.pth").write_bytes(b"retrained, other size")  # a new model: evaluate again
    assert bench.status(run) == PREDICT


def test_trainings_of_unknown_origin_are_refused_until_adopted(make_benchmark):
    bench = make_benchmark()
    foreign = bench.training_folder(bench.runs[0])
    foreign.mkdir(parents=True)
    (foreign / "checkpoint_final.pth").write_bytes(b"someone else's")
    with pytest.raises(BenchmarkError, match="--adopt-existing") as info:
        bench.prepare()
    assert str(foreign) in str(info.value) and not (bench.output / "runs").exists()  # nothing claimed
    assert "refused" in bench.plan_table()  # --dry-run shows it too
    adopted = make_benchmark(adopt_existing=True)
    adopted.prepare()
    assert adopted.status(adopted.runs[0]) == PREDICT and (foreign / "checkpoint_final.pth").read_bytes() == \
        b"someone else's"


def test_replaced_splits_make_old_trainings_stale_and_keep_a_backup(make_benchmark):
    bench = make_benchmark(seeds=(0,))
    bench.prepare()
    trained = bench.training_folder(bench.runs[2])  # fold 1: 4 labeled, seed 0
    trained.mkdir(parents=True)
    (trained / "checkpoint_final.pth").write_bytes(b"model")
    other = make_benchmark(seeds=(0,), labeled=(2, 3))
    with pytest.raises(BenchmarkError, match="--force"):
        other.prepare()
    assert json.loads(bench.splits_file.read_text()) == bench.folds
    with pytest.raises(BenchmarkError, match="fold_1"):  # fold 1 is now 3 labeled: the 4-labeled model is stale
        other.prepare(force=True)
    assert len(list(bench.preprocessed.glob("splits_final.json.*.bak"))) == 1
    assert (trained / "checkpoint_final.pth").read_bytes() == b"model"  # never deleted


def test_job_script_has_one_self_contained_job_per_run(make_benchmark):
    bench = make_benchmark()
    bench.prepare()
    script = bench.job_script()
    jobs = [line for line in script.splitlines() if line.startswith("nnunet-foundation") and "--run" in line]
    assert [shlex.split(j)[-1] for j in jobs] == [r.run_id for r in bench.runs]
    assert f"export nnUNet_preprocessed={make_benchmark.env['nnUNet_preprocessed']}" in script
    assert "nnunet-foundation benchmark" in script.splitlines()[-1] and "--run" not in script.splitlines()[-1]
    bench.verify_prepared()  # what a job checks first


# ------------------------------------------------------------------------------ end to end: real trainings
@pytest.fixture(scope="module")
def benchmark(synthetic_dataset, tmp_path_factory):
    """One benchmark run (3 smoke trainings) on a private copy of the synthetic tree, shared by this module."""
    root = tmp_path_factory.mktemp("benchmark") / "tree"
    env = copy_nnunet_tree(synthetic_dataset, root)
    raw_before = tree_digest(Path(env["nnUNet_raw"]))
    out = root.parent / "out"
    proc = run_cli(BENCHMARK_ARGS + ["--output", out], env, timeout=1200)
    return {"root": root, "env": env, "out": out, "proc": proc, "raw_before": raw_before,
            "preprocessed": Path(env["nnUNet_preprocessed"]) / SYNTHETIC_NAME,
            "results_dir": Path(env["nnUNet_results"]) / SYNTHETIC_NAME}


def checkpoints(results_dir: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(results_dir.rglob("checkpoint_final.pth"))}


@e2e
def test_held_out_test_set_is_in_no_fold_and_folds_have_the_promised_sizes(benchmark):
    pre, out = benchmark["preprocessed"], benchmark["out"]
    folds = json.loads((pre / "splits_final.json").read_text())
    test = json.loads((pre / "test_split.json").read_text())
    all_cases = sorted(p.name[:-len(".nii.gz")] for p in (benchmark["root"] / "nnUNet_raw" / SYNTHETIC_NAME /
                                                          "labelsTr").glob("*.nii.gz"))
    assert len(test) == 2 and set(test) <= set(all_cases)
    assert len(folds) == 2  # 2 labeled, all labeled (seed 0)
    for fold in folds:
        assert not set(test) & (set(fold["train"]) | set(fold["val"]) | set(fold["unlabeled"]))
        assert not set(fold["train"]) & set(fold["unlabeled"]) and not set(fold["val"]) & set(fold["train"])
    two, full = folds
    assert len(two["train"]) == 2
    assert full["unlabeled"] == [] and set(full["train"]) == set(all_cases) - set(test) - set(full["val"])
    # the test images given to nnUNetv2_predict are exactly the held-out cases; the raw dataset was only read
    assert sorted(p.name[:-len(".nii.gz")] for p in (out / "test_data" / "labelsTs").iterdir()) == test
    assert sorted(p.name for p in (out / "test_data" / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in test]
    assert tree_digest(Path(benchmark["env"]["nnUNet_raw"])) == benchmark["raw_before"]
    results = json.loads((out / "results.json").read_text())
    assert results["test_cases"] == test
    for run in results["runs"]:
        assert sorted(c["case"] for c in run["evaluation"]["per_case"]) == test
    # every training really used its fold: nnU-Net logs the split sizes it trained and validated on
    sizes = {"labeled-2": 2, "labeled-all": len(full["train"])}
    for run_id in RUN_IDS:
        log = (out / "logs" / f"{run_id}.train.log").read_text()
        assert f"This split has {sizes[run_id.split('_')[0]]} training and 2 validation cases" in log


def _cell_mean(cell: str) -> float:
    return float(cell.split("±")[0].strip())


@e2e
def test_reports_exist_and_agree_with_the_per_case_evaluation(benchmark):
    out = benchmark["out"]
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for png in ("dice_vs_labeled.png", "nsd_hd95_vs_labeled.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
        assert f"]({png})" in report
    assert sorted(r["run"]["run_id"] for r in results["runs"]) == sorted(RUN_IDS)
    assert results["missing_runs"] == [] and results["budget"]["name"] == "smoke"
    assert results["budget"]["total_iterations"] == 8 and results["seeds"] == [0]
    assert results["machine"]["report"]["torch"] and results["machine"]["report"]["nnunetv2"]
    assert "nnunet-foundation benchmark -d 900" in report and "2 epochs x 4 iterations" in report

    runs = {r["run"]["run_id"]: r for r in results["runs"]}
    # per-run evaluation file == the run in results.json; aggregates == recomputed from per-case numbers
    for run_id, r in runs.items():
        assert json.loads((out / "runs" / run_id / "result.json").read_text())["evaluation"] == r["evaluation"]
        assert r["training"]["epochs"] == 2 and len(r["training"]["curves"]["train_losses"]) == 2
        # the training's CPU time (its processes, measured from here) beside its wall time: how busy it kept the cores
        timings = r["timings"]
        assert 0 < timings["train_cpu_s"] <= timings["train_wall_s"] * os.cpu_count() * 1.05
        busy = timings["train_cpu_s"] / timings["train_wall_s"]
        row = next(line for line in report.split("## Runs\n", 1)[1].splitlines() if line.startswith(f"| {run_id} |"))
        assert f"| {busy:.1f} |" in row
    assert "*cores busy*" in report
    # no nnUNet_ssl_* variable was set: every training recorded its settings, all at the class defaults
    assert all(r["settings"]["changed"] == {} and r["settings"]["recorded"] for r in results["runs"])
    assert "every training ran with its trainer's default settings" in report
    assert "unsup_loss" in runs[RUN_IDS[1]]["training"]["curves"]  # SSL terms of the Mean Teacher log
    table = {}
    for line in report.split("## Dice\n", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0].startswith("nnUNetTrainer"):
            table[cells[0].split(" ")[0]] = cells[1:]
    assert set(table) == {BASELINE, "nnUNetTrainerMeanTeacher_smoke"}
    # the report says which model each row's predictions came from
    assert f"`{BASELINE}`: EMA of the weights" in report and "`nnUNetTrainerMeanTeacher_smoke`: EMA teacher" in report
    for trainer, columns in ((BASELINE, ["2", "all"]), ("nnUNetTrainerMeanTeacher_smoke", ["2"])):
        for i, column in enumerate(columns):
            run_id = f"labeled-{column}_seed-0_{trainer}"
            per_case = [np.mean([m["Dice"] for m in c["metrics"].values()])
                        for c in runs[run_id]["evaluation"]["per_case"]]
            aggregate = results["aggregates"][trainer][column]["foreground_mean"]["Dice"]
            assert aggregate["mean"] == pytest.approx(np.mean(per_case))
            assert aggregate["std_over_cases"] == pytest.approx(np.std(per_case, ddof=1))
            assert _cell_mean(table[trainer][i]) == pytest.approx(aggregate["mean"], abs=5e-4)
    # every run here exports another model than it trains (an EMA): it is scored as its trained network too, from
    # checkpoint_student.pth, whose weights are the student the final checkpoint keeps - not the exported ones
    import torch

    for run_id, r in runs.items():
        assert sorted(c["case"] for c in r["student_evaluation"]["per_case"]) == sorted(results["test_cases"])
        assert len(list((out / "predictions" / f"{run_id}__student").glob("*.nii.gz"))) == 2
        folder = Path(r["training_folder"])
        final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        student = torch.load(folder / "checkpoint_student.pth", map_location="cpu", weights_only=False)
        kept = (final.get("ssl_state") or final.get("ema_state"))["student_weights"]
        assert student["trainer_name"] == final["trainer_name"] and student["init_args"] == final["init_args"]
        assert all(torch.equal(student["network_weights"][k], kept[k]) for k in kept)
        assert any(not torch.equal(final["network_weights"][k], kept[k]) for k in kept)
        assert f"{run_id}.predict_student.log" in os.listdir(out / "logs")
    assert {(row["trainer"], row["labeled"]) for row in results["students"]} == \
        {(BASELINE, "2"), (BASELINE, "all"), ("nnUNetTrainerMeanTeacher_smoke", "2")}
    section = report.split("## Exported model and the trained network\n", 1)[1].split("\n## ", 1)[0]
    row = next(row for row in results["students"] if row["trainer"] == "nnUNetTrainerMeanTeacher_smoke")
    assert f"| nnUNetTrainerMeanTeacher_smoke | 2 | EMA teacher | {row['exported_dice']:.3f} | " \
           f"{row['student_dice']:.3f} |" in section
    # predicted / reference volume: per class, the median over the test cases that have the structure
    section = report.split("## Predicted / reference volume per class", 1)[1].split("\n## ", 1)[0]
    for trainer, columns in ((BASELINE, ["2", "all"]), ("nnUNetTrainerMeanTeacher_smoke", ["2"])):
        for column in columns:
            cases = runs[f"labeled-{column}_seed-0_{trainer}"]["evaluation"]["per_case"]
            per_class = results["aggregates"][trainer][column]["per_class"]
            cells = []
            for key in ("1", "2"):
                ratios = [c["metrics"][key]["n_pred"] / c["metrics"][key]["n_ref"] for c in cases
                          if c["metrics"][key]["n_ref"]]
                assert per_class[key]["volume_ratio"] == {"median": pytest.approx(float(np.median(ratios))),
                                                          "n_cases": len(ratios)}
                cells.append(f"{np.median(ratios):.2f}")
            assert f"| {trainer} | {column} | {' | '.join(cells)} |" in section
    # gap closed = (ssl - lower) / (upper - lower) on the runs' means
    mean = {k: v["evaluation"]["foreground_mean"]["Dice"]["mean"] for k, v in runs.items()}
    for n in ("2",):
        expected = gap_closed(mean[f"labeled-{n}_seed-0_nnUNetTrainerMeanTeacher_smoke"],
                              mean[f"labeled-{n}_seed-0_{BASELINE}"], mean[RUN_IDS[2]])
        got = results["gap_closed"]["nnUNetTrainerMeanTeacher_smoke"][n]["Dice"]["per_seed"]["0"]
        assert (math.isnan(expected) and got is None or math.isnan(got)) if math.isnan(expected) else \
            got == pytest.approx(expected)


@e2e
def test_rerun_skips_finished_runs_and_trains_nothing(benchmark):
    before = checkpoints(benchmark["results_dir"])
    results_before = (benchmark["out"] / "results.json").read_text()
    assert len(before) == 3
    proc = run_cli(BENCHMARK_ARGS + ["--output", benchmark["out"]], benchmark["env"])
    assert proc.stdout.count("finished earlier, skipped") == 3
    assert "training:" not in proc.stdout and "nnUNetv2_train" not in proc.stdout
    assert checkpoints(benchmark["results_dir"]) == before
    # the closing lines name the PNGs written (one test domain here: no per-domain plot)
    results_after = json.loads((benchmark["out"] / "results.json").read_text())
    plots = ["dice_vs_labeled.png", "nsd_hd95_vs_labeled.png", "training_curves.png"]
    assert results_after["plots"] == plots
    assert f"plots: {', '.join(str(benchmark['out'].resolve() / name) for name in plots)}" in proc.stdout
    # same numbers; only the machine/command record may be rewritten
    assert results_after["aggregates"] == json.loads(results_before)["aggregates"]


@e2e
def test_a_run_stopped_after_training_keeps_its_training_time(benchmark):
    """A benchmark killed between a training and its evaluation (a job's time limit, a machine restart) predicts
    the run on the next call; the training's timings, kept beside run.json when it ended, still reach result.json."""
    run_folder = benchmark["out"] / "runs" / RUN_IDS[0]
    finished = json.loads((run_folder / "result.json").read_text())
    kept = json.loads((run_folder / "training_timings.json").read_text())
    assert kept["timings"]["train_wall_s"] == finished["timings"]["train_wall_s"] > 0
    (run_folder / "result.json").unlink()  # as if stopped while predicting
    proc = run_cli(BENCHMARK_ARGS + ["--output", benchmark["out"], "--run", RUN_IDS[0]], benchmark["env"])
    assert "trained earlier" in proc.stdout
    again = json.loads((run_folder / "result.json").read_text())
    assert again["timings"]["train_wall_s"] == finished["timings"]["train_wall_s"]
    assert again["timings"]["train_cpu_s"] == finished["timings"]["train_cpu_s"]
    assert again["evaluation"]["foreground_mean"] == finished["evaluation"]["foreground_mean"]


@e2e
def test_other_split_options_are_refused_without_force(benchmark):
    splits = benchmark["preprocessed"] / "splits_final.json"
    content = splits.read_text()
    at = BENCHMARK_ARGS.index("--labeled") + 1
    args = BENCHMARK_ARGS[:at] + [3] + BENCHMARK_ARGS[at + 1:]  # --labeled 3: other folds
    proc = run_cli(args + ["--output", benchmark["out"]], benchmark["env"], check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert splits.read_text() == content
    # an output folder that is not a benchmark folder is never written into
    foreign = benchmark["root"].parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    proc = run_cli(BENCHMARK_ARGS + ["--output", foreign], benchmark["env"], check=False)
    assert proc.returncode == 2 and "not a benchmark folder" in proc.stderr
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


@e2e
def test_dry_run_writes_nothing(benchmark):
    fresh = benchmark["root"].parent / "dry"
    proc = run_cli(BENCHMARK_ARGS + ["--output", fresh, "--dry-run"], benchmark["env"])
    assert not fresh.exists()
    assert "splits_final.json: same" in proc.stdout and proc.stdout.count("| train |") == 0  # all trained


@e2e
def test_cluster_flow_refuses_unknown_trainings_then_adopts_runs_one_job_and_reports(benchmark):
    env, out2 = benchmark["env"], benchmark["root"].parent / "out2"
    before = checkpoints(benchmark["results_dir"])
    # a new output folder does not know the trainings in nnUNet_results: their split is unknown -> refused
    proc = run_cli(BENCHMARK_ARGS + ["--output", out2, "--print-commands"], env, check=False)
    assert proc.returncode == 2 and "--adopt-existing" in proc.stderr and "fold_0" in proc.stderr
    proc = run_cli(BENCHMARK_ARGS + ["--output", out2, "--print-commands", "--adopt-existing"], env)
    jobs = [line for line in proc.stdout.splitlines() if line.startswith("nnunet-foundation") and "--run" in line]
    assert len(jobs) == 3 and "export nnUNet_results=" in proc.stdout
    # one job line, as a cluster would run it: predicts and evaluates (the training exists), trains nothing
    job = shlex.split(jobs[1])
    assert job[job.index("--run") + 1] == RUN_IDS[1]
    proc = run_cli(job, env)
    assert "trained earlier" in proc.stdout and (out2 / "runs" / RUN_IDS[1] / "result.json").is_file()
    proc = run_cli(BENCHMARK_ARGS + ["--output", out2, "--report-only"], env)
    results = json.loads((out2 / "results.json").read_text())
    assert [r["run"]["run_id"] for r in results["runs"]] == [RUN_IDS[1]]
    assert len(results["missing_runs"]) == 2 and "Incomplete" in (out2 / "report.md").read_text()
    assert checkpoints(benchmark["results_dir"]) == before


@e2e
def test_a_cached_row_is_added_to_a_finished_benchmark_from_the_generalist_labels(benchmark):
    """Run last: it adds runs to the module's benchmark. The same command with --cached-trainers keeps the finished
    runs, pseudo-labels fold 0's unlabeled cases with its labeled-only model, trains SemiSAM from them, reports it;
    --generalist-row adds the generalist alone, prompted by that model."""
    generalist = json.dumps({"backend": "sam", "model_type": "tiny", "allow_random_init": True})
    before = checkpoints(benchmark["results_dir"])
    with_ifl = [*BENCHMARK_ARGS[:BENCHMARK_ARGS.index("--trainers") + 2], "nnUNetTrainerIFLRound1",
                *BENCHMARK_ARGS[BENCHMARK_ARGS.index("--trainers") + 2:]]  # one more online trainer: IFL round 1
    proc = run_cli(with_ifl + ["--cached-trainers", "nnUNetTrainerSemiSAM", "nnUNetTrainerSFR",
                               "--pseudo-label-generalist", generalist, "--generalist-row",
                               "--prestage-options", "nnUNetTrainerSFR=--iterations 2 --save-every 1",
                               "--output", benchmark["out"]], benchmark["env"], timeout=1200)
    assert proc.stdout.count("finished earlier, skipped") == 3
    run_id = "labeled-2_seed-0_nnUNetTrainerSemiSAM_smoke"
    cache = benchmark["preprocessed"] / "nnUNetPlans_3d_fullres_pseudo_labels" / f"{BASELINE}__nnUNetPlans__fold0"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["specialist"]["trainer"] == BASELINE and manifest["specialist"]["fold"] == 0
    assert manifest["generalist"]["model_type"] == "tiny"
    fold = json.loads((benchmark["preprocessed"] / "splits_final.json").read_text())[0]
    assert {p.stem for p in cache.glob("*.npz")} >= set(fold["unlabeled"])
    train_log = (benchmark["out"] / "logs" / f"{run_id}.train.log").read_text()
    assert "pseudo-labels from the offline cache" in train_log and cache.name in train_log
    results = json.loads((benchmark["out"] / "results.json").read_text())
    run = next(r for r in results["runs"] if r["run"]["run_id"] == run_id)
    assert run["run"]["pseudo_labels"] == cache.name and run["timings"]["generalist_wall_s"] > 0
    assert "sam_loss" in run["training"]["curves"]
    report = (benchmark["out"] / "report.md").read_text()
    assert "nnUNetTrainerSemiSAM_smoke (semi-supervised, generalist labels prompted by the labeled-only model)" in report
    trainers_line = next(line for line in report.splitlines() if line.startswith("- **Trainers**"))
    assert "`nnUNetTrainerSemiSAM_smoke` (offline generalist labels)" in trainers_line
    assert "gap closed" in report.lower() and results["gap_closed"]["nnUNetTrainerSemiSAM_smoke"]["2"]
    # the generalist alone, prompted by fold 0's labeled-only model: scored on the test set, nothing trained for it
    alone = next(r for r in results["runs"] if r["run"]["run_id"] == f"labeled-2_seed-0_{BASELINE}+generalist")
    assert alone["run"]["role"] == "generalist alone" and alone["timings"]["generalist_wall_s"] > 0
    assert alone["training"] == {} and len(alone["evaluation"]["per_case"]) == len(results["test_cases"])
    assert "the generalist alone, prompted by the labeled-only model" in report
    assert f"{BASELINE}+generalist" in results["gap_closed"]
    # SFR: its pre-stage fine-tuned the generalist on fold 0's labeled cases and wrote its own cache, which the
    # training read (no labeled-only model prompted it)
    sfr_id = "labeled-2_seed-0_nnUNetTrainerSFR_smoke"
    sfr_cache = benchmark["preprocessed"] / "nnUNetPlans_3d_fullres_pseudo_labels" / "SFR__nnUNetPlans__fold0"
    assert {p.stem for p in sfr_cache.glob("*.npz")} >= set(fold["unlabeled"])
    assert "nnunet-foundation sfr" in (benchmark["out"] / "logs" / f"{sfr_id}.prestage.log").read_text()
    assert sfr_cache.name in (benchmark["out"] / "logs" / f"{sfr_id}.train.log").read_text()
    sfr = next(r for r in results["runs"] if r["run"]["run_id"] == sfr_id)
    assert sfr["run"]["prestage"] and sfr["run"]["pseudo_labels"] == sfr_cache.name
    assert sfr["timings"]["generalist_wall_s"] > 0 and "sfr_loss" in sfr["training"]["curves"]
    assert "nnUNetTrainerSFR_smoke (semi-supervised, with its per-fold pre-stage" in report
    # IFL round 1: its pre-stage (nnunet-foundation ifl --rounds 1) pseudo-labelled fold 0's unlabeled cases
    # prompted by round 0 - the labeled-only run's model, not trained again - and trained the round, warm-started;
    # the benchmark trained nothing after it
    ifl_id = "labeled-2_seed-0_nnUNetTrainerIFLRound1_smoke"
    ifl_log = (benchmark["out"] / "logs" / f"{ifl_id}.prestage.log").read_text()
    assert "== round 1: pseudo-labels prompted by " + BASELINE in ifl_log and "-pretrained_weights" in ifl_log
    assert not (benchmark["out"] / "logs" / f"{ifl_id}.train.log").exists()
    ifl_cache = benchmark["preprocessed"] / "nnUNetPlans_3d_fullres_pseudo_labels" / "IFL__nnUNetPlans__fold0__round1"
    assert {p.stem for p in ifl_cache.glob("*.npz")} == set(fold["unlabeled"])
    ifl = next(r for r in results["runs"] if r["run"]["run_id"] == ifl_id)
    assert ifl["run"]["prestage"] and ifl["timings"]["prestage_wall_s"] > 0 and "train_wall_s" not in ifl["timings"]
    assert ifl["training"]["epochs"] == 2 and "(all rounds, trainings included)" in report
    new = checkpoints(benchmark["results_dir"])
    # SemiSAM's, SFR's and IFL round 1's
    assert {k: v for k, v in new.items() if k in before} == before and len(new) == len(before) + 3


@e2e
def test_a_co_training_row_scores_its_nnunet_and_its_sam(benchmark, tmp_path):
    """Run last: it adds SC-SAM (tiny SAM) to the module's benchmark. Its run trains once and is scored through
    nnUNetv2_predict; its '+sam' row trains nothing and scores the SAM of that checkpoint (predict-sam-student)."""
    pytest.importorskip("segment_anything")
    from nnunet_foundation.foundation.tiny import save_tiny_sam_checkpoint

    sam = save_tiny_sam_checkpoint(tmp_path / "tiny_sam.pth", seed=3)
    env = {**benchmark["env"], "nnUNet_ssl_prompt_token_channels": "8",
           "nnUNet_ssl_generalists": json.dumps({"backend": "sam", "model_type": "tiny", "checkpoint": str(sam)})}
    before = checkpoints(benchmark["results_dir"])
    args = [*BENCHMARK_ARGS[:BENCHMARK_ARGS.index("--trainers") + 2], "nnUNetTrainerSCSAM",
            *BENCHMARK_ARGS[BENCHMARK_ARGS.index("--trainers") + 2:], "--output", benchmark["out"]]
    proc = run_cli(args, env, timeout=1200)
    assert proc.stdout.count("finished earlier, skipped") == 3
    run_id = "labeled-2_seed-0_nnUNetTrainerSCSAM_smoke"
    results = json.loads((benchmark["out"] / "results.json").read_text())
    unet = next(r for r in results["runs"] if r["run"]["run_id"] == run_id)
    sam_row = next(r for r in results["runs"] if r["run"]["run_id"] == run_id + "+sam")
    assert unet["training"]["epochs"] == 2 and "sam_loss" in unet["training"]["curves"]
    assert sam_row["run"]["role"] == "co-trained SAM" and sam_row["run"]["sam_of"] == "nnUNetTrainerSCSAM_smoke"
    assert sam_row["training"] == {} and sam_row["timings"]["generalist_wall_s"] > 0
    assert sam_row["checkpoint"] == unet["checkpoint"]  # the same training, read twice
    assert len(sam_row["evaluation"]["per_case"]) == len(results["test_cases"])
    log = (benchmark["out"] / "logs" / f"{run_id}+sam.predict.log").read_text()
    assert f"{len(results['test_cases'])} case(s) segmented by the SAM student" in log  # -np 0: sequential path
    predictions = sorted(p.name for p in (benchmark["out"] / "predictions" / f"{run_id}+sam").glob("*.nii.gz"))
    assert predictions == sorted(f"{c}.nii.gz" for c in results["test_cases"])
    report = (benchmark["out"] / "report.md").read_text()
    assert "nnUNetTrainerSCSAM_smoke+sam (its co-trained SAM" in report
    # the settings given through nnUNet_ssl_* are named where the row is (the run id shows none of them); the '+sam'
    # row trains nothing and records none, the bounds and Mean Teacher trained with their defaults
    assert unet["settings"]["recorded"]["prompt_token_channels"] == 8
    assert set(unet["settings"]["changed"]) == {"generalists", "prompt_token_channels"}
    assert sam_row["settings"] is None
    assert all(r["settings"]["changed"] == {} for r in results["runs"] if r["run"]["role"] != "co-trained SAM"
               and r["run"]["trainer"] != "nnUNetTrainerSCSAM_smoke")
    assert "`nnUNetTrainerSCSAM_smoke`: generalists " in report and "prompt_token_channels 8 (default" in report
    assert "| nnUNetTrainerSCSAM_smoke (non-default settings, above) |" in report
    assert f"{run_id}+sam" in report and "nnUNetTrainerSCSAM_smoke+sam" in results["gap_closed"]
    new = checkpoints(benchmark["results_dir"])
    assert {k: v for k, v in new.items() if k in before} == before and len(new) == len(before) + 1  # SC-SAM's only


def _scored_run(trainer, role, n, seed, dice):
    """A finished run as results.json holds it, one test case of the given Dice (HD95, NSD alongside)."""
    metrics = {"Dice": dice, "HD95": 10 * (1 - dice), "NSD": dice}
    return {"run": {"trainer": trainer, "role": role, "method": trainer, "num_labeled": n, "num_train": n or 10,
                    "seed": seed, "run_id": f"labeled-{n or 'all'}_seed-{seed}_{trainer}"},
            "evaluation": {"classes": {"1": "fg"},
                           "per_case": [{"case": "c0", "foreground_mean": metrics, "metrics": {"1": metrics}}],
                           "foreground_mean": {m: {"mean": v} for m, v in metrics.items()}}}


def test_volume_ratio_is_the_median_over_cases_that_have_the_structure():
    from nnunet_foundation.benchmark.report import volume_ratio

    cases = [{"n_ref": 100, "n_pred": 140}, {"n_ref": 50, "n_pred": 40}, {"n_ref": 10, "n_pred": 30},
             {"n_ref": 0, "n_pred": 7}]  # no structure: no ratio (Dice and HD95 score that case)
    assert volume_ratio(cases) == {"median": pytest.approx(1.4), "n_cases": 3}
    assert volume_ratio([{"n_ref": 0, "n_pred": 0}])["n_cases"] == 0


def test_report_says_which_seeds_a_row_pools_when_they_differ_from_its_bounds():
    """A row measured at seed 1 only, pooled beside bounds of seeds 0 and 1, reads better or worse than it is (each
    seed has its own labeled cases): its cells say so; rows with the bounds' seeds carry no note."""
    from nnunet_foundation.benchmark import report

    results = [_scored_run("Base", LOWER, 4, 0, 0.45), _scored_run("Base", LOWER, 4, 1, 0.35),
               _scored_run("Base", UPPER, None, 0, 0.55), _scored_run("Base", UPPER, None, 1, 0.50),
               _scored_run("Both", SSL, 4, 0, 0.50), _scored_run("Both", SSL, 4, 1, 0.40),
               _scored_run("Late", SSL, 4, 1, 0.40)]
    data = {"aggregates": report.aggregate(results)}
    table = "\n".join(report._metric_table(data, "Dice", "std_over_cases", ["4", "all"], "all labeled"))
    late = next(line for line in table.splitlines() if line.startswith("| Late "))
    both = next(line for line in table.splitlines() if line.startswith("| Both "))
    assert "0.400 (seed 1)" in late and "seed" not in both and "0.450" in both
    gap_lines = report._gap_table(report.gaps(results))
    late_gap = next(line for line in gap_lines if line.startswith("| Late | Dice"))
    both_gap = next(line for line in gap_lines if line.startswith("| Both | Dice"))
    # seed 1: (0.40 - 0.35) / (0.50 - 0.35) = 1/3
    assert "0.333 (seed 1)" in late_gap and "seed" not in both_gap


def test_report_names_the_settings_each_row_trained_with_and_flags_a_row_that_mixes_two(tmp_path):
    """Settings set through nnUNet_ssl_* appear in no run id: the report reads each training's ssl_settings.json
    (written by the trainer's own recording function) and names what differs from the class defaults."""
    from nnunet_foundation.benchmark import report
    from nnunet_foundation.methods.cps import nnUNetTrainerCPS
    from nnunet_foundation.training.baselines import nnUNetTrainerEMA
    from nnunet_foundation.training.settings import record_or_check_settings

    def trained(trainer, role, n, seed, dice, settings):
        result = _scored_run(trainer.__name__, role, n, seed, dice)
        folder = tmp_path / result["run"]["run_id"]
        if settings is not None:
            record_or_check_settings(str(folder), settings, trainer.__name__, resuming=False)
        result["training_folder"] = str(folder)
        return result

    cps_default = nnUNetTrainerCPS.default_settings
    reweighted = {**cps_default, "unsup_weight": 1.5, "rampup_length": 0.0}
    results = [trained(nnUNetTrainerEMA, LOWER, 4, 0, 0.45, nnUNetTrainerEMA.default_settings),
               trained(nnUNetTrainerEMA, UPPER, None, 0, 0.55, None),  # records nothing (e.g. nnU-Net's trainer)
               trained(nnUNetTrainerCPS, SSL, 4, 0, 0.50, reweighted)]
    defaults = {"nnUNetTrainerEMA": nnUNetTrainerEMA.default_settings, "nnUNetTrainerCPS": cps_default}
    for r in results:
        r["settings"] = report.trained_settings(r, defaults)
    assert results[0]["settings"]["changed"] == {} and results[1]["settings"] is None
    assert results[2]["settings"]["changed"] == {
        "rampup_length": {"value": 0.0, "default": cps_default["rampup_length"]},
        "unsup_weight": {"value": 1.5, "default": cps_default["unsup_weight"]}}
    data = {"aggregates": report.aggregate(results), "settings_changed": report.settings_by_trainer(results)}
    lines = report._settings_lines(data)
    assert len(lines) == 1 and "`nnUNetTrainerCPS`: rampup_length 0.0 (default 1.0), unsup_weight 1.5 (default " \
        f"{cps_default['unsup_weight']})" in lines[0]
    table = report._metric_table(data, "Dice", "std_over_cases", ["4", "all"], "all labeled")
    assert any(line.startswith("| nnUNetTrainerCPS (non-default settings") for line in table)
    assert not any("non-default" in line for line in table if line.startswith("| nnUNetTrainerEMA"))

    # a second CPS run at the defaults pooled into the same row: the report says the row mixes two configurations
    results.append(trained(nnUNetTrainerCPS, SSL, 4, 1, 0.40, cps_default))
    results[-1]["settings"] = report.trained_settings(results[-1], defaults)
    data["settings_changed"] = report.settings_by_trainer(results)
    lines = report._settings_lines(data)
    assert "labeled-4_seed-1_nnUNetTrainerCPS: the defaults" in lines[0]
    assert "differ between the runs of one row** (`nnUNetTrainerCPS`)" in lines[1]
