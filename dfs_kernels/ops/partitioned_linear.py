"""The partitioned linear family, for every backend prefix ("" = aten, "cudnn_", "triton_"):

- ``{prefix}partitioned_linear(input, weight, bias, shared_features)``: ``linear([x+, sg(x-)], weight,
  bias)`` with the split on the last axis of ``input`` [..., in_features]; the forward is one GEMM over
  every input feature.
- ``{prefix}partitioned_linear_input_grad(grad_output, input, weight, shared_features)``: the input
  gradient of features [0, Cp) only, ``grad_output @ weight[:, :Cp]``, written into its slice of the
  full [..., in_features] gradient, whose features [Cp, in_features) are zeros: one tensor.

Backward (one formula for every backend, written in C++ for "aten" and "cudnn": csrc/autograd/): the
weight and bias gradients in full, by ATen's GEMM and sum (on every backend, Triton's included), and the
input gradient by the backend's ``..._input_grad``.
The referenced features' input gradient is never computed: that is the saving, (1 - Cp / in_features)
of the input-gradient GEMM. A recorded backward (``create_graph=True``) uses the differentiable
formulas of ``_composite`` instead.
"""

from __future__ import annotations

import functools

import torch

from .. import _library
from . import _composite, _flops

FORWARD = "partitioned_linear"
INPUT_GRAD = "partitioned_linear_input_grad"


def _op(prefix: str, name: str):
    return getattr(torch.ops.dfs_kernels, prefix + name)


def _linear_fake(input, weight, bias, shared_features):
    return torch.ops.aten.linear(input, weight, bias)


def _input_grad_fake(grad_output, input, weight, shared_features):
    return grad_output.new_empty(input.shape)


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, ctx.shared_features = inputs
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None


def _backward(prefix, ctx, grad_output):
    input, weight = ctx.saved_tensors
    cp = ctx.shared_features
    needs_input, needs_weight = ctx.needs_input_grad[:2]
    needs_bias = ctx.needs_input_grad[2] and ctx.has_bias
    if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
        return (*_composite.linear_grads(grad_output, input, weight, cp, needs_input, needs_weight, needs_bias), None)
    # One [M, out] reading of grad_output for both GEMMs: a gradient that arrives non-contiguous (Q/K/V's,
    # from attention's head transposes) is copied here once, not once per GEMM, and the input-gradient op
    # gets a view of the same rows (splitting dimension 0 back into the leading sizes is always a view).
    grad_rows = grad_output.reshape(-1, weight.shape[0])
    grad_output = grad_rows.view(grad_output.shape)
    grad_input = _op(prefix, INPUT_GRAD)(grad_output, input, weight, cp) if needs_input else None
    grad_weight = grad_rows.t().mm(input.reshape(-1, weight.shape[1])) if needs_weight else None
    grad_bias = grad_rows.sum(0) if needs_bias else None
    return grad_input, grad_weight, grad_bias, None


def _input_grad_setup_context(ctx, inputs, output) -> None:
    grad_output, _, weight, ctx.shared_features = inputs
    ctx.save_for_backward(grad_output, weight)


def _input_grad_backward(ctx, grad):
    grad_output, weight = ctx.saved_tensors
    grad_grad_output, grad_weight = _composite.linear_input_grad_adjoint(
        grad, grad_output, weight, ctx.shared_features, ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    )
    return grad_grad_output, None, grad_weight, None


def register(prefix: str) -> None:
    """Fakes, autograd and FLOP formulas of ``dfs_kernels::{prefix}partitioned_linear`` and its
    input-gradient op."""
    forward, input_grad = f"dfs_kernels::{prefix}{FORWARD}", f"dfs_kernels::{prefix}{INPUT_GRAD}"
    torch.library.register_fake(forward, _linear_fake)
    torch.library.register_fake(input_grad, _input_grad_fake)
    if not _library.has_autograd_kernel(forward):  # "aten" and "cudnn": C++ (csrc/autograd/)
        torch.library.register_autograd(forward, functools.partial(_backward, prefix), setup_context=_setup_context)
    torch.library.register_autograd(input_grad, _input_grad_backward, setup_context=_input_grad_setup_context)
    _flops.register_linear_flops(forward=[_op(prefix, FORWARD)], input_grad=[_op(prefix, INPUT_GRAD)])
