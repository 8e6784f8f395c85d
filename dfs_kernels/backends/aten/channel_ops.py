"""Fake implementations of the compiled channel-assembly ops (csrc/cpu, csrc/cuda), so that
``torch.compile`` and ``opcheck`` can reason about their outputs without running them."""

from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


def _empty_feature_map(like: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = like.shape
    return like.new_empty((n, channels, h, w)).contiguous(memory_format=suggest_memory_format(like))


@torch.library.register_fake("dfs_kernels::pad_channels")
def _pad_channels_fake(parts: list[torch.Tensor], channels: int) -> torch.Tensor:
    torch._check(sum(part.shape[1] for part in parts) <= channels)
    return _empty_feature_map(parts[0], channels)


@torch.library.register_fake("dfs_kernels::merge_channels")
def _merge_channels_fake(head: torch.Tensor | None, tail: torch.Tensor | None, split: int) -> torch.Tensor:
    like = head if head is not None else tail
    torch._check(like is not None, lambda: "merge_channels: at least one of head and tail must be given")
    return _empty_feature_map(like, like.shape[1])


@torch.library.register_fake("dfs_kernels::exit_avg_pool_backward")
def _exit_avg_pool_backward_fake(
    grad_pooled: torch.Tensor, input_size: list[int], shared_channels: int, channels_last: bool
) -> torch.Tensor:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return grad_pooled.new_empty(input_size).contiguous(memory_format=memory_format)
