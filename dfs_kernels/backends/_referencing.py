"""Feature referencing as views of x (no copy) with a one-pass gradient assembly, shared by the
backends: ``reroute`` (a split point's backbone view ``[x+, sg(x-)]`` and exit view ``[sg(x+), x-]``)
and ``exit_reference`` (the exit view alone), DESIGN.md §1. Each backend supplies the op that
assembles channels [0, Cp) of one gradient and [Cp, C) of another (``merge_channels``).

They are autograd Functions because a registered op may not return aliases of its input; their
backward is the backend's registered op, which ``torch.compile`` traces.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

MergeChannels = Callable[[torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]


def referencing_ops(merge_channels: MergeChannels) -> types.SimpleNamespace:
    """``reroute(x, Cp)`` and ``exit_reference(x, Cp)`` whose backward assembles with ``merge_channels``."""

    def merge(head: torch.Tensor | None, tail: torch.Tensor | None, split: int) -> torch.Tensor | None:
        present = head if head is not None else tail
        if present is None:
            return None
        channels = present.shape[1]
        if split == 0:  # every channel comes from tail: nothing to assemble
            return tail
        if split == channels:
            return head
        return merge_channels(head, tail, split)

    class Reroute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, shared_channels: int):
            ctx.shared_channels = shared_channels
            ctx.set_materialize_grads(False)  # an unused view sends None: nothing to read, nothing to zero
            return x.view_as(x), x.view_as(x)

        @staticmethod
        def backward(ctx, grad_backbone, grad_exit):
            return merge(grad_backbone, grad_exit, ctx.shared_channels), None

    class ExitReference(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x: torch.Tensor, shared_channels: int):
            ctx.shared_channels = shared_channels
            ctx.set_materialize_grads(False)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad_exit):
            return merge(None, grad_exit, ctx.shared_channels), None

    def reroute(x: torch.Tensor, shared_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        return Reroute.apply(x, shared_channels)

    def exit_reference(x: torch.Tensor, shared_channels: int) -> torch.Tensor:
        return ExitReference.apply(x, shared_channels)

    return types.SimpleNamespace(reroute=reroute, exit_reference=exit_reference)
