"""The fused DFS stage: one feature map x feeding both a partitioned convolution (the backbone reads
``[x+, sg(x-)]``) and a pooled exit (which reads ``[sg(x+), x-]``), as at every VGG split point.

Forward: the convolution and the exit's pooled features from one read of x. When a tap of the
convolution reads x[n, c, oh, ow] at every output pixel (stride 1, output of the input's size: every
3x3 / padding 1 convolution), the forward kernel adds that tap's tiles to the pooled sums; otherwise
the pool runs as its own kernel.

Backward: dL/dx+ comes only from the convolution and dL/dx- only from the exit (DESIGN.md §1), so
the input-gradient kernel writes the convolution's gradient into [0, Cp) and the exit's broadcast
gradient into [Cp, C) of one tensor: no zero-fill, no add of two full-size gradients.

Registered as ``dfs_kernels::triton_partitioned_conv2d_with_exit_pool``.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from . import _common
from .conv_forward import conv2d_forward, conv_backward, output_shape, pool_tap
from .exit_pool import exit_pool_forward


@triton_op("dfs_kernels::triton_partitioned_conv2d_with_exit_pool", mutates_args={})
def triton_partitioned_conv2d_with_exit_pool(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shared_channels: int,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv2d(input, weight, bias) [N, C_out, H_out, W_out], mean(input, dim=(2, 3)) [N, C_in])."""
    if pool_tap(input.shape, weight.shape, stride, padding, dilation) is None:
        out, _ = conv2d_forward(input, weight, bias, stride, padding, dilation, groups, allow_tf32)
        return out, exit_pool_forward(input)
    out, sums = conv2d_forward(input, weight, bias, stride, padding, dilation, groups, allow_tf32, pool=True)
    h, w = input.shape[2], input.shape[3]
    return out, (sums * (1.0 / (h * w))).to(input.dtype)


@triton_partitioned_conv2d_with_exit_pool.register_fake
def _fake(input, weight, bias, stride, padding, dilation, groups, shared_channels, allow_tf32):
    shape = output_shape(input.shape, weight.shape, stride, padding, dilation)
    out = _common.empty_feature_map(shape, like=input, channels_last=_common.is_channels_last(input))
    return out, input.new_empty((input.shape[0], input.shape[1]))


def _setup_context(ctx, inputs, output) -> None:
    input, weight, bias, stride, padding, dilation, groups, shared_channels, allow_tf32 = inputs
    ctx.save_for_backward(input, weight)
    ctx.conv_args = (stride, padding, dilation, groups)
    ctx.shared_channels = shared_channels
    ctx.allow_tf32 = allow_tf32
    ctx.has_bias = bias is not None
    ctx.set_materialize_grads(False)  # an unused output sends None: its part is zeros, never read


def _backward(ctx, grad_output, grad_pooled):
    input, weight = ctx.saved_tensors
    cp, channels = ctx.shared_channels, input.shape[1]
    if cp == channels:  # the exit reaches no channel
        grad_pooled = None
    if grad_output is not None:
        grads = conv_backward(ctx, input, weight, grad_output, grad_pooled)
    else:
        # Only the exit was used: its broadcast gradient alone (zeros on the shared channels).
        grad_input = None
        if ctx.needs_input_grad[0] and grad_pooled is not None:
            grad_input = torch.ops.dfs_kernels.triton_exit_avg_pool_backward(
                grad_pooled, list(input.shape), cp, _common.is_channels_last(input)
            )
        grads = (grad_input, None, None)
    return (*grads, None, None, None, None, None, None)


triton_partitioned_conv2d_with_exit_pool.register_autograd(_backward, setup_context=_setup_context)
