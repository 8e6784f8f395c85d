"""FLOPs per exit and FLOPs of a whole run, counted with ``torch.utils.flop_counter.FlopCounterMode``.

Per-exit costs are cumulative, as the MSDNet literature reports them: exit k counts every block and
every classifier up to and including k. That is exactly what a sample leaving at exit k has cost in
an early-exit run (``dfs_kernels.inference.early_exit``), which ran blocks 1..k and heads 1..k on it,
so the average cost of a run is the mean of its samples' exit costs. The numbers come from
``dfs_kernels.models.summary.exit_costs``.

FlopCounterMode counts convolutions and matrix products, 2 FLOPs per multiply-add (the literature's
"FLOPs" are multiply-adds, half these). The package registers formulas for its compiled ops ("aten" and
"cudnn" backends), but a Triton kernel is invisible to it, and which backend ``"auto"`` picks depends on
the device. So counting takes a model without ``PartitionedConv2d`` or ``PartitionedLinear``: the "dsn"
flavour, whose forward is the same computation as the DFS flavours' (one state_dict loads into all three).

A ``MultiExitModel`` (``multi_exit``) is counted on an input it is given: exit k's cost is that of a
forward stopped right after exit k (``run_exits``), its heads included; the last entry is the whole forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from .._exit_points import as_call
from ..models import summary
from ..multi_exit import MultiExitModel
from ..nn import PartitionedConv2d, PartitionedLinear

T = TypeVar("T")


def check_countable(model: nn.Module) -> None:
    """ValueError when FlopCounterMode would miss part of ``model``'s FLOPs (it holds partitioned layers)."""
    if any(isinstance(module, (PartitionedConv2d, PartitionedLinear)) for module in model.modules()):
        raise ValueError(
            "FLOPs are counted on models without PartitionedConv2d or PartitionedLinear (FlopCounterMode cannot "
            "count their Triton kernels): use the model's 'dsn' flavour, which computes the same forward (load "
            "the same state_dict into it; multi_exit(..., flavour='dsn') for a MultiExitModel)"
        )


def exit_flops(model: nn.Module, example_input: object = None) -> list[int]:
    """Cumulative FLOPs per sample of every exit, shallow to deep (see the module docstring): one forward
    of a ``model.input_size`` image, or for a ``MultiExitModel`` one forward per exit of ``example_input``
    (a batch as ``multi_exit`` takes it: a tensor, a tuple of arguments or a dict of keyword arguments)."""
    check_countable(model)
    if not isinstance(model, MultiExitModel):
        return [cost["flops"] for cost in summary.exit_costs(model)]
    if example_input is None:
        raise ValueError("example_input is needed to count the FLOPs of a MultiExitModel (a batch it accepts)")
    args, kwargs = as_call(example_input)
    batch_size = next(leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)).shape[0]
    costs = []
    for k in range(len(model.exits) + 1):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.run_exits(*args, until=lambda index, logits, k=k: index == k, **kwargs)
        costs.append(counter.get_total_flops() // batch_size)
    return costs


def count_flops(model: nn.Module, run: Callable[[], T]) -> tuple[T, int]:
    """``(run(), FLOPs it executed)``, ``run`` being a computation with ``model``."""
    check_countable(model)
    with FlopCounterMode(display=False) as counter:
        result = run()
    return result, counter.get_total_flops()
