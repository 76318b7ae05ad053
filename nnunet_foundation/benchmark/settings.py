"""What a benchmark is: its settings, its runs, and the command line that reproduces it."""
from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

#: roles of a run; each fold of labeled count n gets LOWER and every SSL trainer, each seed one UPPER run
LOWER, SSL, UPPER = "labeled-only", "semi-supervised", "fully supervised"
#: role of the --generalist-row runs: no training; the generalist prompted by the fold's labeled-only model predicts
GENERALIST = "generalist alone"
#: role of the rows of a co-training trainer's own SAM (SC-SAM, SynFoC: ``cotrained_sam`` on the class): no training;
#: the SAM that the fold's run of that trainer fine-tuned predicts the test set (predict-sam-student), scored beside
#: the run's nnU-Net, since SC-SAM's paper reports its SAM
COTRAINED_SAM = "co-trained SAM"
#: the stock trainer that gives both bounds (with the budget suffix) with --no-ema-baselines
STOCK_TRAINER = "nnUNetTrainer"
#: the default trainer of both bounds: the stock training exporting an EMA of its weights, as the teacher-based
#: methods export their EMA teacher (training/baselines.py), so the comparison is not one of averaging
EMA_BASELINE_TRAINER = "nnUNetTrainerEMA"
BASELINE_TRAINERS = (STOCK_TRAINER, EMA_BASELINE_TRAINER)


def exported_model(trainer: str) -> str:
    """What ``network_weights`` (the model nnUNetv2_predict scored) holds for a trainer class name, from the class's
    ``exported_model`` (this package's trainers) or nnU-Net's behaviour (its own trainers)."""
    from nnunet_foundation.training.settings import package_trainer_classes

    for cls in package_trainer_classes():
        if cls.__name__ == trainer:
            return cls.exported_model
    return "last weights"


class BenchmarkError(RuntimeError):
    """A benchmark cannot go on; the message names the file or option and the fix. Nothing was destroyed."""


