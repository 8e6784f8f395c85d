"""The exit-pooling family, for the prefixes "" (aten and cudnn) and "triton_":

- ``{prefix}exit_avg_pool(input, shared_channels)``: ``mean([sg(x+), x-], dim=(2, 3))``, the pooled read
  of an exit. [N, C, H, W] -> [N, C].
- ``{prefix}exit_avg_pool_backward(grad_pooled, input_size, shared_channels, channels_last)``: its
  backward, ``grad_pooled / (H * W)`` spread into channels [Cp, C) and zeros into [0, Cp), every element
  written once, in the input's layout.

Channels on another axis than 1 (tokens [N, T, D] on dim -1) are pooled through the view
``pooled_feature_map``, [N, D, T, 1] for contiguous tokens, in the NHWC layout the kernels read.

A recorded backward (``create_graph=True``) and the backward of ``exit_avg_pool_backward`` itself use
the differentiable formulas of ``_composite``.
"""

from __future__ import annotations

import functools
import math

import torch
from torch._prims_common import suggest_memory_format

from .. import _library
from . import _composite


def pooled_feature_map(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` with channels on axis ``dim`` (non-negative, not 0) as [N, C, S, 1], S the product of the
    other axes: what ``exit_avg_pool`` reduces. The identity for a feature map on dim 1, else a view
    whenever the strides allow (every contiguous tensor), a copy otherwise."""
    if dim == 1 and x.dim() == 4:
        return x
    moved = x.movedim(dim, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], math.prod(moved.shape[2:]), 1)


def _pool_fake(input, shared_channels):
    return input.new_empty((input.shape[0], input.shape[1]))


def _pool_backward_fake(grad_pooled, input_size, shared_channels, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return grad_pooled.new_empty(input_size).contiguous(memory_format=memory_format)


def _pool_setup_context(ctx, inputs, output) -> None:
    input, shared_channels = inputs
    ctx.input_size = list(input.shape)
    ctx.channels_last = suggest_memory_format(input) == torch.channels_last
    ctx.shared_channels = shared_channels


def _pool_backward(prefix, ctx, grad_pooled):
    if torch.is_grad_enabled():
        return _composite.exit_avg_pool_backward(grad_pooled, ctx.input_size, ctx.shared_channels), None
    backward = getattr(torch.ops.dfs_kernels, f"{prefix}exit_avg_pool_backward")
    return backward(grad_pooled, ctx.input_size, ctx.shared_channels, ctx.channels_last), None


def _pool_backward_setup_context(ctx, inputs, output) -> None:
    ctx.shared_channels = inputs[2]


def _pool_backward_backward(ctx, grad):
    return _composite.referenced_mean(grad, ctx.shared_channels), None, None, None


def register(prefix: str) -> None:
    """Fakes and autograd of ``dfs_kernels::{prefix}exit_avg_pool`` and its backward op."""
    pool, backward = f"dfs_kernels::{prefix}exit_avg_pool", f"dfs_kernels::{prefix}exit_avg_pool_backward"
    torch.library.register_fake(pool, _pool_fake)
    torch.library.register_fake(backward, _pool_backward_fake)
    if not _library.has_autograd_kernel(pool):  # "aten": C++ (csrc/autograd/split_point_autograd.cpp)
        torch.library.register_autograd(pool, functools.partial(_pool_backward, prefix),
                                        setup_context=_pool_setup_context)
    torch.library.register_autograd(backward, _pool_backward_backward, setup_context=_pool_backward_setup_context)
