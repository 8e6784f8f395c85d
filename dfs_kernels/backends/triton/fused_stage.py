"""The fused DFS stage: one feature map x feeding both a partitioned convolution (the backbone reads
``[x+, sg(x-)]``) and a pooled exit (which reads ``[sg(x+), x-]``), as at every VGG split point.

Forward: the convolution and the exit's pooled features from one read of x. When a tap of the
convolution reads x[n, c, oh, ow] at every output pixel (stride 1, output of the input's size: every
3x3 / padding 1 convolution), the forward kernel adds that tap's tiles to the pooled sums; otherwise
the pool runs as its own kernel.

Backward: dL/dx+ comes only from the convolution and dL/dx- only from the exit (docs/semantics.md), so
the input-gradient kernel writes the convolution's gradient into [0, Cp) and the exit's broadcast
gradient into [Cp, C) of one tensor: no zero-fill, no add of two full-size gradients.

Registered as ``dfs_kernels::triton_partitioned_conv2d_with_exit_pool``, with the schema, fake and
autograd formula of every backend's stage (``dfs_kernels.ops.partitioned_conv2d``), whose backward
calls ``triton_partitioned_conv2d_input_grad`` with the exit's gradient.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from . import _common
from .conv_forward import conv2d_forward, pool_tap
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv2d(input, weight, bias) [N, C_out, H_out, W_out], mean(input, dim=(2, 3)) [N, C_in])."""
    allow_tf32 = _common.allow_tf32()
    if pool_tap(input.shape, weight.shape, stride, padding, dilation) is None:
        out, _ = conv2d_forward(input, weight, bias, stride, padding, dilation, groups, allow_tf32)
        return out, exit_pool_forward(input)
    out, sums = conv2d_forward(input, weight, bias, stride, padding, dilation, groups, allow_tf32, pool=True)
    h, w = input.shape[2], input.shape[3]
    return out, (sums * (1.0 / (h * w))).to(input.dtype)
