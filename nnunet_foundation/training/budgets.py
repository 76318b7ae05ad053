"""Named training budgets, as trainer-class suffixes in nnU-Net's naming style.

nnU-Net passes no arguments to trainers, so the budget is part of the class name: ``nnUNetTrainerMeanTeacher_cpu500``
is Mean Teacher with the ``cpu500`` budget. Every trainer of this package gets every budget, and so does the stock
``nnUNetTrainer`` for the names nnU-Net itself lacks, so that labeled-only, semi-supervised and fully supervised
runs of a benchmark train for exactly the same number of iterations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Budget:
    num_epochs: int
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    #: None keeps the plan's batch size. A fixed small batch makes CPU runs affordable (say so in reports).
    batch_size: Optional[int] = None
    description: str = ""

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.iterations_per_epoch


BUDGETS = {
    # tests and CI: seconds on a CPU, proves the plumbing only
    "smoke": Budget(2, 4, 2, batch_size=2, description="2 epochs x 4 iterations, batch 2 (plumbing checks only)"),
    # the demo (nnunet-foundation demo): a few minutes on a laptop CPU for two trainers
    "demo": Budget(15, 10, 2, batch_size=2, description="15 epochs x 10 iterations, batch 2 (CPU demo)"),
    # a very short 3d_fullres CPU run (about 3 min for nnUNetTrainer on Hippocampus); too short to learn from 2
    # labeled Hippocampus cases (test Dice 0.00 on 2026-11-23), so use cpu2d for a CPU study
    "cpu200": Budget(20, 10, 2, batch_size=2, description="20 epochs x 10 iterations, batch 2 (short CPU benchmark)"),
    # the CPU study: a 2d configuration, 1500 iterations of 16 slices (Hippocampus 2d: 0.14 s per nnUNetTrainer
    # iteration on 2 cores, against 0.8 s for one 3d_fullres iteration at batch 2)
    "cpu2d": Budget(20, 75, 5, batch_size=16,
                    description="20 epochs x 75 iterations, batch 16 (CPU benchmark of a 2d configuration)"),
    # the two-domain polyp CPU study (benchmarks/polyps.sh): RGB images shrunk to 128 px, 2d patches of 112 x 128;
    # 4 of them are 1.6x the pixels of a Hippocampus 2d batch of 16, and the study has 14+ trainings, so a third of
    # cpu2d's iterations (docs/benchmarks/polyps_cpu_budget.md)
    "cpu2dpolyps": Budget(20, 25, 5, batch_size=4,
                          description="20 epochs x 25 iterations, batch 4 (CPU study of 2d RGB images at 128 px)"),
    # a CPU benchmark: 500 iterations at batch 2 (about 10-15 min per 3d_fullres run on 2 cores for Hippocampus)
    "cpu500": Budget(20, 25, 5, batch_size=2, description="20 epochs x 25 iterations, batch 2 (CPU benchmark)"),
    # a short GPU benchmark: 1000 iterations at the plan's batch size (Hippocampus: ~15 min for 7 runs sharing one
    # GPU and 16 CPU cores, where data augmentation on the CPU is the bottleneck)
    "gpu1k": Budget(20, 50, 10, description="20 epochs x 50 iterations, plan batch size (short GPU benchmark)"),
    # a quick GPU study: 10k iterations at the plan's batch size
    "gpu10k": Budget(40, 250, 50, description="40 epochs x 250 iterations, plan batch size (quick GPU study)"),
    # nnU-Net's own epoch-count names (250 iterations each, plan batch size)
    **{f"{n}epochs": Budget(n, description=f"{n} epochs x 250 iterations, plan batch size")
       for n in (5, 10, 20, 50, 100, 250, 500)},
    "1epoch": Budget(1, description="1 epoch x 250 iterations, plan batch size"),
}
#: The default nnU-Net schedule, for reports.
DEFAULT_BUDGET = Budget(1000, 250, 50, description="nnU-Net default: 1000 epochs x 250 iterations")


def apply_budget(trainer, budget: Budget) -> None:
    """Set a trainer's schedule (called at the end of ``__init__``, before ``initialize``)."""
    trainer.num_epochs = budget.num_epochs
    trainer.num_iterations_per_epoch = budget.iterations_per_epoch
    trainer.num_val_iterations_per_epoch = budget.val_iterations_per_epoch
    if budget.batch_size is not None:
        # ConfigurationManager reads the batch size from this dict; nnU-Net's DDP split uses it too.
        trainer.configuration_manager.configuration["batch_size"] = budget.batch_size


def make_budget_variants(base_cls, namespace: dict, budgets=None, skip_existing_nnunet_names: bool = False) -> list:
    """Create ``<base>_<budget>`` subclasses in ``namespace`` (a module's globals) and return their names.

    The classes get the namespace's ``__name__`` as module so that they pickle and are found by nnU-Net's
    class-name lookup through the thin re-export modules in ``trainers/``.
    """
    names = []
    for suffix, budget in (budgets or BUDGETS).items():
        if skip_existing_nnunet_names and (suffix.endswith("epochs") or suffix == "1epoch"):
            continue  # nnU-Net ships nnUNetTrainer_5epochs etc. itself
        name = f"{base_cls.__name__}_{suffix}"
        cls = type(name, (base_cls,), {
            "__init__": _bind_init(base_cls, budget),
            "__module__": namespace["__name__"],
            "__qualname__": name,
            "__doc__": f"{base_cls.__name__} with the '{suffix}' budget: {budget.description}.",
            "budget": budget,
        })
        namespace[name] = cls
        names.append(name)
    return names


def _bind_init(base_cls, budget: Budget):
    # nnU-Net records __init__'s signature (plans, configuration, fold, dataset_json, device) in its checkpoints,
    # so the variant keeps exactly that signature.
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device=None):
        import torch
        base_cls.__init__(self, plans, configuration, fold, dataset_json,
                          device if device is not None else torch.device("cuda"))
        apply_budget(self, budget)
    return __init__