@dataclass(frozen=True)
class BenchmarkSettings:
    dataset: str
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    labeled: Tuple[int, ...] = (2, 4)
    seeds: Tuple[int, ...] = (0,)
    other_seeds_at: Tuple[int, ...] = ()  # seeds after the first only at these labeled counts; empty = every count
    trainers: Tuple[str, ...] = ("nnUNetTrainerMeanTeacher",)
    budget: str = "cpu500"
    num_val: int = 2
    test_cases: int = 20
    test_list: Optional[str] = None
    test_seed: int = 0
    test_fraction: Tuple[str, ...] = ()  # 'DOMAIN=FRACTION': whole groups per domain of domains.json, not test_cases
    labeled_domains: Tuple[str, ...] = ()  # labeled and validation cases only from these domains; empty = all
    tolerance: Tuple[str, ...] = ()  # as given on the command line ('1.0' or 'CLASS=MM'); empty = 1 mm
    device: str = "cpu"
    output: str = "benchmark"
    num_processes: int = 1  # nnUNetv2_predict -npp/-nps and evaluation workers; 0: nnU-Net's sequential prediction
    ema_baselines: bool = True  # both bounds with nnUNetTrainerEMA (EMA export) rather than nnUNetTrainer
    # trainers that read an offline generalist pseudo-label cache (SemiSAM's 'pseudo_labels'): per scarce fold, the
    # fold's labeled-only model prompts the generalist (nnunet-foundation pseudo-label) once, then they train
    cached_trainers: Tuple[str, ...] = ()
    pseudo_label_generalist: Optional[str] = None  # JSON configuration for pseudo-label; None = its default
    # per scarce fold, a row of the generalist alone prompted by the labeled-only model (predict-generalist), with
    # the configuration of --pseudo-label-generalist
    generalist_row: bool = False
    # 'TRAINER=OPTIONS': extra options of a trainer's per-fold pre-stage command (e.g. nnUNetTrainerSFR's
    # nnunet-foundation sfr: 'nnUNetTrainerSFR=--iterations 300'), as given on the command line
    prestage_options: Tuple[str, ...] = ()

    @property
    def baseline_trainer(self) -> str:
        """The trainer of the labeled-only and the fully supervised runs, without the budget suffix."""
        return EMA_BASELINE_TRAINER if self.ema_baselines else STOCK_TRAINER

    def normalised(self) -> "BenchmarkSettings":
        """Sorted, de-duplicated lists and trainer names without a budget suffix, so equal studies compare equal."""
        from nnunet_foundation.training.budgets import BUDGETS

        if self.budget not in BUDGETS:
            raise BenchmarkError(f"unknown budget '{self.budget}'; choose one of: {', '.join(BUDGETS)} "
                                 f"(see nnunet_foundation/training/budgets.py)")
        trainers, cached = self._base_names(self.trainers), self._base_names(self.cached_trainers)
        if not trainers and not cached and not self.generalist_row:
            raise BenchmarkError("give at least one semi-supervised trainer (--trainers nnUNetTrainerMeanTeacher)")
        both = sorted(set(trainers) & set(cached))
        if both:
            raise BenchmarkError(f"{both} are in --trainers and --cached-trainers: nnU-Net keeps one training folder "
                                 f"per trainer class and fold, so a trainer runs either with its online settings or "
                                 f"from the generalist cache in one benchmark.")
        if self.pseudo_label_generalist is not None:
            # whether an online trainer has a pre-stage it configures (SFR) is known only once the trainer classes
            # are imported: the plan checks that (Benchmark._prestage_hooks)
            from nnunet_foundation.foundation.config import GeneralistConfigError, parse_generalist_setting

            try:  # a typo fails now, not after the first labeled-only training
                parse_generalist_setting(self.pseudo_label_generalist)
            except (GeneralistConfigError, ValueError, TypeError) as e:
                raise BenchmarkError(f"--pseudo-label-generalist: {e}") from None
        prestage = {}
        for item in self.prestage_options:
            name, sep, options = item.partition("=")
            base = self._base_names([name.strip()])[0] if name.strip() else ""
            if not sep or base not in trainers + cached:
                raise BenchmarkError(f"--prestage-options {item!r}: expected TRAINER=OPTIONS with TRAINER one of "
                                     f"--trainers / --cached-trainers ({', '.join(trainers + cached) or 'none'})")
            try:
                shlex.split(options)
            except ValueError as e:
                raise BenchmarkError(f"--prestage-options {item!r}: {e}") from None
            prestage[base] = options.strip()
        if any(n < 1 for n in self.labeled) or not self.labeled:
            raise BenchmarkError("--labeled needs one or more counts of at least 1 labeled case")
        if not self.seeds:
            raise BenchmarkError("--seeds needs at least one seed")
        if self.test_list and self.test_fraction:
            raise BenchmarkError("--test-list and --test-fraction exclude each other")
        if self.test_list is None and not self.test_fraction and self.test_cases < 1:
            raise BenchmarkError("the benchmark reports on held-out cases only: --test-cases must be at least 1 "
                                 "(or give --test-list or --test-fraction)")
        from nnunet_foundation.splits import SplitError, parse_domain_fractions

        try:
            fractions = parse_domain_fractions(self.test_fraction)
        except SplitError as e:
            raise BenchmarkError(str(e)) from None
        if self.num_processes < 0:
            raise BenchmarkError(f"-np must be 0 (no worker processes) or more, not {self.num_processes}")
        if self.device not in ("cpu", "cuda", "mps"):
            raise BenchmarkError(f"--device must be cpu, cuda or mps, not {self.device!r}")
        return BenchmarkSettings(**{**asdict(self), "labeled": tuple(sorted(set(self.labeled))),
                                    "seeds": tuple(dict.fromkeys(self.seeds)), "trainers": tuple(trainers),
                                    "cached_trainers": tuple(cached),
                                    "prestage_options": tuple(f"{k}={v}" for k, v in sorted(prestage.items())),
                                    "tolerance": tuple(self.tolerance),
                                    # one spelling per study: sorted, and the unused test-case count zeroed
                                    "test_fraction": tuple(f"{d}={f:g}" for d, f in sorted(fractions.items())),
                                    "test_cases": 0 if self.test_list or fractions else self.test_cases,
                                    "labeled_domains": tuple(sorted(set(self.labeled_domains))),
                                    "other_seeds_at": tuple(sorted(set(self.other_seeds_at)))})

    def _base_names(self, names) -> List[str]:
        """Trainer names without the budget suffix, de-duplicated in order; the bounds' trainer is refused."""
        out: List[str] = []
        for name in names:
            base = name[:-len(self.budget) - 1] if name.endswith("_" + self.budget) else name
            if base in BASELINE_TRAINERS:
                raise BenchmarkError(f"{self.baseline_trainer} always runs (labeled-only lower bound and fully "
                                     f"supervised upper bound; {STOCK_TRAINER} with --no-ema-baselines); list only "
                                     f"the semi-supervised trainers in --trainers and --cached-trainers.")
            if base not in out:
                out.append(base)
        return out

    def prestage_option_list(self, method: str) -> List[str]:
        """The extra pre-stage options given for ``method`` (a base trainer name), split like a shell would."""
        for item in self.prestage_options:
            name, _, options = item.partition("=")
            if name == method:
                return shlex.split(options)
        return []

    def trainer_class(self, base: str) -> str:
        return f"{base}_{self.budget}"

    def command_args(self, output: str) -> List[str]:
        """Arguments of ``nnunet-foundation benchmark`` that reproduce these settings (output made absolute)."""
        args = ["benchmark", "-d", self.dataset, "-c", self.configuration, "-p", self.plans,
                "--labeled", *map(str, self.labeled), "--seeds", *map(str, self.seeds),
                *(["--other-seeds-at", *map(str, self.other_seeds_at)] if self.other_seeds_at else []),
                *(["--trainers", *self.trainers] if self.trainers else []),
                *(["--cached-trainers", *self.cached_trainers] if self.cached_trainers else []),
                *(["--pseudo-label-generalist", self.pseudo_label_generalist]
                  if self.pseudo_label_generalist is not None else []),
                *(["--generalist-row"] if self.generalist_row else []),
                *(["--prestage-options", *self.prestage_options] if self.prestage_options else []),
                "--budget", self.budget, "--num-val", str(self.num_val)]
        if self.test_list:
            args += ["--test-list", self.test_list]
        elif self.test_fraction:
            args += ["--test-fraction", *self.test_fraction, "--test-seed", str(self.test_seed)]
        else:
            args += ["--test-cases", str(self.test_cases), "--test-seed", str(self.test_seed)]
        if self.labeled_domains:
            args += ["--labeled-domain", *self.labeled_domains]
        if self.tolerance:
            args += ["--tolerance", *self.tolerance]
        if not self.ema_baselines:
            args += ["--no-ema-baselines"]
        args += ["--device", self.device, "-np", str(self.num_processes), "--output", output]
        return args

    def command(self, output: str) -> str:
        return shlex.join(["nnunet-foundation", *self.command_args(output)])


