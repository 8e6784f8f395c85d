"""``dfs_kernels::exit_avg_pool``: the global average pool of an exit that references
``[sg(x+), x-]``. Forward is a plain mean over H and W; backward broadcasts ``grad / (H * W)`` into
the referenced channels only, zeros into the shared ones, in one pass
(``dfs_kernels::exit_avg_pool_backward``)."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


@torch.library.register_fake("dfs_kernels::exit_avg_pool")
def _exit_avg_pool_fake(input, shared_channels):
    return input.mean(dim=(2, 3))


def _setup_context(ctx, inputs, output) -> None:
    input, shared_channels = inputs
    ctx.input_size = list(input.shape)
    ctx.channels_last = suggest_memory_format(input) == torch.channels_last
    ctx.shared_channels = shared_channels


def _backward(ctx, grad_pooled):
    grad_input = torch.ops.dfs_kernels.exit_avg_pool_backward(
        grad_pooled, ctx.input_size, ctx.shared_channels, ctx.channels_last
    )
    return grad_input, None


torch.library.register_autograd("dfs_kernels::exit_avg_pool", _backward, setup_context=_setup_context)


def exit_avg_pool(x: torch.Tensor, shared_channels: int) -> torch.Tensor:
    return torch.ops.dfs_kernels.exit_avg_pool(x, shared_channels)
