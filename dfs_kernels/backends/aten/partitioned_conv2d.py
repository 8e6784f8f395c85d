"""``dfs_kernels::partitioned_conv2d`` on ATen: forward is one convolution over every input channel
(oneDNN / cuDNN); backward computes the weight and bias gradients in full and the input gradient of
the shared channels only (``dfs_kernels::partitioned_conv2d_input_grad``), never that of the
referenced channels."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


@torch.library.register_fake("dfs_kernels::partitioned_conv2d")
def _partitioned_conv2d_fake(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    return torch.ops.aten.convolution(input, weight, bias, stride, padding, dilation, False, [0, 0], groups)


@torch.library.register_fake("dfs_kernels::partitioned_conv2d_input_grad")
def _input_grad_fake(grad_output, input, weight, stride, padding, dilation, groups, shared_channels):
    return torch.empty_like(input, memory_format=suggest_memory_format(input))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, shared_channels = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels
    ctx.bias_sizes = None if bias is None else list(bias.shape)


def _backward(ctx, grad_output):
    input, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv_args
    needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    needs_bias = needs_bias and ctx.bias_sizes is not None
    grad_input = grad_weight = grad_bias = None
    # With no shared channel the input gradient is identically zero: return none at all.
    if needs_input and ctx.shared_channels > 0:
        grad_input = torch.ops.dfs_kernels.partitioned_conv2d_input_grad(
            grad_output, input, weight, stride, padding, dilation, groups, ctx.shared_channels
        )
    if needs_weight or needs_bias:
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, input, weight, ctx.bias_sizes, stride, padding, dilation,
            False, [0, 0], groups, [False, needs_weight, needs_bias],
        )
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


torch.library.register_autograd("dfs_kernels::partitioned_conv2d", _backward, setup_context=_setup_context)


def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    """Validated arguments from ``dfs_kernels.functional`` (padding already numeric)."""
    return torch.ops.dfs_kernels.partitioned_conv2d(
        input, weight, bias, stride, padding, dilation, groups, shared_channels
    )
