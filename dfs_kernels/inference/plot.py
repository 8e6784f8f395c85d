"""Accuracy against average FLOPs per image, several runs on one plot (e.g. DSN against DFS).

Each run draws its budgeted-batch curve (test accuracy and average FLOPs of every p, as a line sorted
by FLOPs) and its anytime points (exit k alone, at exit k's cumulative FLOPs) in the same colour.
matplotlib is imported when plotting, with the Agg backend, so the package does not need it otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .budgeted import BudgetPoint


@dataclass
class RunCurves:
    """What one run contributes to the plot: a legend label, its exits' cumulative FLOPs and anytime
    accuracies (%), and its budget points."""

    label: str
    exit_flops: list[int]
    anytime_accuracy: list[float]
    budget_points: list[BudgetPoint]


def plot_runs(runs: Sequence[RunCurves], path: str, *, title: str = "") -> None:
    """Writes the plot of ``runs`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.8), dpi=150)
    for index, run in enumerate(runs):
        colour = f"C{index}"
        points = sorted(run.budget_points, key=lambda point: point.test.average_flops)
        axes.plot([point.test.average_flops / 1e6 for point in points], [point.test.accuracy for point in points],
                  "-", color=colour, marker=".", label=f"{run.label}: budgeted")
        axes.plot([flops / 1e6 for flops in run.exit_flops], run.anytime_accuracy, "s", color=colour,
                  markerfacecolor="none", label=f"{run.label}: single exits")
        # exit numbers beside the squares, each run at its own offset so that runs of one model don't overlap
        offset = (4 + 7 * (index // 2), -10 if index % 2 == 0 else 4)
        for number, (flops, accuracy) in enumerate(zip(run.exit_flops, run.anytime_accuracy), start=1):
            axes.annotate(str(number), (flops / 1e6, accuracy), textcoords="offset points", xytext=offset,
                          fontsize=7, color=colour)
    axes.set_xlabel("average MFLOPs per image (FlopCounterMode: 2 per multiply-add, cumulative per exit)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
