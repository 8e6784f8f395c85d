"""Autograd formulas and fake implementations of the compiled partitioned-convolution ops, shared by the
backends that run them: ``"aten"`` (``dfs_kernels::partitioned_conv2d``, ...) and ``"cuda"``
(``dfs_kernels::cuda_partitioned_conv2d``, ...). The ops of both have the same schemas and the same
math; they differ only in the kernel behind the input gradient of the shared channels.

For a prefix P, ``dfs_kernels::{P}partitioned_conv2d`` is the forward: one convolution over every input
channel. Its backward computes the weight and bias gradients in full (ATen's, that is oneDNN / cuDNN)
and the input gradient of the shared channels only (``dfs_kernels::{P}partitioned_conv2d_input_grad``),
never that of the referenced channels.

``dfs_kernels::{P}partitioned_conv2d_with_exit_pool`` is the DFS stage: the same convolution plus the
pooled read of an exit referencing the same input. Its backward writes the convolution's gradient into
[0, Cp) and the exit's into [Cp, C) of one tensor: no zero-fill and no add of two full-size gradients.
"""

from __future__ import annotations

import types

import torch
from torch._prims_common import suggest_memory_format

from ._flops import register_conv_flops


def _conv_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


def _input_grad_fake(grad_output, input, weight, stride, padding, dilation, groups, shared_channels, grad_pooled=None):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


def _stage_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    return _conv_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels), input.mean(dim=(2, 3))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, shared_channels = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _stage_setup_context(ctx, inputs, output) -> None:
    _setup_context(ctx, inputs, output)
    ctx.set_materialize_grads(False)  # an unused output sends None: its gradient is neither read nor made


def _weight_and_bias_grads(ctx, grad_output, input, weight):
    needs_weight, needs_bias = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.bias_sizes is not None
    if grad_output is None or not (needs_weight or needs_bias):
        return None, None
    stride, padding, dilation, groups = ctx.conv_args
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output, input, weight, ctx.bias_sizes, stride, padding, dilation,
        False, [0, 0], groups, [False, needs_weight, needs_bias],
    )
    return grad_weight, grad_bias


def register_partitioned_conv2d_ops(prefix: str) -> types.SimpleNamespace:
    """Registers the fakes and autograd formulas of ``dfs_kernels::{prefix}partitioned_conv2d``,
    ``..._with_exit_pool`` and ``..._input_grad``; returns ``partitioned_conv2d(...)`` and
    ``partitioned_conv2d_with_exit_pool(...)`` calling the forward ops with validated arguments from
    ``dfs_kernels.functional`` (padding already numeric)."""
    conv_name, stage_name, input_grad_name = (
        f"dfs_kernels::{prefix}{name}"
        for name in ("partitioned_conv2d", "partitioned_conv2d_with_exit_pool", "partitioned_conv2d_input_grad")
    )
    ops = torch.ops.dfs_kernels
    conv_op = getattr(ops, f"{prefix}partitioned_conv2d")
    stage_op = getattr(ops, f"{prefix}partitioned_conv2d_with_exit_pool")
    input_grad_op = getattr(ops, f"{prefix}partitioned_conv2d_input_grad")

    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = None
        # With no shared channel the input gradient is identically zero: return none at all.
        if ctx.needs_input_grad[0] and ctx.shared_channels > 0:
            grad_input = input_grad_op(grad_output, input, weight, *ctx.conv_args, ctx.shared_channels)
        return grad_input, *_weight_and_bias_grads(ctx, grad_output, input, weight), None, None, None, None, None

    def stage_backward(ctx, grad_output, grad_pooled):
        input, weight = ctx.saved_tensors
        grad_input = None
        if ctx.needs_input_grad[0]:
            if grad_output is not None:
                grad_input = input_grad_op(grad_output, input, weight, *ctx.conv_args, ctx.shared_channels, grad_pooled)
            elif grad_pooled is not None:
                grad_input = torch.ops.dfs_kernels.exit_avg_pool_backward(
                    grad_pooled, list(input.shape), ctx.shared_channels,
                    suggest_memory_format(input) == torch.channels_last,
                )
        return grad_input, *_weight_and_bias_grads(ctx, grad_output, input, weight), None, None, None, None, None

    torch.library.register_fake(conv_name, _conv_fake)
    torch.library.register_fake(stage_name, _stage_fake)
    torch.library.register_fake(input_grad_name, _input_grad_fake)
    torch.library.register_autograd(conv_name, backward, setup_context=_setup_context)
    torch.library.register_autograd(stage_name, stage_backward, setup_context=_stage_setup_context)
    register_conv_flops(forward=[conv_op, stage_op], input_grad=[input_grad_op])

    def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return conv_op(input, weight, bias, stride, padding, dilation, groups, shared_channels)

    def partitioned_conv2d_with_exit_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        """(partitioned_conv2d(...), exit_avg_pool(input, shared_channels)) with one backward tensor."""
        return stage_op(input, weight, bias, stride, padding, dilation, groups, shared_channels)

    return types.SimpleNamespace(
        partitioned_conv2d=partitioned_conv2d, partitioned_conv2d_with_exit_pool=partitioned_conv2d_with_exit_pool
    )
