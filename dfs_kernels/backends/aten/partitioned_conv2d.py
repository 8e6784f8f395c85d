"""``dfs_kernels::partitioned_conv2d`` on ATen: forward is one convolution over every input channel
(oneDNN / cuDNN); backward computes the weight and bias gradients in full and the input gradient of
the shared channels only (``dfs_kernels::partitioned_conv2d_input_grad``), never that of the
referenced channels.

``dfs_kernels::partitioned_conv2d_with_exit_pool`` is the DFS stage: the same convolution plus the
pooled read of an exit referencing the same input. Its backward writes the convolution's gradient
into [0, Cp) and the exit's into [Cp, C) of one tensor, in one pass: no zero-fill and no add of two
full-size gradients, which on CPU is most of what separates DFS from its ideal step time."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


@torch.library.register_fake("dfs_kernels::partitioned_conv2d")
def _partitioned_conv2d_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


@torch.library.register_fake("dfs_kernels::partitioned_conv2d_input_grad")
def _input_grad_fake(grad_output, input, weight, stride, padding, dilation, groups, shared_channels, grad_pooled=None):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


@torch.library.register_fake("dfs_kernels::partitioned_conv2d_with_exit_pool")
def _stage_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    output = torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)
    return output, input.mean(dim=(2, 3))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, shared_channels = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels
    ctx.bias_sizes = None if bias is None else list(bias.shape)


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


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    grad_input = None
    # With no shared channel the input gradient is identically zero: return none at all.
    if ctx.needs_input_grad[0] and ctx.shared_channels > 0:
        grad_input = torch.ops.dfs_kernels.partitioned_conv2d_input_grad(
            grad_output, input, weight, *ctx.conv_args, ctx.shared_channels
        )
    return grad_input, *_weight_and_bias_grads(ctx, grad_output, input, weight), None, None, None, None, None


def _stage_setup_context(ctx, inputs, output) -> None:
    _setup_context(ctx, inputs, output)
    ctx.set_materialize_grads(False)  # an unused output sends None: its gradient is neither read nor made


def _stage_backward(ctx, grad_output, grad_pooled):
    input, weight = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        if grad_output is not None:
            grad_input = torch.ops.dfs_kernels.partitioned_conv2d_input_grad(
                grad_output, input, weight, *ctx.conv_args, ctx.shared_channels, grad_pooled
            )
        elif grad_pooled is not None:
            grad_input = torch.ops.dfs_kernels.exit_avg_pool_backward(
                grad_pooled, list(input.shape), ctx.shared_channels,
                suggest_memory_format(input) == torch.channels_last,
            )
    return grad_input, *_weight_and_bias_grads(ctx, grad_output, input, weight), None, None, None, None, None


torch.library.register_autograd("dfs_kernels::partitioned_conv2d", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "dfs_kernels::partitioned_conv2d_with_exit_pool", _stage_backward, setup_context=_stage_setup_context
)


def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    """Validated arguments from ``dfs_kernels.functional`` (padding already numeric)."""
    return torch.ops.dfs_kernels.partitioned_conv2d(
        input, weight, bias, stride, padding, dilation, groups, shared_channels
    )


def partitioned_conv2d_with_exit_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    """(partitioned_conv2d(...), exit_avg_pool(input, shared_channels)) with one backward tensor."""
    return torch.ops.dfs_kernels.partitioned_conv2d_with_exit_pool(
        input, weight, bias, stride, padding, dilation, groups, shared_channels
    )
