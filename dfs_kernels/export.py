"""Deployment: lowering the DFS ops of an exported program to plain ATen ops.

Deep Feature Surgery changes gradients only: the forward of every DFS op is an ATen op
(docs/semantics.md). ``partitioned_conv2d`` is ``aten.convolution``, the fused stage
``partitioned_conv2d_with_exit_pool`` is that convolution and a mean over (H, W) of its input, and
``exit_avg_pool`` is that mean (on another channel axis, the functional layer records the view it pools
as ATen views), ``partitioned_linear`` is ``aten.linear`` (core ATen: a transpose and ``addmm`` or
``matmul``); ``reroute`` and ``exit_reference`` are views of x: traced code records the Python
autograd Functions' views as ATen views, and the compiled ops (eager only) lower to ``aten.alias``. So a trained DFS model leaves as a plain
network::

    program = torch.export.export(model.eval(), (images,))
    program = program.run_decompositions(dfs_kernels.export_decompositions())
    torch.export.save(program, "model.pt2")   # loads and runs where dfs_kernels is not installed

The decompositions are not registered as ``CompositeImplicitAutograd`` kernels, which would let the
default ``run_decompositions()`` find them: tracing (``torch.compile``, ``torch.export``) decomposes
such kernels eagerly, so a training graph would lose the DFS backward and the backends' forward kernels.

Ops are found by name in ``torch.ops.dfs_kernels``: the "aten" backend's ops carry the plain names,
every other backend's the same names prefixed with the backend's name (``triton_exit_avg_pool``).
Only ops present in this build and process are listed (the Triton ops register when the "triton"
backend is first used), so build the table after exporting.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._library import NAMESPACE
from .backends import BACKENDS

__all__ = ["decompositions", "export_decompositions"]


def _convolution(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    return torch.ops.aten.convolution.default(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


def _mean_over_pixels(input, shared_channels):
    return torch.ops.aten.mean.dim(input, [2, 3])


def _convolution_and_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    conv = _convolution(input, weight, bias, stride, padding, dilation, groups, shared_channels)
    return conv, _mean_over_pixels(input, shared_channels)


def _linear(input, weight, bias, shared_features):
    return torch.ops.aten.linear.default(input, weight, bias)


def _views(x, shared_channels, dim):
    return torch.ops.aten.alias.default(x), torch.ops.aten.alias.default(x)


def _view(x, shared_channels, dim):
    return torch.ops.aten.alias.default(x)


FORWARD_DECOMPOSITIONS: dict[str, Callable] = {
    "partitioned_conv2d": _convolution,
    "partitioned_linear": _linear,
    "partitioned_conv2d_with_exit_pool": _convolution_and_pool,
    "exit_avg_pool": _mean_over_pixels,
    "reroute": _views,
    "exit_reference": _view,
}
"""The forward of each DFS op family as ATen ops; every backend's op of a family has the same schema."""


def _op_names(kind: str) -> list[str]:
    return [kind] + [f"{backend}_{kind}" for backend in BACKENDS]


def decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """Every DFS op present in this process whose forward a model can run, mapped to its ATen
    decomposition: a table to merge into a ``run_decompositions`` (or ``torch._decomp``) table."""
    namespace = getattr(torch.ops, NAMESPACE)
    table = {}
    for kind, decomposition in FORWARD_DECOMPOSITIONS.items():
        for name in _op_names(kind):
            if hasattr(namespace, name):  # absent from this build, or not registered yet (Triton)
                table[getattr(namespace, name).default] = decomposition
    return table


def export_decompositions() -> torch.export.decomp_utils.CustomDecompTable:
    """``torch.export.default_decompositions()`` plus ``decompositions()``: pass it to
    ``ExportedProgram.run_decompositions`` to lower to core ATen with no ``dfs_kernels::`` op left."""
    table = torch.export.default_decompositions()
    table.update(decompositions())
    return table
