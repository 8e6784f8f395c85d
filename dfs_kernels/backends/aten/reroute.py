"""Feature referencing on ATen: ``reroute`` and ``exit_reference`` return views of ``x`` (no copy)
and assemble the gradient of ``x`` from its sources in one pass with ``dfs_kernels::merge_channels``.

They are autograd Functions rather than registered ops because a registered op may not return
aliases of its input; their backward is the registered op, so ``torch.compile`` traces both.
"""

from __future__ import annotations

import torch


def _merge(head: torch.Tensor | None, tail: torch.Tensor | None, split: int) -> torch.Tensor | None:
    if head is None and tail is None:
        return None
    channels = (head if head is not None else tail).shape[1]
    if split == 0 and tail is not None:  # every channel comes from tail: no assembly needed
        return tail
    if split == channels and head is not None:
        return head
    return torch.ops.dfs_kernels.merge_channels(head, tail, split)


class _Reroute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared_channels: int):
        ctx.shared_channels = shared_channels
        ctx.set_materialize_grads(False)  # an unused view sends None: nothing to read, nothing to zero
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def backward(ctx, grad_backbone, grad_exit):
        return _merge(grad_backbone, grad_exit, ctx.shared_channels), None


class _ExitReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shared_channels: int):
        ctx.shared_channels = shared_channels
        ctx.set_materialize_grads(False)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_exit):
        return _merge(None, grad_exit, ctx.shared_channels), None


def reroute(x: torch.Tensor, shared_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _Reroute.apply(x, shared_channels)


def exit_reference(x: torch.Tensor, shared_channels: int) -> torch.Tensor:
    return _ExitReference.apply(x, shared_channels)
