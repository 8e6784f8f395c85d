"""The channel-assembly family, for the prefixes "" (aten and cudnn) and "triton_", and the split-point
views built on it:

- ``{prefix}merge_channels(head, tail, split)``: channels [0, split) of ``head`` and [split, C) of
  ``tail``, a missing one read as zeros, in one pass: the gradient of a split point.
- ``pad_channels(parts, channels)`` (aten only): ``cat(parts, 1)`` zero-filled to ``channels``
  channels, in one pass; the compiled input gradient uses it.
- ``reroute`` / ``exit_reference``: the backbone view ``[x+, sg(x-)]`` and the exit view ``[sg(x+), x-]``
  of x, both views (no copy), whose gradients are assembled by ``merge_channels``. Two forms compute
  the same: the compiled ops ``dfs_kernels::reroute`` / ``exit_reference`` (aten, eager; their autograd
  is C++, csrc/autograd/split_point_autograd.cpp), and the Python autograd Functions ``Reroute`` /
  ``ExitReference`` below (Triton, and code that torch.compile traces, which cannot functionalize a
  custom op returning views of its input). The channels are on any axis ``dim``: the gradients are read as [A, C, B, 1] (``as_feature_map``), which
  for tokens [N, T, D] on dim -1 is the view [N * T, D, 1, 1], so the same one-pass kernels serve them.
"""

from __future__ import annotations

import math

import torch
from torch._prims_common import suggest_memory_format

from . import _composite


def _empty_feature_map(like: torch.Tensor, channels: int) -> torch.Tensor:
    n, _, h, w = like.shape
    return like.new_empty((n, channels, h, w)).contiguous(memory_format=suggest_memory_format(like))


def _merge_fake(head, tail, split):
    like = head if head is not None else tail
    torch._check(like is not None, lambda: "merge_channels: at least one of head and tail must be given")
    return _empty_feature_map(like, like.shape[1])


def _merge_setup_context(ctx, inputs, output) -> None:
    head, tail, ctx.split = inputs


def _merge_backward(ctx, grad):
    grad_head = _composite.merge_channels(grad, None, ctx.split) if ctx.needs_input_grad[0] else None
    grad_tail = _composite.merge_channels(None, grad, ctx.split) if ctx.needs_input_grad[1] else None
    return grad_head, grad_tail, None


def _pad_fake(parts, channels):
    torch._check(sum(part.shape[1] for part in parts) <= channels)
    return _empty_feature_map(parts[0], channels)


def _pad_setup_context(ctx, inputs, output) -> None:
    parts, _ = inputs
    ctx.part_channels = [part.shape[1] for part in parts]


def _pad_backward(ctx, grad):
    offsets = [0]
    for channels in ctx.part_channels:
        offsets.append(offsets[-1] + channels)
    return [grad[:, start:stop] for start, stop in zip(offsets, offsets[1:])], None


def _reroute_fake(x, shared_channels, dim):
    return x.view_as(x), x.view_as(x)


def _exit_reference_fake(x, shared_channels, dim):
    return x.view_as(x)


def register(prefix: str) -> None:
    """Fakes and autograd of ``dfs_kernels::{prefix}merge_channels`` (and, for aten, of ``pad_channels``
    and the fakes of the compiled split points, whose autograd is C++)."""
    merge = f"dfs_kernels::{prefix}merge_channels"
    torch.library.register_fake(merge, _merge_fake)
    torch.library.register_autograd(merge, _merge_backward, setup_context=_merge_setup_context)
    if prefix == "":
        torch.library.register_fake("dfs_kernels::pad_channels", _pad_fake)
        torch.library.register_autograd("dfs_kernels::pad_channels", _pad_backward, setup_context=_pad_setup_context)
        torch.library.register_fake("dfs_kernels::reroute", _reroute_fake)
        torch.library.register_fake("dfs_kernels::exit_reference", _exit_reference_fake)


def as_feature_map(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor`` with channels on axis ``dim`` (non-negative) as [A, C, B, 1], A the product of the
    axes before ``dim``, B of those after: the identity for a feature map [N, C, H, W] on dim 1, else
    a view whenever the strides allow (every contiguous tensor), a copy otherwise."""
    if dim == 1 and tensor.dim() == 4:
        return tensor
    shape = tensor.shape
    return tensor.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]), 1)


def _merge_on_axis(glue_prefix, head, tail, split, dim, shape):
    head = None if head is None else as_feature_map(head, dim)
    tail = None if tail is None else as_feature_map(tail, dim)
    merged = merge_gradients(glue_prefix, head, tail, split)
    return None if merged is None else merged.reshape(shape)


def merge_gradients(glue_prefix: str, head: torch.Tensor | None, tail: torch.Tensor | None,
                    split: int) -> torch.Tensor | None:
    """The gradient of x at a split point from the gradients of its two views (None: view unused)."""
    present = head if head is not None else tail
    if present is None:
        return None
    if torch.is_grad_enabled():  # create_graph: a backward that can itself be differentiated
        return _composite.merge_channels(head, tail, split)
    if split == 0 and tail is not None:  # every channel comes from tail
        return tail
    if split == present.shape[1] and head is not None:
        return head
    return getattr(torch.ops.dfs_kernels, f"{glue_prefix}merge_channels")(head, tail, split)


class Reroute(torch.autograd.Function):
    """``(x, x)`` as views; the gradient of x is the first view's on [0, Cp) of axis ``dim`` and the
    second's on [Cp, C)."""

    @staticmethod
    def forward(x: torch.Tensor, shared_channels: int, dim: int, glue_prefix: str):
        return x.view_as(x), x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.shared_channels, ctx.dim, ctx.glue_prefix = inputs
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)  # an unused view sends None: nothing to read, nothing to zero

    @staticmethod
    def backward(ctx, grad_backbone, grad_exit):
        grad = _merge_on_axis(ctx.glue_prefix, grad_backbone, grad_exit, ctx.shared_channels, ctx.dim, ctx.shape)
        return grad, None, None, None


class ExitReference(torch.autograd.Function):
    """``x`` as a view whose gradient reaches channels [Cp, C) of axis ``dim`` only."""

    @staticmethod
    def forward(x: torch.Tensor, shared_channels: int, dim: int, glue_prefix: str):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.shared_channels, ctx.dim, ctx.glue_prefix = inputs
        ctx.shape = x.shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_exit):
        grad = _merge_on_axis(ctx.glue_prefix, None, grad_exit, ctx.shared_channels, ctx.dim, ctx.shape)
        return grad, None, None, None
