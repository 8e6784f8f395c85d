"""What every training strategy shares, and the joint strategies (DSN, DFS, BYOT).

A strategy is the part of a training step between the batch and ``optimizer.step()``:
``strategy.backward(model, images, labels, scaler=None)`` runs the forward, computes the per-exit
losses and leaves the parameters' ``.grad`` populated (accumulated, like ``loss.backward()``; the
trainer zeroes them). The trainer owns everything else: ``model.train()``, ``torch.autocast``
around the call, ``optimizer.zero_grad()``, ``scaler.step(optimizer)`` / ``scaler.update()``.

AMP: with a ``torch.amp.GradScaler`` the gradients written are those of the *scaled* losses, as
``scaler.scale(loss).backward()`` would leave them; ``scaler.step`` unscales them and skips steps
with non-finite gradients.

DDP: a model wrapped in ``DistributedDataParallel`` is accepted. Joint strategies run through the
wrapper and its usual gradient all-reduce; strategies that compute gradients with
``torch.autograd.grad`` (BDL, GD) call the wrapped module directly and average the gradients across
ranks themselves, so every rank ends the step with the same ``.grad`` as DDP would leave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..models._common import (ReferencePartitionedConv2d, ReferencePartitionedLinear, ReferenceSplit,
                              ReferenceTokenSplit)
from ..multi_exit import MultiExitModel
from ..nn import FeatureReroute, PartitionedConv2d, PartitionedLinear
from .losses import DeepSupervisionLoss, ExitLoss


@dataclass
class StepResult:
    """What a strategy's backward reports, all detached.

    loss: the summed training loss (unscaled), a scalar.
    exit_losses: each exit's term, shallow to deep.
    logits: each exit's [N, num_classes] logits, for accuracy bookkeeping.
    """

    loss: torch.Tensor
    exit_losses: list[torch.Tensor]
    logits: list[torch.Tensor]

    @classmethod
    def from_terms(cls, exit_losses: list[torch.Tensor], logits: list[torch.Tensor]) -> StepResult:
        detached = [term.detach() for term in exit_losses]
        return cls(torch.stack(detached).sum(), detached, [exit_logits.detach() for exit_logits in logits])


class Strategy:
    """Base of the strategies; ``loss`` gives the per-exit terms (``DeepSupervisionLoss`` by default)."""

    name = "strategy"

    def __init__(self, loss: ExitLoss | None = None) -> None:
        self.loss = loss if loss is not None else DeepSupervisionLoss()

    def backward(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *,
                 scaler: torch.amp.GradScaler | None = None) -> StepResult:
        """Forward ``images`` [N, C, H, W], per-exit losses against ``labels`` [N], gradients into ``.grad``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """What a resumed run needs to continue exactly (random state); empty for stateless strategies."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()``'s output."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(loss={type(self.loss).__name__})"


def scaled(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """``loss`` multiplied by the scaler's current scale (unchanged without an enabled scaler)."""
    return scaler.scale(loss) if scaler is not None and scaler.is_enabled() else loss


def _wrapped(model: nn.Module) -> nn.Module | None:
    """The module inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper (None: not a wrapper)."""
    if isinstance(model, DistributedDataParallel):
        return model.module
    return getattr(model, "_orig_mod", None)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside any ``DistributedDataParallel`` / ``torch.compile`` wrappers (the model itself
    otherwise)."""
    while (inner := _wrapped(model)) is not None:
        model = inner
    return model


def data_parallel(model: nn.Module) -> DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper among ``model``'s wrappers, if any."""
    while model is not None and not isinstance(model, DistributedDataParallel):
        model = _wrapped(model)
    return model


def accumulate_grad(parameter: torch.Tensor, gradient: torch.Tensor | None) -> None:
    """Adds ``gradient`` to ``parameter.grad`` the way autograd's accumulation does (None: nothing)."""
    if gradient is None:
        return
    if parameter.grad is None:
        parameter.grad = gradient.detach().clone()
    else:
        parameter.grad.add_(gradient)


def average_across_ranks(model: nn.Module, tensors: Iterable[torch.Tensor]) -> None:
    """In place, the mean of each tensor over the ranks of ``model``'s DDP process group; nothing when
    ``model`` is not wrapped in ``DistributedDataParallel``. The tensors travel in one flat buffer (one
    collective per call, at the price of one temporary copy)."""
    wrapper = data_parallel(model)
    tensors = list(tensors)
    if wrapper is None or not tensors:
        return
    group = wrapper.process_group
    flat = torch.cat([tensor.reshape(-1) for tensor in tensors])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for tensor, averaged in zip(tensors, flat.split([tensor.numel() for tensor in tensors])):
        tensor.copy_(averaged.view_as(tensor))


class JointTraining(Strategy):
    """DSN / joint training: one backward of the sum of the exit terms, through the model as given
    (a DDP wrapper included). With ``SelfDistillationLoss`` this is BYOT."""

    name = "dsn"

    def backward(self, model, images, labels, *, scaler=None):
        logits, features = model(images, return_features=True)
        exit_losses = self.loss(logits, features, labels)
        scaled(torch.stack(exit_losses).sum(), scaler).backward()
        return StepResult.from_terms(exit_losses, logits)


DFS_LAYERS = (PartitionedConv2d, ReferencePartitionedConv2d, FeatureReroute, ReferenceSplit, PartitionedLinear,
              ReferencePartitionedLinear, ReferenceTokenSplit)
"""The layers that put DFS split points into a model (any flavour but "dsn" has at least one)."""


def has_dfs_split(model: nn.Module) -> bool:
    """Whether ``model`` contains a DFS split point, i.e. was built with a DFS flavour. A ``MultiExitModel``
    splits in its exit hooks (its "dfs_eager" flavour holds no DFS layer), so its flavour tells."""
    if isinstance(model, MultiExitModel):
        return model.flavour != "dsn"
    return any(isinstance(module, DFS_LAYERS) for module in model.modules())


class DeepFeatureSurgery(JointTraining):
    """DFS: the joint loss on a model built with ``flavour="dfs"`` or ``"dfs_eager"``; the stop-gradients
    live in the model, so the step is DSN's. Refuses a model without split points, which would
    silently train DSN."""

    name = "dfs"

    def backward(self, model, images, labels, *, scaler=None):
        if not has_dfs_split(unwrap(model)):
            raise ValueError("the dfs strategy needs a model built with flavour='dfs' or 'dfs_eager' (multi_exit's "
                             "flavour too)")
        return super().backward(model, images, labels, scaler=scaler)
