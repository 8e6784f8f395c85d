"""FLOP formulas of the package's convolution and linear ops, so ``torch.utils.flop_counter.FlopCounterMode`` counts
models that use them (it only knows ATen's ops; an unknown op counts as zero).

Same convention as ATen's convolution formula (``conv_flop_count``: 2 FLOPs per multiply-add). The
shared-only input gradient computes Cp of the Cin input channels, each costing what it costs in a full
input gradient, so it counts Cp / Cin of the full convolution's FLOPs; that is the saving DFS makes.
Exit pooling, like ATen's pooling ops, counts nothing.

Registered for the partitioned-convolution ops of every backend. The "triton" backend's ops reach a
dispatch mode as the Triton kernel launches inside them, which FlopCounterMode cannot count.

When: ``torch.utils.flop_counter`` imports triton, which this package imports only when its backend
is used, so the formulas are registered at once only if the counter is already imported, and
otherwise by ``register_flop_formulas()`` (``dfs_kernels.register_flop_formulas``), which the
package's own FLOP counts call and which a user of FlopCounterMode calls once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

_pending: list[tuple[list, Callable]] = []


def _first_output(out_shape):
    """The convolution's output shape: a fused stage returns (conv output, pooled exit features)."""
    return out_shape[0] if isinstance(out_shape[0], (tuple, list)) else out_shape


def _forward_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(input_shape, weight_shape, _first_output(out_shape))


def _input_grad_flops(grad_output_shape, input_shape, weight_shape, stride, padding, dilation, groups,
                      shared_channels, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(input_shape, weight_shape, grad_output_shape) * shared_channels // input_shape[1]


def _linear_forward_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    rows = 1
    for size in input_shape[:-1]:
        rows *= size
    return 2 * rows * weight_shape[0] * weight_shape[1]  # one [M, in] @ [in, out] matmul


def _linear_input_grad_flops(grad_output_shape, input_shape, weight_shape, shared_features, *args, out_shape=None,
                             **kwargs) -> int:
    return _linear_forward_flops(input_shape, weight_shape) * shared_features // max(weight_shape[1], 1)


def _queue(pairs) -> None:
    _pending.extend((list(ops), formula) for ops, formula in pairs if ops)
    if "torch.utils.flop_counter" in sys.modules:
        register_flop_formulas()


def register_linear_flops(*, forward: Iterable = (), input_grad: Iterable = ()) -> None:
    """Queues the formulas of partitioned linear ops: (input, weight, ...) for ``forward``, a matmul's
    FLOPs, and (grad_output, input, weight, shared_features) for ``input_grad``, Cp / in_features of
    one. (The weight gradient is ATen's ``mm``, which FlopCounterMode knows.)"""
    _queue(((forward, _linear_forward_flops), (input_grad, _linear_input_grad_flops)))


def register_conv_flops(*, forward: Iterable = (), input_grad: Iterable = ()) -> None:
    """Queues the formulas for op packets (``torch.ops.dfs_kernels.<name>``) whose leading arguments are
    (input, weight, ...) for ``forward`` (plain or fused-stage convolutions) and (grad_output, input,
    weight, stride, padding, dilation, groups, shared_channels, ...) for ``input_grad``, and registers
    them if FlopCounterMode is already imported. (The weight gradient is ATen's ``convolution_backward``,
    which FlopCounterMode knows.)"""
    _queue(((forward, _forward_flops), (input_grad, _input_grad_flops)))


def register_flop_formulas() -> None:
    """Makes ``torch.utils.flop_counter.FlopCounterMode`` count the package's compiled ops (idempotent)."""
    from torch.utils.flop_counter import register_flop_formula

    while _pending:
        ops, formula = _pending.pop()
        register_flop_formula(ops)(formula)