@dataclass(frozen=True)
class Run:
    """One training + test-set prediction + evaluation."""
    role: str
    trainer: str  # class name with budget suffix
    method: str  # class name without the budget suffix
    fold: int
    seed: int
    num_labeled: Optional[int]  # None for the fully supervised run
    split: dict = field(compare=False, repr=False)  # the fold: train / val / unlabeled lists
    # cache name in the preprocessed folder: trained from the generalist's labels made with the fold's labeled-only
    # model (--cached-trainers); None for every other run
    pseudo_labels: Optional[str] = None
    # GENERALIST runs: the labeled-only trainer class whose model prompts the generalist (its training folder)
    prompted_by: Optional[str] = None
    # COTRAINED_SAM runs: the co-training trainer class whose run's checkpoint holds the SAM (its training folder)
    sam_of: Optional[str] = None
    # the trainer class has a per-fold pre-stage (``benchmark_prestage``, e.g. SFR's fine-tuning) run before training
    prestage: bool = False

    @property
    def run_id(self) -> str:
        labeled = "all" if self.num_labeled is None else str(self.num_labeled)
        return f"labeled-{labeled}_seed-{self.seed}_{self.trainer}"

    @property
    def column(self) -> str:
        """Report column: the labeled count, or 'all' for the fully supervised run."""
        return "all" if self.num_labeled is None else str(self.num_labeled)

    def describe(self) -> dict:
        return {"run_id": self.run_id, "role": self.role, "trainer": self.trainer, "method": self.method,
                "fold": self.fold, "seed": self.seed, "num_labeled": self.num_labeled,
                "num_train": len(self.split["train"]), "num_val": len(self.split["val"]),
                "num_unlabeled_from_split": len(self.split.get("unlabeled", [])),
                **({"pseudo_labels": self.pseudo_labels} if self.pseudo_labels else {}),
                **({"prompted_by": self.prompted_by} if self.prompted_by else {}),
                **({"sam_of": self.sam_of} if self.sam_of else {}),
                **({"prestage": True} if self.prestage else {})}
