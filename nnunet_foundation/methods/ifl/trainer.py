"""IFL's round trainers: ``nnUNetTrainerIFLRound<r>`` (r = 1..MAX_ROUNDS) is nnU-Net retrained in round r on the
labeled cases plus round r's propagated pseudo-labels of the unlabeled ones (self-training from the offline cache
``IFL__<plans>__fold<f>__round<r>`` that ``nnunet-foundation ifl`` writes), warm-started by that command from the
previous round's weights with ``-pretrained_weights``.

One class per round because nnU-Net names a run folder by its trainer: each round is then an ordinary nnU-Net run
(``nnUNetv2_predict -tr nnUNetTrainerIFLRound2_<budget>`` predicts with round 2, ``--c`` resumes it), and no round
overwrites another. Round 0 is the package's labeled-only baseline, ``nnUNetTrainerEMA``.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from nnunet_foundation.methods.self_training import nnUNetTrainerSelfTraining
from nnunet_foundation.training.budgets import make_budget_variants

#: rounds after round 0 that have a trainer class (``nnunet-foundation ifl --rounds`` at most this)
MAX_ROUNDS = 5


def ifl_cache_name(plans_identifier: str, fold: int, round_index: int) -> str:
    """Name of round ``round_index``'s pseudo-label cache (under the configuration's ``_pseudo_labels`` folder)."""
    return f"IFL__{plans_identifier}__fold{fold}__round{round_index}"


class nnUNetTrainerIFLRound(nnUNetTrainerSelfTraining):
    """Base of the round trainers (not a round itself): learns from its round's cache unless ``pseudo_labels``
    names another."""
    ifl_round = 0
    #: the benchmark's pre-stage (``nnunet-foundation ifl``) trains this round itself, warm-started from the round
    #: before: the benchmark runs no nnUNetv2_train after it
    benchmark_prestage_trains = True

    @classmethod
    def benchmark_prestage(cls, dataset: str, configuration: str, plans: str, fold: int, device: str,
                           generalist: Optional[str], options: List[str], cached: bool,
                           budget: Optional[str] = None) -> Tuple[List[str], Optional[str]]:
        """The benchmark row of round r: ``nnunet-foundation ifl --rounds r`` on the fold (round 0 is the fold's
        labeled-only nnUNetTrainerEMA run, shared with the benchmark's bound; finished rounds are skipped, so the
        rows of rounds 1..r of one fold share their earlier rounds). ``--converged 1`` keeps the rounds going, so
        every row has its model; the cache is the round's own."""
        cmd = ["nnunet-foundation", "ifl", "-d", dataset, "-c", configuration, "-p", plans, "-f", str(fold),
               "--rounds", str(cls.ifl_round), "--converged", "1", "-device", device,
               *(["--budget", budget] if budget else []),
               *(["--generalists", generalist] if generalist is not None else []), *options]
        return cmd, ifl_cache_name(plans, fold, cls.ifl_round)

    def default_pseudo_label_cache(self) -> str:
        if self.ifl_round < 1:
            return ""
        return ifl_cache_name(self.plans_manager.plans_name, self.fold, self.ifl_round)


def _round_classes(namespace: dict) -> list:
    names = []
    for r in range(1, MAX_ROUNDS + 1):
        name = f"nnUNetTrainerIFLRound{r}"
        cls = type(name, (nnUNetTrainerIFLRound,), {
            "ifl_round": r, "__module__": namespace["__name__"], "__qualname__": name,
            "__doc__": f"IFL round {r}: nnU-Net on the labeled cases plus the cache "
                       f"IFL__<plans>__fold<f>__round{r} (nnunet-foundation ifl)."})
        namespace[name] = cls
        names += [name, *make_budget_variants(cls, namespace)]
    return names


__all__ = ["MAX_ROUNDS", "ifl_cache_name", *_round_classes(globals())]
