"""Inference with multi-exit networks: anytime accuracy, budgeted batch classification, early exit.

- ``flops``: cumulative FLOPs per exit (MSDNet's convention) and FLOPs of a run, with FlopCounterMode.
- ``evaluate``: the simulated evaluation, every exit on every sample (``collect_exit_outputs``), and
  the anytime accuracy of each exit.
- ``budgeted``: MSDNet's budgeted batch classification: confidence thresholds fitted on a validation
  split for a geometric share of samples per exit, swept over its parameter p.
- ``early_exit``: the runner that stops confident samples at an early exit and runs the rest of the
  network on the others only, with the same decisions as the simulated evaluation, and its timing.
- ``plot``: accuracy against average FLOPs for several runs.

``dfs-anytime RUN_DIR [RUN_DIR ...]`` (``dfs_kernels.cli.anytime``) does all of it for checkpoints of ``dfs-train``.
Models must be in eval mode; FLOPs are counted on the "dsn" flavour (see ``flops``).
"""

from __future__ import annotations

from .budgeted import (
    DEFAULT_PS,
    BudgetPoint,
    ThresholdResult,
    assign_exits,
    budget_curve,
    evaluate_thresholds,
    fit_thresholds,
    geometric_exit_fractions,
)
from .early_exit import EarlyExitResult, SpeedupResult, early_exit_predict, measure_speedup
from .evaluate import ExitOutputs, anytime_accuracy, collect_exit_outputs, exit_confidences
from .flops import check_countable, count_flops, exit_flops
from .plot import RunCurves, plot_runs

__all__ = [
    "DEFAULT_PS",
    "BudgetPoint",
    "EarlyExitResult",
    "ExitOutputs",
    "RunCurves",
    "SpeedupResult",
    "ThresholdResult",
    "anytime_accuracy",
    "assign_exits",
    "budget_curve",
    "check_countable",
    "collect_exit_outputs",
    "count_flops",
    "early_exit_predict",
    "evaluate_thresholds",
    "exit_confidences",
    "exit_flops",
    "fit_thresholds",
    "geometric_exit_fractions",
    "measure_speedup",
    "plot_runs",
]
