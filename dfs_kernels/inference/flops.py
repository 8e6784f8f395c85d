"""FLOPs per exit and FLOPs of a whole run, counted with ``torch.utils.flop_counter.FlopCounterMode``.

Per-exit costs are cumulative, as the MSDNet literature reports them: exit k counts every block and
every classifier up to and including k. That is exactly what a sample leaving at exit k has cost in
an early-exit run (``dfs_kernels.inference.early_exit``), which ran blocks 1..k and heads 1..k on it,
so the average cost of a run is the mean of its samples' exit costs. The numbers come from
``dfs_kernels.models.summary.exit_costs``.

FlopCounterMode counts convolutions and matrix products, 2 FLOPs per multiply-add (the literature's
"FLOPs" are multiply-adds, half these). The package registers formulas for its compiled ops ("aten" and
"cudnn" backends), but a Triton kernel is invisible to it, and which backend ``"auto"`` picks depends on
the device. So counting takes a model without ``PartitionedConv2d``: the "dsn" flavour, whose forward
is the same computation as the DFS flavours' (one state_dict loads into all three).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..models import summary
from ..nn import PartitionedConv2d

T = TypeVar("T")


def check_countable(model: nn.Module) -> None:
    """ValueError when FlopCounterMode would miss part of ``model``'s FLOPs (it holds PartitionedConv2d)."""
    if any(isinstance(module, PartitionedConv2d) for module in model.modules()):
        raise ValueError(
            "FLOPs are counted on models without PartitionedConv2d (FlopCounterMode cannot count its Triton "
            "kernels): use the model's 'dsn' flavour, which computes the same forward (load the same "
            "state_dict into it)"
        )


def exit_flops(model: nn.Module) -> list[int]:
    """Cumulative FLOPs per image of every exit, shallow to deep (one forward of a
    ``model.input_size`` image; see the module docstring)."""
    check_countable(model)
    return [cost["flops"] for cost in summary.exit_costs(model)]


def count_flops(model: nn.Module, run: Callable[[], T]) -> tuple[T, int]:
    """``(run(), FLOPs it executed)``, ``run`` being a computation with ``model``."""
    check_countable(model)
    with FlopCounterMode(display=False) as counter:
        result = run()
    return result, counter.get_total_flops()
