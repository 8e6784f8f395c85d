"""Block-dependent losses (BDL; Han et al., TNNLS 2023).

Exit k sits after block k (blocks and exits numbered 1..L). Exit k's loss updates its own head and
blocks start(k)..k only, where

    start(k) = max(k - window + 1, first block of k's group)      (window None: no overlap limit)
    start(L) = 1 when include_final

Forward values are those of the model's own forward.

Method (exact, one forward). The forward runs block by block; each block's output is detached into a
fresh leaf ``h_k`` that the next block and exit k read, so each block keeps its own small graph. The
backward then walks the blocks from deep to shallow by hand, carrying *gradient streams*: the
gradient with respect to ``h_k`` of the exits that share one window start. Exit k's head gradient
joins stream start(k); at block k every stream contributes to the block's parameter gradient (one
weight-gradient VJP of the summed streams), and each stream that starts before block k is carried
to ``h_{k-1}`` by its own input-gradient VJP; the stream starting at block k stops there. Exits with
the same start share a stream, since their gradients stop at the same place.

Cost: one forward; per block one weight-gradient VJP plus one input-gradient VJP per stream passing
through it, i.e. at most ``window - 1`` (all exits of a group share one stream: pure grouping costs
one ordinary backward; ``include_final`` adds one stream that runs to block 1). Memory: each block's
graph exists once and is freed by its last VJP, as in an ordinary backward; on top of it, one
gradient tensor of a block output's size per live stream.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.blockwise import Blockwise, State, blockwise_view
from ..multi_exit import MultiExitModel
from .losses import ExitLoss
from .strategies import StepResult, Strategy, accumulate_grad, average_across_ranks, scaled, unwrap

# The block cut lives in dfs_kernels.models.blockwise; Blockwise and blockwise_view stay importable from here.
__all__ = ["BlockDependentLosses", "Blockwise", "State", "blockwise_view", "window_starts"]


MULTI_EXIT_REFUSAL = (
    "the bdl strategy cannot train a MultiExitModel: block-dependent losses run the network one block at a time "
    "(blockwise_view), and a MultiExitModel runs the user's forward whole, with its exits hooked in, so there is "
    "no block to run alone; train it with dsn, dfs, byot or gd")


def window_starts(num_exits: int, window: int | None, group_boundaries: Sequence[int],
                  include_final: bool) -> list[int]:
    """start(k) of every exit, 0-based: exit k's loss updates blocks start(k)..k.
    ``group_boundaries`` are 1-based block numbers after which gradients stop (groups {1-3},{4-7}: (3,))."""
    starts = []
    for k in range(num_exits):
        start = 0 if window is None else max(0, k - window + 1)
        start = max([start] + [boundary for boundary in group_boundaries if boundary <= k])
        starts.append(start)
    if include_final:
        starts[-1] = 0
    return starts


def _zeros_for_none(gradients: Sequence[torch.Tensor | None], like: State) -> State:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(gradients, like))


def _add(stream: State | None, gradient: State) -> State:
    return gradient if stream is None else tuple(a + b for a, b in zip(stream, gradient))


class BlockDependentLosses(Strategy):
    """BDL strategy (see the module docstring for the method and its cost).

    Args:
        window: W, the number of blocks exit k updates (k-W+1..k); 1 is the "local error" baseline;
            None: no limit (use with ``group_boundaries``).
        group_boundaries: 1-based block numbers after which gradients stop, e.g. (3,) for groups
            {1-3},{4-7}; combined with ``window`` the tighter limit applies.
        include_final: the final exit updates every block.
        loss: per-exit terms (``DeepSupervisionLoss`` by default; ``SelfDistillationLoss`` adds BYOT's
            distillation: its teacher, logits and feature, is detached, so every term stays inside exit
            k's window; the feature term applies to the models with distillation features, ResNet-18).
    """

    name = "bdl"

    def __init__(self, window: int | None = 3, *, group_boundaries: Sequence[int] = (), include_final: bool = False,
                 loss: ExitLoss | None = None) -> None:
        super().__init__(loss)
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of blocks or None, got {window}")
        if window is None and not group_boundaries and not include_final:
            raise ValueError("with window=None and no group boundaries every exit updates every block: use dsn")
        self.window, self.group_boundaries, self.include_final = window, tuple(group_boundaries), include_final

    def starts(self, num_exits: int) -> list[int]:
        """0-based window start of every exit of an ``num_exits``-exit model."""
        bad = [b for b in self.group_boundaries if not 1 <= b < num_exits]
        if bad:
            raise ValueError(f"group boundaries must lie in 1..{num_exits - 1}, got {bad}")
        return window_starts(num_exits, self.window, self.group_boundaries, self.include_final)

    def backward(self, model, images, labels, *, scaler=None):
        network = unwrap(model)
        if isinstance(network, MultiExitModel):
            raise TypeError(MULTI_EXIT_REFUSAL)
        view = blockwise_view(network)
        starts = self.starts(len(view.blocks))

        # Forward, one small graph per block: outputs[k] hangs off boundaries[k-1] (the images for k=0).
        boundaries, outputs = [], []
        state: State = (images,)
        for block in view.blocks:
            output = block(state)
            state = tuple(tensor.detach().requires_grad_() for tensor in output)
            outputs.append(output)
            boundaries.append(state)
        if view.feature_heads is None:
            logits, features = [head(boundary) for head, boundary in zip(view.heads, boundaries)], None
        else:
            pairs = [head(boundary) for head, boundary in zip(view.feature_heads, boundaries)]
            logits, features = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
        exit_losses = self.loss(logits, features, labels)

        streams: dict[int, State] = {}  # window start -> d(losses of the exits with that start)/d boundaries[k]
        for k in reversed(range(len(view.blocks))):
            head_parameters = view.head_parameters[k]
            gradients = torch.autograd.grad(scaled(exit_losses[k], scaler), [*boundaries[k], *head_parameters],
                                            allow_unused=True)
            for parameter, gradient in zip(head_parameters, gradients[len(boundaries[k]):]):
                accumulate_grad(parameter, gradient)
            head_gradient = _zeros_for_none(gradients[: len(boundaries[k])], boundaries[k])
            streams[starts[k]] = _add(streams.get(starts[k]), head_gradient)

            # Every live stream has start <= k, so all of them train block k.
            continuing = {start: stream for start, stream in streams.items() if start < k}
            total = None
            for stream in streams.values():
                total = _add(total, stream)
            parameters = view.block_parameters[k]
            weight_gradients = torch.autograd.grad(outputs[k], parameters, grad_outputs=total,
                                                   retain_graph=bool(continuing), allow_unused=True)
            for parameter, gradient in zip(parameters, weight_gradients):
                accumulate_grad(parameter, gradient)
            for index, (start, stream) in enumerate(continuing.items()):
                carried = torch.autograd.grad(outputs[k], boundaries[k - 1], grad_outputs=stream,
                                              retain_graph=index < len(continuing) - 1, allow_unused=True)
                continuing[start] = _zeros_for_none(carried, boundaries[k - 1])
            streams = continuing
            outputs[k] = None  # the block's graph is freed; drop the reference to its output too

        average_across_ranks(model, [p.grad for p in network.parameters() if p.grad is not None])
        return StepResult.from_terms(exit_losses, logits)
