"""Budgeted batch classification as in MSDNet (Huang et al., ICLR 2018): confidence thresholds per exit.

A sample leaves at the first exit k whose confidence (max softmax probability) reaches the threshold
T_k; the last exit takes every sample still there (T_K = -inf). For a parameter p of the sweep, the
share of samples meant to leave at exit k follows a geometric law normalised over the K exits,
q_k = p^k / (p + p^2 + ... + p^K): p < 1 favours early exits (small budgets), p > 1 late ones.
The thresholds are fitted on a validation split, walking the exits in order: T_k is the confidence,
at exit k, of the sample that brings the number of validation samples gone by exit k to its target,
among the samples still there. They are then applied to the test split, whose accuracy and average
cost per sample (cumulative exit FLOPs, ``dfs_kernels.inference.flops``) give one point of the
accuracy-budget curve.

Rounding: MSDNet's code sends floor(n * q_k) validation samples out at each early exit; here exits
1..k together take floor(n * (q_1 + ... + q_k)). Each exit's count stays within one sample of n * q_k,
a tie that lets extra samples out at one exit is made up at the next, and, without ties, the
validation cost is non-decreasing in p by construction (the cumulative targets only fall as p grows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .evaluate import ExitOutputs

DEFAULT_PS = tuple(i / 20 for i in range(1, 40))
"""MSDNet's sweep: p = 0.05, 0.10, ..., 1.95."""


def geometric_exit_fractions(p: float, num_exits: int) -> torch.Tensor:
    """q_k = p^k / sum_j p^j for k = 1..num_exits, float64 [num_exits]."""
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    weights = torch.tensor([p ** k for k in range(1, num_exits + 1)], dtype=torch.float64)
    return weights / weights.sum()


def fit_thresholds(confidences: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """Thresholds [K] (float64) that make the share ``fractions[k]`` of the samples of ``confidences``
    [K, N] leave at exit k (see the module docstring for the rounding). An exit whose target is
    already met gets +inf: no sample leaves there."""
    num_exits, num_samples = confidences.shape
    if fractions.shape != (num_exits,):
        raise ValueError(f"expected {num_exits} fractions, got shape {tuple(fractions.shape)}")
    # The epsilon keeps n * (a sum that should be an integer) from flooring one below it.
    targets = torch.floor(num_samples * torch.cumsum(fractions.double(), 0) + 1e-9).long().tolist()
    thresholds = torch.full((num_exits,), math.inf, dtype=torch.float64)
    thresholds[-1] = -math.inf
    remaining = torch.ones(num_samples, dtype=torch.bool, device=confidences.device)
    for k in range(num_exits - 1):
        wanted = targets[k] - (num_samples - int(remaining.sum()))
        if wanted > 0:  # wanted <= the remaining samples, since targets[k] <= num_samples
            thresholds[k] = confidences[k][remaining].topk(wanted).values[-1]
            remaining &= confidences[k] < thresholds[k]
    return thresholds


def assign_exits(confidences: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Exit index [N] of every sample: the first k with ``confidences[k] >= thresholds[k]``, the last
    exit for the others."""
    leaves = confidences >= thresholds.to(confidences)[:, None]
    leaves[-1] = True
    return leaves.to(torch.uint8).argmax(dim=0)  # argmax returns the first maximum


@dataclass
class ThresholdResult:
    """Accuracy (%), average FLOPs per sample and the number of samples leaving at each exit."""

    accuracy: float
    average_flops: float
    exit_counts: list[int]


def evaluate_thresholds(outputs: ExitOutputs, thresholds: torch.Tensor, exit_flops: Sequence[float]) -> ThresholdResult:
    """Applies ``thresholds`` to ``outputs``; ``exit_flops`` are the cumulative costs of the exits."""
    exits = assign_exits(outputs.confidences, thresholds)
    correct = outputs.correct().gather(0, exits[None]).squeeze(0)
    counts = torch.bincount(exits, minlength=outputs.num_exits)
    total_flops = (counts.double() * torch.tensor(exit_flops, dtype=torch.float64)).sum().item()
    return ThresholdResult(correct.double().mean().item() * 100, total_flops / exits.numel(), counts.tolist())


@dataclass
class BudgetPoint:
    """One p of the sweep: its thresholds (fitted on ``val``) and their results on val and test."""

    p: float
    thresholds: list[float]
    val: ThresholdResult
    test: ThresholdResult


def budget_curve(val: ExitOutputs, test: ExitOutputs, exit_flops: Sequence[float],
                 ps: Sequence[float] = DEFAULT_PS) -> list[BudgetPoint]:
    """One ``BudgetPoint`` per p of ``ps``, in that order."""
    points = []
    for p in ps:
        thresholds = fit_thresholds(val.confidences, geometric_exit_fractions(p, val.num_exits))
        points.append(BudgetPoint(p, thresholds.tolist(), evaluate_thresholds(val, thresholds, exit_flops),
                                  evaluate_thresholds(test, thresholds, exit_flops)))
    return points
