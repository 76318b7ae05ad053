"""The one-command label-scarcity benchmark (``nnunet-foundation benchmark``).

For a fully labeled, planned and preprocessed dataset it writes label-scarcity splits with a held-out test set,
trains ``nnUNetTrainer_<budget>`` on the labeled cases only (lower bound), each semi-supervised ``<T>_<budget>`` on
the same labeled cases plus the fold's unlabeled ones, and ``nnUNetTrainer_<budget>`` with every label (upper bound)
through the real ``nnUNetv2_train``; predicts the test cases with ``nnUNetv2_predict``; scores Dice, HD95 and NSD;
and writes ``results.json``, ``report.md`` and plots. See docs/benchmarking.md.

- ``settings``: what a benchmark is (settings, runs, the command that reproduces it);
- ``runner``: splits, test export, trainings, predictions, evaluation, resuming, job scripts;
- ``report``: aggregates, gap closed, results.json, report.md, plots;
- ``machine``: the hardware and versions the numbers were measured with.
"""
from nnunet_foundation.benchmark.report import write_reports  # noqa: F401
from nnunet_foundation.benchmark.runner import Benchmark  # noqa: F401
from nnunet_foundation.benchmark.settings import BenchmarkError, BenchmarkSettings, Run  # noqa: F401
