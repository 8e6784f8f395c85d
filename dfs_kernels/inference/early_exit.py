"""The early-exit runner: a batch goes through the network block by block and thins out at every exit.

After block k and exit k, the samples whose confidence reaches threshold k leave with exit k's
prediction; the state of the others is compacted (``index_select`` on the batch dimension) and only
they go through block k+1. A ``MultiExitModel`` runs the user's forward whole and cannot drop samples
midway: its batch runs on (``run_exits``) until the first exit at which every sample has left, each
sample keeping the prediction of the exit it left at; with batches of one image that is per-sample
early exit. The decisions are those of the simulated evaluation
(``budgeted.assign_exits`` on ``evaluate.collect_exit_outputs``), which runs every exit on every sample,
and the FLOPs executed per sample are its exit's cumulative cost, so a run costs the simulated average
FLOPs times the number of samples. ``measure_speedup`` times the runner against the plain forward,
which runs all exits on the full batch.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..models.blockwise import blockwise_view
from ..multi_exit import MultiExitModel
from .evaluate import check_eval_mode, exit_confidences


@dataclass
class EarlyExitResult:
    """Per sample: the predicted class and the (0-based) exit it left at, both [N]."""

    predictions: torch.Tensor
    exits: torch.Tensor


@torch.inference_mode()
def early_exit_predict(model: nn.Module, images: torch.Tensor, thresholds: Sequence[float]) -> EarlyExitResult:
    """Classifies ``images`` [N, C, H, W] with ``model`` (in eval mode; a model ``blockwise_view``
    supports, or a ``MultiExitModel``), stopping each sample at the first exit k whose confidence reaches
    ``thresholds[k]``; the last exit takes every sample still there."""
    check_eval_mode(model)
    if isinstance(model, MultiExitModel):
        return _whole_batch_early_exit(model, images, thresholds)
    view = blockwise_view(model)
    if len(thresholds) != len(view.blocks):
        raise ValueError(f"expected {len(view.blocks)} thresholds, got {len(thresholds)}")
    predictions = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
    exits = torch.empty_like(predictions)
    index = torch.arange(images.shape[0], device=images.device)  # original position of each row still running
    state = (images,)
    last = len(view.blocks) - 1
    for k, (block, head) in enumerate(zip(view.blocks, view.heads)):
        state = block(state)
        confidence, prediction = exit_confidences(head(state))
        leave = confidence >= thresholds[k] if k < last else torch.ones_like(confidence, dtype=torch.bool)
        left = index[leave]
        predictions[left] = prediction[leave]
        exits[left] = k
        stay = (~leave).nonzero().squeeze(1)
        if stay.numel() == 0:
            break
        if stay.numel() < index.numel():  # index_select copies: skip it when nobody left
            index = index[stay]
            state = tuple(tensor.index_select(0, stay) for tensor in state)
    return EarlyExitResult(predictions, exits)


def _whole_batch_early_exit(model: MultiExitModel, images: torch.Tensor,
                            thresholds: Sequence[float]) -> EarlyExitResult:
    """``early_exit_predict`` for a ``MultiExitModel``: the batch stops at the first exit where no sample
    is left (see the module docstring)."""
    if len(thresholds) != len(model.exits) + 1:
        raise ValueError(f"expected {len(model.exits) + 1} thresholds (one per exit and the model's own output), "
                         f"got {len(thresholds)}")
    predictions = torch.empty(images.shape[0], dtype=torch.long, device=images.device)
    exits = torch.full_like(predictions, -1)

    def leave(k: int, logits: torch.Tensor, threshold: float) -> bool:
        confidence, prediction = exit_confidences(logits)
        leaving = (confidence >= threshold) & (exits < 0)
        predictions[leaving] = prediction[leaving]
        exits[leaving] = k
        return bool((exits >= 0).all())

    logits = model.run_exits(images, until=lambda k, exit_logits: leave(k, exit_logits, thresholds[k]))
    if len(logits) == len(thresholds):  # ran to the end: the model's own output takes the rest
        leave(len(logits) - 1, logits[-1], -math.inf)
    return EarlyExitResult(predictions, exits)


@dataclass
class SpeedupResult:
    """Median seconds of the plain forward (all exits, full batches) and of the runner at each set of
    thresholds, over ``repeats`` interleaved passes over the same batches."""

    all_exits_seconds: float
    early_exit_seconds: list[float]
    repeats: int

    @property
    def speedups(self) -> list[float]:
        return [self.all_exits_seconds / seconds for seconds in self.early_exit_seconds]


def _timed_pass(run, batches: Sequence[torch.Tensor]) -> float:
    device = batches[0].device
    start = time.perf_counter()
    for images in batches:
        run(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def measure_speedup(model: nn.Module, batches: Sequence[torch.Tensor], threshold_sets: Sequence[Sequence[float]],
                    *, repeats: int = 5, progress: bool = False) -> SpeedupResult:
    """Times ``model(images)`` and ``early_exit_predict(model, images, thresholds)`` for every set of
    ``threshold_sets`` over ``batches`` (already on the model's device). One untimed warm-up pass of
    each, then ``repeats`` rounds that time each once, side by side, so that drifts in the machine's
    speed hit all of them alike; medians."""
    check_eval_mode(model)
    runs = [model] + [lambda images, t=thresholds: early_exit_predict(model, images, t)
                      for thresholds in threshold_sets]
    for run in runs:
        _timed_pass(run, batches)
    seconds: list[list[float]] = [[] for _ in runs]
    for _ in tqdm(range(repeats), desc="timing", disable=not progress, leave=False):
        for run, record in zip(runs, seconds):
            record.append(_timed_pass(run, batches))
    medians = [statistics.median(record) for record in seconds]
    return SpeedupResult(medians[0], medians[1:], repeats)
