"""The benchmark's steps: splits, held-out test export, trainings, predictions, evaluation — resumable.

Folders (``OUTPUT`` is ``--output``; nothing outside it is written except ``splits_final.json``,
``splits_info.json`` and ``test_split.json`` in the preprocessed dataset folder and nnU-Net's own training folders
in ``nnUNet_results``):

    OUTPUT/.nnunet_foundation_benchmark    marker: dataset/configuration/plans this folder belongs to
    OUTPUT/test_data/imagesTs, labelsTs     copies of the held-out cases' raw files (the raw dataset is only read)
    OUTPUT/runs/<run_id>/run.json           the claim: this run's fold (and its digest) trains in <training folder>
    OUTPUT/runs/<run_id>/training_timings.json  the training's (and generalist pass's) timings, written when it
                                            ends, so that a run stopped before its evaluation keeps them
    OUTPUT/runs/<run_id>/result.json        written last: evaluation, training curves, timings (= "finished")
    OUTPUT/predictions/<run_id>/            nnUNetv2_predict output for the test cases
    OUTPUT/predictions/<run_id>+sam/        predict-sam-student output: the SAM a co-training run (SC-SAM, SynFoC)
                                            fine-tuned, a row of its own (role "co-trained SAM")
    OUTPUT/predictions/<run_id>__student/   the same with the trained network of a run that exports another
                                            model (an EMA teacher; checkpoint_student.pth in its training folder)
    OUTPUT/logs/<run_id>.train.log, ...     full output of every command (.pseudo_label.log: a cached run's
                                            generalist pass, see --cached-trainers)

A ``--cached-trainers`` run also reads, and the first time writes, the pseudo-label cache of its fold in the
preprocessed folder (``<data identifier>_pseudo_labels/<labeled-only trainer>__<plans>__fold<F>``; nnunet-foundation
pseudo-label refuses a cache made from another model or generalist, so a retrained labeled-only run needs that cache
folder moved away).

Resuming: a run whose ``result.json`` matches its current ``checkpoint_final.pth`` and fold is skipped; a trained
run without result is predicted and evaluated; a training with ``checkpoint_latest.pth`` only resumes with ``--c``.

Stale results are refused, never deleted: a training folder that exists with a checkpoint but was not claimed by
this benchmark for the current fold (another study, or splits replaced with ``--force``) stops the benchmark with
the folder's path, unless ``--adopt-existing`` says that it was trained on the current split.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from nnunet_foundation.benchmark.settings import (COTRAINED_SAM, GENERALIST, LOWER, SSL, UPPER, BenchmarkError,
                                                 BenchmarkSettings, Run)
from nnunet_foundation.subprocesses import CommandFailed, nnunet_environment, run_logged
from nnunet_foundation.training.checkpoint_files import STUDENT_CHECKPOINT, was_interrupted, write_student_checkpoint

MARKER = ".nnunet_foundation_benchmark"
# lines of nnU-Net's training output shown live (everything goes to the log file)
PROGRESS_MARKERS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "semi-supervised:", "== round")

TRAIN, RESUME, PREDICT, FINISHED = "train", "resume", "predict+evaluate", "finished"
WAITING = "waits for its labeled-only run"  # a generalist row before the model that prompts it is trained
SAM_WAITING = "waits for its co-training run"  # a co-trained SAM row before the run that tunes the SAM is trained
#: roles of the rows that train nothing: they predict with the model of another run of their fold
PREDICT_ONLY = (GENERALIST, COTRAINED_SAM)


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _load_json(path: Path):
    with open(path) as f:
        return json.load(f)


def _write_json(data, path: Path) -> None:
    from nnunet_foundation.evaluation import write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(data, str(path))


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of every finished child process of this one (and theirs, once waited for)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _minutes(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Benchmark:
    def __init__(self, settings: BenchmarkSettings, adopt_existing: bool = False):
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw, nnUNet_results
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

        from nnunet_foundation.training.budgets import BUDGETS

        self.settings = settings.normalised()
        self.adopt_existing = adopt_existing
        self.budget = BUDGETS[self.settings.budget]
        for var in (nnUNet_raw, nnUNet_preprocessed, nnUNet_results):
            if not var.is_set():
                raise BenchmarkError(f"{var.env_var_name} is not set; export nnUNet_raw, nnUNet_preprocessed and "
                                     f"nnUNet_results as for any nnU-Net command.")
        try:
            self.dataset_name = maybe_convert_to_dataset_name(self.settings.dataset)
        except RuntimeError as e:
            raise BenchmarkError(f"dataset {self.settings.dataset!r} not found: {e}") from None
        self.dataset_id = int(self.dataset_name[len("Dataset"):len("Dataset") + 3])
        self.raw = Path(nnUNet_raw.require()) / self.dataset_name
        self.preprocessed = Path(nnUNet_preprocessed.require()) / self.dataset_name
        self.results_root = Path(nnUNet_results.require()) / self.dataset_name
        self.output = Path(self.settings.output).resolve()
        self._check_dataset()
        self.env = nnunet_environment()  # the nnUNetv2_* subprocesses' one
        self.runs, self.folds, self.fold_infos, self.test_cases = self._plan()

    # ------------------------------------------------------------------------------------------ checks, plan
    def _check_dataset(self) -> None:
        plans_file = self.preprocessed / f"{self.settings.plans}.json"
        if not plans_file.is_file():
            raise BenchmarkError(f"{plans_file} not found: plan and preprocess the dataset first "
                                 f"(nnUNetv2_plan_and_preprocess -d {self.dataset_id} -c {self.settings.configuration})")
        plans = _load_json(plans_file)
        configurations = plans.get("configurations", {})
        if self.settings.configuration not in configurations:
            raise BenchmarkError(f"configuration '{self.settings.configuration}' is not in {plans_file} "
                                 f"(available: {', '.join(configurations)})")
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        identifier = PlansManager(plans).get_configuration(self.settings.configuration).data_identifier
        self.data_identifier = identifier
        if not (self.preprocessed / identifier).is_dir():
            raise BenchmarkError(f"{self.preprocessed / identifier} does not exist: run nnUNetv2_plan_and_preprocess "
                                 f"-d {self.dataset_id} -c {self.settings.configuration}")
        if not (self.raw / "dataset.json").is_file():
            raise BenchmarkError(f"{self.raw / 'dataset.json'} not found: the held-out test cases are copied from the "
                                 f"raw dataset, so nnUNet_raw must hold it")
        self.dataset_json = _load_json(self.raw / "dataset.json")

    def check_trainers(self) -> None:
        """Every trainer class must be findable by nnU-Net before hours of training start."""
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        missing = []
        previous = os.environ.get("nnUNet_extTrainer")
        os.environ["nnUNet_extTrainer"] = self.env["nnUNet_extTrainer"]
        try:
            for name in sorted({r.trainer for r in self.runs if r.role not in PREDICT_ONLY}):
                try:
                    # nnU-Net narrates its search, and importing its trainers warns about torch.jit
                    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        recursive_find_trainer_class_by_name(name)
                except (RuntimeError, AssertionError):
                    missing.append(name)
        finally:
            if previous is None:
                os.environ.pop("nnUNet_extTrainer", None)
            else:
                os.environ["nnUNet_extTrainer"] = previous
        if missing:
            raise BenchmarkError(f"trainer class(es) {missing} not found by nnU-Net (searched nnunetv2 and "
                                 f"nnUNet_extTrainer={self.env['nnUNet_extTrainer']}). Trainer names are given "
                                 f"without the budget suffix (--trainers nnUNetTrainerMeanTeacher --budget "
                                 f"{self.settings.budget}).")

    def _plan(self):
        from nnunet_foundation.splits import (CaseDomains, SplitError, draw_test_cases, draw_test_cases_by_group,
                                              labeled_cases, make_label_scarcity_splits, parse_domain_fractions)

        s = self.settings
        try:
            cases = labeled_cases(str(self.preprocessed))
            # domains.json (convert-2d): needed by the per-domain options, and gives the report per-domain metrics
            self.case_domains = CaseDomains.load_if_present(str(self.raw))
            if (s.test_fraction or s.labeled_domains) and self.case_domains is None:
                raise BenchmarkError(f"--test-fraction and --labeled-domain need {self.raw / 'domains.json'} (the "
                                     f"cases' domains and groups, written by 'nnunet-foundation convert-2d')")
            if self.case_domains is not None:
                self.case_domains.check_covers(cases)
            if s.test_list:
                try:
                    test = sorted(set(_load_json(Path(s.test_list))))
                except (OSError, ValueError) as e:
                    raise BenchmarkError(f"--test-list {s.test_list}: {e} (expected a JSON list of case ids)") from None
            elif s.test_fraction:
                test = draw_test_cases_by_group(cases, self.case_domains, parse_domain_fractions(s.test_fraction),
                                                s.test_seed)
            else:
                test = draw_test_cases(cases, s.test_cases, s.test_seed)
            labeled_from = None
            if s.labeled_domains:
                self.case_domains.check_names(s.labeled_domains, "--labeled-domain")
                labeled_from = self.case_domains.cases_of(s.labeled_domains, cases)
            folds, infos = make_label_scarcity_splits(cases, s.labeled, s.seeds, s.num_val, test, with_full=True,
                                                      labeled_from=labeled_from,
                                                      other_seeds_at=s.other_seeds_at or None)
        except SplitError as e:
            raise BenchmarkError(str(e)) from None
        # the benchmark's trainer classes, looked up once (it imports every method module)
        from nnunet_foundation.training.settings import package_trainer_classes

        methods = set(s.trainers) | set(s.cached_trainers)
        classes = {cls.__name__: cls for cls in package_trainer_classes() if cls.__name__ in methods}
        self.prestage_hooks = prestaged = self._prestage_hooks(classes)  # prestage_command reuses it
        # online trainers that fine-tune a SAM of their own: each gets a row of that SAM
        cotrained = {name for name in s.trainers if getattr(classes.get(name), "cotrained_sam", False)}
        runs: List[Run] = []
        for fold, info in zip(folds, infos):
            baseline = s.baseline_trainer
            if info.num_labeled is None:
                runs.append(Run(UPPER, s.trainer_class(baseline), baseline, info.fold, info.seed, None, fold))
                continue
            runs.append(Run(LOWER, s.trainer_class(baseline), baseline, info.fold, info.seed, info.num_labeled, fold))
            if s.generalist_row:  # after the labeled-only run, whose model prompts the generalist
                runs.append(Run(GENERALIST, f"{s.trainer_class(baseline)}+generalist", "generalist", info.fold,
                                info.seed, info.num_labeled, fold, prompted_by=s.trainer_class(baseline)))
            for method in s.trainers:  # a pre-stage may name the cache it writes (IFL's rounds)
                own = prestaged[method](**self._prestage_arguments(method, info.fold, cached=False))[1] \
                    if method in prestaged else None
                runs.append(Run(SSL, s.trainer_class(method), method, info.fold, info.seed, info.num_labeled, fold,
                                pseudo_labels=own, prestage=method in prestaged))
                if method in cotrained:  # after the run whose checkpoint holds the SAM
                    runs.append(Run(COTRAINED_SAM, f"{s.trainer_class(method)}+sam", method, info.fold, info.seed,
                                    info.num_labeled, fold, sam_of=s.trainer_class(method)))
            # after the labeled-only run of the fold, whose model prompts the generalist for their cache; a trainer
            # with its own pre-stage makes its own cache (SFR: its fine-tuned generalist's labels)
            cache = f"{s.trainer_class(baseline)}__{s.plans}__fold{info.fold}"
            for method in s.cached_trainers:
                own = prestaged[method](**self._prestage_arguments(method, info.fold, cached=True))[1] \
                    if method in prestaged else None
                runs.append(Run(SSL, s.trainer_class(method), method, info.fold, info.seed, info.num_labeled, fold,
                                pseudo_labels=own or cache, prestage=method in prestaged))
        return runs, folds, infos, test

    def _prestage_hooks(self, classes: dict) -> dict:
        """Base trainer name -> its class's ``benchmark_prestage`` (a per-fold command before training, e.g. SFR's
        fine-tuning), for the benchmark's trainer ``classes`` (name -> class) that have one; --prestage-options for
        any other is refused."""
        s = self.settings
        hooks = {name: cls.benchmark_prestage for name, cls in classes.items() if hasattr(cls, "benchmark_prestage")}
        for item in s.prestage_options:
            name = item.partition("=")[0]
            if name not in hooks:
                raise BenchmarkError(f"--prestage-options {item!r}: {name} has no pre-stage (trainers with one: "
                                     f"{', '.join(sorted(hooks)) or 'none in this benchmark'})")
        if s.pseudo_label_generalist is not None and not (s.cached_trainers or s.generalist_row or hooks):
            raise BenchmarkError("--pseudo-label-generalist configures the cache of --cached-trainers, the "
                                 "--generalist-row and the pre-stage of a trainer that has one (nnUNetTrainerSFR); "
                                 "this benchmark has none of those")
        return hooks

    def _prestage_arguments(self, method: str, fold: int, cached: bool) -> dict:
        s = self.settings
        return dict(dataset=str(self.dataset_id), configuration=s.configuration, plans=s.plans, fold=fold,
                    device="cuda" if s.device == "cuda" else "cpu", generalist=s.pseudo_label_generalist,
                    options=s.prestage_option_list(method), cached=cached, budget=s.budget)

    def prestage_trains(self, run: Run) -> bool:
        """Whether the run's pre-stage trains the run itself (IFL's rounds: each warm-started from the round
        before), so no nnUNetv2_train follows it."""
        return run.prestage and getattr(self.prestage_hooks[run.method].__self__, "benchmark_prestage_trains", False)

    def prestage_command(self, run: Run) -> List[str]:
        """The run's per-fold pre-stage (see Run.prestage): e.g. nnunet-foundation sfr for nnUNetTrainerSFR."""
        hook = self.prestage_hooks[run.method]
        return hook(**self._prestage_arguments(run.method, run.fold, cached=run.method in self.settings.cached_trainers))[0]

    def co_training_run(self, run: Run) -> Run:
        """The run whose checkpoint holds the SAM of a co-trained SAM row (same fold)."""
        return next(r for r in self.runs if r.role == SSL and r.trainer == run.sam_of and r.fold == run.fold)

    def model_run(self, run: Run) -> Run:
        """The run whose model a row that trains nothing predicts with: a generalist row's prompting labeled-only
        run, a co-trained SAM row's co-training run."""
        return self.labeled_only_run(run) if run.role == GENERALIST else self.co_training_run(run)

    def labeled_only_run(self, run: Run) -> Run:
        """The labeled-only run of ``run``'s fold (its model prompts the generalist for ``run``'s cache)."""
        return next(r for r in self.runs if r.role == LOWER and r.fold == run.fold)

    # ------------------------------------------------------------------------------------------ paths
    def training_folder(self, run: Run) -> Path:
        """nnU-Net's training folder of the run; a generalist row's is its prompting labeled-only model's, a
        co-trained SAM row's its co-training run's."""
        trainer = run.prompted_by or run.sam_of or run.trainer
        return (self.results_root / f"{trainer}__{self.settings.plans}__{self.settings.configuration}" /
                f"fold_{run.fold}")

    def run_folder(self, run: Run) -> Path:
        return self.output / "runs" / run.run_id

    def predictions_folder(self, run: Run, student: bool = False) -> Path:
        return self.output / "predictions" / (run.run_id + ("__student" if student else ""))

    @property
    def test_images(self) -> Path:
        return self.output / "test_data" / "imagesTs"

    @property
    def test_labels(self) -> Path:
        return self.output / "test_data" / "labelsTs"

    @property
    def splits_file(self) -> Path:
        return self.preprocessed / "splits_final.json"

    def extra_unlabeled_cases(self) -> int:
        """Scans preprocessed from imagesUnlabeled: the semi-supervised trainers add them to every fold."""
        from nnunet_foundation.paths import UNLABELED_METADATA_FILE, unlabeled_preprocessed_folder

        meta = Path(unlabeled_preprocessed_folder(str(self.preprocessed), self.data_identifier)) / \
            UNLABELED_METADATA_FILE
        return len(_load_json(meta).get("cases", [])) if meta.is_file() else 0

    # ------------------------------------------------------------------------------------------ preparation
    def splits_status(self) -> str:
        """'same' (existing files hold exactly these folds and test set), 'missing' or 'different'."""
        if not self.splits_file.is_file():
            return "missing"
        test_file = self.preprocessed / "test_split.json"
        existing_test = _load_json(test_file) if test_file.is_file() else []
        if _load_json(self.splits_file) == self.folds and sorted(existing_test) == self.test_cases:
            return "same"
        return "different"

    def prepare(self, force: bool = False) -> None:
        """Output folder, splits, held-out test export and run claims. Safe to repeat; never overwrites silently."""
        self._prepare_output()
        self._prepare_splits(force)
        self._export_test_set()
        self._claim_runs()

    def _prepare_output(self) -> None:
        marker = self.output / MARKER
        identity = {"dataset": self.dataset_name, "configuration": self.settings.configuration,
                    "plans": self.settings.plans}
        if self.output.exists() and any(self.output.iterdir()):
            if not marker.is_file():
                raise BenchmarkError(f"{self.output} exists and is not a benchmark folder (no {MARKER}); choose a new "
                                     f"or empty --output (nothing was changed).")
            previous = _load_json(marker)
            if previous != identity:
                raise BenchmarkError(f"{self.output} holds a benchmark of {previous}; this one is {identity}. Use "
                                     f"another --output (nothing was changed).")
            return
        self.output.mkdir(parents=True, exist_ok=True)
        _write_json(identity, marker)

    def _prepare_splits(self, force: bool) -> None:
        from nnunet_foundation.splits import SplitError, write_splits

        status = self.splits_status()
        if status == "same":
            return  # not even rewritten: trainings of this benchmark may be reading it right now
        if status == "different" and not force:
            raise BenchmarkError(
                f"{self.splits_file} holds other folds or another test set than this benchmark needs (another "
                f"study, nnU-Net's default 5-fold split, or this benchmark with other --labeled/--seeds/--num-val/"
                f"--test-* options). Mixing them would mix results. Rerun with the same options, or add --force to "
                f"replace it (a timestamped backup is kept; trainings of the old folds are then refused until "
                f"moved away).")
        request = {"benchmark": self.settings.command(str(self.output))}
        try:
            written = write_splits(str(self.preprocessed), self.folds, self.fold_infos, self.test_cases, force=True,
                                   request=request)
        except SplitError as e:
            raise BenchmarkError(str(e)) from None
        if "backup" in written:
            print(f"benchmark: previous splits kept as {written['backup']}", flush=True)
        print(f"benchmark: wrote {self.splits_file} ({len(self.folds)} folds) and {written.get('test')}", flush=True)

    def _export_test_set(self) -> None:
        """Copy the held-out cases' raw images and labels (the user's raw dataset is only read)."""
        from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

        folder = self.output / "test_data"
        record = folder / "cases.json"
        if record.is_file() and _load_json(record) == self.test_cases and self.test_images.is_dir():
            return
        if folder.exists():
            shutil.rmtree(folder)  # a copy made by this benchmark for another test set (we wrote the marker)
        files = get_filenames_of_train_images_and_targets(str(self.raw), json.loads(json.dumps(self.dataset_json)))
        ending = self.dataset_json["file_ending"]
        self.test_images.mkdir(parents=True)
        self.test_labels.mkdir(parents=True)
        for case in self.test_cases:
            for channel, image in enumerate(files[case]["images"]):
                shutil.copy2(image, self.test_images / f"{case}_{channel:04d}{ending}")
            shutil.copy2(files[case]["label"], self.test_labels / f"{case}{ending}")
        _write_json(self.test_cases, record)
        print(f"benchmark: copied {len(self.test_cases)} held-out test cases to {folder}", flush=True)

    def is_claimed(self, run: Run) -> bool:
        record = self.run_folder(run) / "run.json"
        return record.is_file() and _load_json(record).get("split_digest") == _digest(run.split)

    def conflict(self, run: Run) -> Optional[str]:
        """Why the run's nnU-Net training folder cannot be used (or None): it holds a checkpoint that this benchmark
        did not record for the run's current fold."""
        if self.is_claimed(run) or run.role in PREDICT_ONLY:  # their model is another run's of the fold
            return None
        if not any((self.training_folder(run) / c).is_file()
                   for c in ("checkpoint_final.pth", "checkpoint_latest.pth")):
            return None
        if (self.run_folder(run) / "run.json").is_file():
            return "was trained on an earlier split of this benchmark (splits replaced with --force)"
        if self.adopt_existing:
            return None
        return "was not trained by this benchmark, so its split is unknown"

    def _claim_runs(self) -> None:
        """Record, before anything trains, which fold each training folder belongs to (see the module doc)."""
        conflicts = [f"{self.training_folder(r)} {why}" for r in self.runs for why in [self.conflict(r)] if why]
        if conflicts:
            raise BenchmarkError(
                "existing nnU-Net trainings would be mixed into this benchmark:\n  " + "\n  ".join(conflicts) +
                "\nMove these folders away (or use another nnUNet_results) to retrain them, or, if they were "
                "trained on exactly the current splits_final.json folds, rerun with --adopt-existing.")
        for run in self.runs:
            if self.is_claimed(run):
                continue
            has_checkpoint = any((self.training_folder(run) / c).is_file()
                                 for c in ("checkpoint_final.pth", "checkpoint_latest.pth"))
            # our derived files of an earlier claim are stale: remove them (never the training folder)
            shutil.rmtree(self.predictions_folder(run), ignore_errors=True)
            (self.run_folder(run) / "result.json").unlink(missing_ok=True)
            _write_json({**run.describe(), "split_digest": _digest(run.split), "split": run.split,
                         "training_folder": str(self.training_folder(run)), "adopted": has_checkpoint},
                        self.run_folder(run) / "run.json")

    def verify_prepared(self) -> None:
        """For --run jobs: everything must have been prepared by a plain or --print-commands call before."""
        problems = []
        if self.splits_status() != "same":
            problems.append(f"{self.splits_file} does not hold this benchmark's folds")
        record = self.output / "test_data" / "cases.json"
        if not record.is_file() or _load_json(record) != self.test_cases:
            problems.append(f"{self.output / 'test_data'} does not hold this benchmark's test cases")
        problems += [f"run {r.run_id} is not recorded in {self.run_folder(r) / 'run.json'}" for r in self.runs
                     if not self.is_claimed(r)][:1]
        if problems:
            raise BenchmarkError("; ".join(problems) + ". Run the same command without --run (or with "
                                 "--print-commands) first: it prepares splits and test data once for all jobs.")

    # ------------------------------------------------------------------------------------------ status
    def status(self, run: Run) -> str:
        final = self.training_folder(run) / "checkpoint_final.pth"
        result_file = self.run_folder(run) / "result.json"
        if final.is_file():
            if result_file.is_file():
                result = _load_json(result_file)
                if (result.get("checkpoint") == self._checkpoint_signature(final) and
                        result.get("split_digest") == _digest(run.split)):
                    return FINISHED
            return PREDICT
        if run.role == GENERALIST:  # it trains nothing: the training folder is its prompter's
            return WAITING
        if run.role == COTRAINED_SAM:  # nor this one: the folder is its co-training run's
            return SAM_WAITING
        if was_interrupted(str(self.training_folder(run))):
            return RESUME
        return TRAIN

    @staticmethod
    def _checkpoint_signature(path: Path) -> dict:
        stat = path.stat()
        return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}

    # ------------------------------------------------------------------------------------------ commands
    def train_command(self, run: Run, resume: bool = False) -> List[str]:
        return ["nnUNetv2_train", str(self.dataset_id), self.settings.configuration, str(run.fold), "-tr",
                run.trainer, "-p", self.settings.plans, "-device", self.settings.device] + (["--c"] if resume else [])

    def main_command(self, run: Run) -> List[str]:
        """What the run executes first: a training, or for a generalist row its prediction (it trains nothing)."""
        if run.role == GENERALIST:
            return self.predict_generalist_command(run)
        if run.role == COTRAINED_SAM:
            return self.predict_sam_command(run)
        return self.prestage_command(run) if self.prestage_trains(run) else self.train_command(run)

    def predict_command(self, run: Run, student: bool = False) -> List[str]:
        """nnUNetv2_predict of the test images with the run's final checkpoint, or with ``student`` the trained
        network of a run that exports another model (checkpoint_files.write_student_checkpoint)."""
        n = str(self.settings.num_processes)
        return ["nnUNetv2_predict", "-i", str(self.test_images), "-o", str(self.predictions_folder(run, student)),
                "-d", str(self.dataset_id), "-c", self.settings.configuration, "-p", self.settings.plans,
                "-tr", run.trainer, "-f", str(run.fold), "-chk", STUDENT_CHECKPOINT if student else
                "checkpoint_final.pth", "-device", self.settings.device, "-npp", n, "-nps", n,
                "--disable_progress_bar"]

    def predict_generalist_command(self, run: Run) -> List[str]:
        """nnunet-foundation predict-generalist of the test images, prompted by the fold's labeled-only model."""
        s = self.settings
        n = str(s.num_processes)
        return ["nnunet-foundation", "predict-generalist", "-d", str(self.dataset_id), "-c", s.configuration, "-p",
                s.plans, "-tr", run.prompted_by, "-f", str(run.fold), "-i", str(self.test_images), "-o",
                str(self.predictions_folder(run)), "-device", "cuda" if s.device == "cuda" else "cpu", "-np", n] + \
            (["--generalists", s.pseudo_label_generalist] if s.pseudo_label_generalist is not None else [])

    def predict_sam_command(self, run: Run) -> List[str]:
        """nnunet-foundation predict-sam-student of the test images with the SAM the co-training run fine-tuned
        (SC-SAM's prompted by that run's nnU-Net), through nnU-Net's predictor as nnUNetv2_predict."""
        s = self.settings
        n = str(s.num_processes)
        return ["nnunet-foundation", "predict-sam-student", "-d", str(self.dataset_id), "-c", s.configuration, "-p",
                s.plans, "-tr", run.sam_of, "-f", str(run.fold), "-i", str(self.test_images), "-o",
                str(self.predictions_folder(run)), "-device", s.device, "-npp", n, "-nps", n]

    def pseudo_label_command(self, run: Run) -> List[str]:
        """nnunet-foundation pseudo-label of the fold's unlabeled cases, prompted by its labeled-only model."""
        s = self.settings
        return ["nnunet-foundation", "pseudo-label", "-d", str(self.dataset_id), "-c", s.configuration, "-p", s.plans,
                "-tr", self.labeled_only_run(run).trainer, "-f", str(run.fold), "--name", run.pseudo_labels,
                "-device", "cuda" if s.device == "cuda" else "cpu"] + \
            (["--generalists", s.pseudo_label_generalist] if s.pseudo_label_generalist is not None else [])

    def training_environment(self, run: Run) -> Dict[str, str]:
        """The trainings' environment; a cached run also names its cache (SemiSAM's setting 'pseudo_labels')."""
        return {**self.env, "nnUNet_ssl_pseudo_labels": run.pseudo_labels} if run.pseudo_labels else self.env

    def _make_pseudo_labels(self, run: Run, logs: Path) -> float:
        lower = self.labeled_only_run(run)
        if not (self.training_folder(lower) / "checkpoint_final.pth").is_file():
            raise BenchmarkError(f"{run.run_id} learns from the generalist's labels of the unlabeled cases, which "
                                 f"the model of run {lower.run_id} prompts: train that run first (it is the job "
                                 f"line before this one; --run {lower.run_id}).")
        cmd = self.pseudo_label_command(run)
        print(f"      pseudo-labels: {' '.join(cmd)}", flush=True)
        return self._run_command(cmd, logs / f"{run.run_id}.pseudo_label.log")

    def _run_command(self, cmd: List[str], log_file: Path, show_progress: bool = False,
                     env: Optional[Dict[str, str]] = None) -> float:
        show = (lambda line: any(m in line for m in PROGRESS_MARKERS)) if show_progress else None
        try:
            return run_logged(cmd, env or self.env, log_file, show=show, indent="      ", tail_lines=30)
        except CommandFailed as e:
            raise BenchmarkError(f"{e}. Rerun the benchmark to resume. Last lines:\n{e.tail}") from None

    # ------------------------------------------------------------------------------------------ execution
    def execute(self, runs: Optional[List[Run]] = None) -> List[dict]:
        """Train, predict and evaluate every run that is not finished; returns the result of every run."""
        from nnunet_foundation.benchmark.machine import machine_info

        runs = self.runs if runs is None else runs
        started = time.time()
        machine = machine_info(self.settings.device)
        results = []
        for k, run in enumerate(runs, 1):
            head = f"[{k}/{len(runs)}] {run.run_id}"
            status = self.status(run)
            if status == FINISHED:
                print(f"{head}: finished earlier, skipped", flush=True)
                results.append(_load_json(self.run_folder(run) / "result.json"))
                continue
            t_run = time.time()
            timings = {}
            logs = self.output / "logs"
            if run.role in PREDICT_ONLY:  # a prediction with the model of another run of the fold
                model = self.model_run(run)
                if status in (WAITING, SAM_WAITING):
                    raise BenchmarkError(f"{run.run_id} predicts with the model of run {model.run_id}: train that run "
                                         f"first (it is the job line before this one; --run {model.run_id}).")
                what = "the generalist alone, prompted by" if run.role == GENERALIST else "the SAM co-trained by"
                print(f"{head}: {what} {self.training_folder(run)}", flush=True)
                shutil.rmtree(self.predictions_folder(run), ignore_errors=True)
                timings["generalist_wall_s"] = self._run_command(self.main_command(run),
                                                                 logs / f"{run.run_id}.predict.log")
            elif status in (TRAIN, RESUME):
                verb = "resuming training (--c)" if status == RESUME else "training"
                print(f"{head}: {verb}: fold {run.fold}, {run.trainer}, {len(run.split['train'])} labeled"
                      + (f" + {len(run.split['unlabeled'])} unlabeled" if run.role == SSL else "")
                      + f" cases, {self.budget.description}", flush=True)
                if self.prestage_trains(run):  # e.g. IFL: its rounds (pseudo-labels and warm-started trainings)
                    cmd = self.prestage_command(run)
                    print(f"      pre-stage (trains the run; resumes what a killed one left): {' '.join(cmd)}",
                          flush=True)
                    timings["prestage_wall_s"] = self._run_command(cmd, logs / f"{run.run_id}.prestage.log",
                                                                   show_progress=True)
                else:
                    if run.prestage:  # it skips what it finished, so a resumed run costs little
                        cmd = self.prestage_command(run)
                        print(f"      pre-stage: {' '.join(cmd)}", flush=True)
                        timings["generalist_wall_s"] = self._run_command(cmd, logs / f"{run.run_id}.prestage.log")
                    elif run.pseudo_labels:  # finished cases are skipped, so a resumed run costs a model load only
                        timings["generalist_wall_s"] = self._make_pseudo_labels(run, logs)
                    cpu_before = _children_cpu_seconds()
                    timings["train_wall_s"] = self._run_command(self.train_command(run, status == RESUME),
                                                                logs / f"{run.run_id}.train.log", show_progress=True,
                                                                env=self.training_environment(run))
                    # CPU seconds of the training and its worker processes: against the wall time it says whether
                    # the run had the cores to itself (a timing taken beside other work, or paused, shows it)
                    timings["train_cpu_s"] = _children_cpu_seconds() - cpu_before
                if not (self.training_folder(run) / "checkpoint_final.pth").is_file():
                    log = "prestage" if self.prestage_trains(run) else "train"
                    raise BenchmarkError(f"{run.trainer} finished without {self.training_folder(run)}/"
                                         f"checkpoint_final.pth; see {logs / f'{run.run_id}.{log}.log'}")
                self._save_training_timings(run, timings)
            else:
                print(f"{head}: trained earlier ({self.training_folder(run)}), predicting", flush=True)
                timings.update(self._saved_training_timings(run))
            student = None
            if run.role not in PREDICT_ONLY:
                shutil.rmtree(self.predictions_folder(run), ignore_errors=True)  # ours; a partial one is useless
                timings["predict_wall_s"] = self._run_command(self.predict_command(run),
                                                              logs / f"{run.run_id}.predict.log")
                # a run exporting its teacher (or an EMA) is scored as its student too: what the export buys
                if write_student_checkpoint(str(self.training_folder(run) / "checkpoint_final.pth")):
                    shutil.rmtree(self.predictions_folder(run, student=True), ignore_errors=True)
                    timings["predict_student_wall_s"] = self._run_command(
                        self.predict_command(run, student=True), logs / f"{run.run_id}.predict_student.log")
                    student = self._evaluate_folder(run, self.predictions_folder(run, student=True))
            result = self._evaluate(run, timings, machine, student)
            fg = result["evaluation"]["foreground_mean"]
            from nnunet_foundation.evaluation import distance_unit

            print(f"{head}: Dice {fg['Dice']['mean']:.3f}, HD95 {fg['HD95']['mean']:.2f} {distance_unit(self.dataset_json)}, NSD "
                  f"{fg['NSD']['mean']:.3f} on {len(self.test_cases)} test cases ({_minutes(time.time() - t_run)} "
                  f"for this run, {_minutes(time.time() - started)} elapsed)", flush=True)
            results.append(result)
        return results

    def _save_training_timings(self, run: Run, timings: dict) -> None:
        """Kept beside run.json until result.json holds them: a benchmark stopped between training and evaluation
        (a killed job, a machine restart) would otherwise report the run without its training time."""
        final = self.training_folder(run) / "checkpoint_final.pth"
        _write_json({"checkpoint": self._checkpoint_signature(final), "timings": timings},
                    self.run_folder(run) / "training_timings.json")

    def _saved_training_timings(self, run: Run) -> dict:
        """The timings _save_training_timings kept for this run's current checkpoint; {} when none were kept here
        (a training adopted from elsewhere) or the checkpoint has changed since."""
        path = self.run_folder(run) / "training_timings.json"
        if not path.is_file():
            return {}
        saved = _load_json(path)
        final = self.training_folder(run) / "checkpoint_final.pth"
        return saved["timings"] if saved.get("checkpoint") == self._checkpoint_signature(final) else {}

    def _evaluate_folder(self, run: Run, predictions: Path) -> dict:
        from nnunet_foundation.evaluation import EvaluationError, evaluate_folder, parse_tolerance

        try:
            return evaluate_folder(str(self.test_labels), str(predictions), self.dataset_json,
                                   tolerance=parse_tolerance(self.settings.tolerance),
                                   num_processes=self.settings.num_processes)
        except EvaluationError as e:
            raise BenchmarkError(f"{run.run_id}: {e}") from None

    def _evaluate(self, run: Run, timings: dict, machine: dict, student: Optional[dict] = None) -> dict:
        evaluation = self._evaluate_folder(run, self.predictions_folder(run))
        final = self.training_folder(run) / "checkpoint_final.pth"
        result = {"run": run.describe(), "split_digest": _digest(run.split),
                  "training_folder": str(self.training_folder(run)),
                  "checkpoint": self._checkpoint_signature(final),
                  "num_unlabeled_extra": self.extra_unlabeled_cases() if run.role == SSL else 0,
                  "training": {} if run.role in PREDICT_ONLY else training_log(final), "timings": timings,
                  "machine": machine,
                  "evaluation": evaluation}
        if student is not None:  # the trained network of a run that exports another model (checkpoint_student.pth)
            result["student_evaluation"] = student
        _write_json(result, self.run_folder(run) / "result.json")
        return result

    def finished_results(self) -> Tuple[List[dict], List[Run]]:
        """Results of the finished runs, and the runs still missing (for --report-only)."""
        done, missing = [], []
        for run in self.runs:
            if self.status(run) == FINISHED:
                done.append(_load_json(self.run_folder(run) / "result.json"))
            else:
                missing.append(run)
        return done, missing

    # ------------------------------------------------------------------------------------------ printing
    def plan_table(self) -> str:
        lines = ["| # | run | fold | role | trainer | labeled | unlabeled | val | status |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for k, run in enumerate(self.runs, 1):
            unlabeled = len(run.split["unlabeled"]) if run.role == SSL else 0
            why = self.conflict(run)
            status = f"refused: {self.training_folder(run)} {why}" if why else self.status(run)
            lines.append(f"| {k} | {run.run_id} | {run.fold} | {run.role} | {run.trainer} | {len(run.split['train'])} "
                         f"| {unlabeled} | {len(run.split['val'])} | {status} |")
        return "\n".join(lines)

    def job_script(self) -> str:
        """A shell script: one self-contained job line per unfinished run (train, predict, evaluate), then the
        command that writes the report once all jobs are done."""
        import shlex

        lines = ["#!/bin/bash",
                 f"# {len(self.runs)} runs of the label-scarcity benchmark of {self.dataset_name} "
                 f"({self.settings.configuration}, budget '{self.settings.budget}': {self.budget.description}).",
                 "# Splits and test data are prepared; submit each command below as one job (any order, in "
                 "parallel, except that a run marked 'after' waits for the run it names), then run the last line.",
                 ""]
        for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            if self.env.get(key):
                lines.append(f"export {key}={shlex.quote(self.env[key])}")
        lines.append("")
        base = self.settings.command_args(str(self.output))
        for k, run in enumerate(self.runs, 1):
            status = self.status(run)
            if status == FINISHED:
                lines.append(f"# [{k}/{len(self.runs)}] {run.run_id}: finished")
                continue
            if run.role in PREDICT_ONLY:
                why = "its model prompts the generalist" if run.role == GENERALIST else "its checkpoint holds the SAM"
                lines.append(f"# [{k}/{len(self.runs)}] {run.run_id}: {shlex.join(self.main_command(run))} and "
                             f"evaluation")
                lines.append(f"#   after {self.model_run(run).run_id}: {why}")
            elif self.prestage_trains(run):
                lines.append(f"# [{k}/{len(self.runs)}] {run.run_id}: {shlex.join(self.prestage_command(run))} "
                             f"(trains the run), then nnUNetv2_predict -f {run.fold} on the test cases and evaluation")
                lines.append(f"#   after {self.labeled_only_run(run).run_id} (round 0 with EMA baselines) and the "
                             f"fold's earlier rounds")
            else:
                lines.append(f"# [{k}/{len(self.runs)}] {run.run_id}: {shlex.join(self.train_command(run))}, then "
                             f"nnUNetv2_predict -f {run.fold} on the test cases and evaluation")
            if run.prestage:
                if not self.prestage_trains(run):
                    lines.append(f"#   first, per fold: {shlex.join(self.prestage_command(run))}")
            elif run.pseudo_labels:
                lines.append(f"#   after {self.labeled_only_run(run).run_id}: first the generalist's labels of the "
                             f"fold's unlabeled cases, prompted by that run's model ({run.pseudo_labels})")
            lines.append(shlex.join(["nnunet-foundation", *base, "--run", run.run_id]))
        lines += ["", "# when all jobs are done: the report (trains nothing that is finished)",
                  shlex.join(["nnunet-foundation", *base])]
        return "\n".join(lines)

    def find_run(self, run_id: str) -> Run:
        for run in self.runs:
            if run.run_id == run_id:
                return run
        raise BenchmarkError(f"no run '{run_id}' in this benchmark; runs: {', '.join(r.run_id for r in self.runs)}")


def training_log(checkpoint_file: Path) -> dict:
    """Per-epoch curves (train/val loss, pseudo Dice, learning rate, SSL terms) from nnU-Net's checkpoint log."""
    import math

    import torch

    try:
        checkpoint = torch.load(str(checkpoint_file), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a report without curves beats no report
        return {"error": f"could not read {checkpoint_file}: {e}"}
    log = checkpoint.get("logging", {}) or {}
    curves = {}
    for key, values in log.items():
        if key == "dice_per_class_or_region" or not isinstance(values, (list, tuple)):
            continue
        try:
            curves[key] = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
    starts, ends = curves.get("epoch_start_timestamps", []), curves.get("epoch_end_timestamps", [])
    epoch_seconds = [e - s for s, e in zip(starts, ends)]
    for key in ("epoch_start_timestamps", "epoch_end_timestamps"):
        curves.pop(key, None)
    return {"epochs": len(epoch_seconds), "seconds": float(sum(epoch_seconds)),
            "seconds_per_epoch": float(sum(epoch_seconds) / len(epoch_seconds)) if epoch_seconds else math.nan,
            "trainer": checkpoint.get("trainer_name"), "curves": curves}
