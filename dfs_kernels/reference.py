"""The literal eager formulation of Deep Feature Surgery: the oracle every backend is tested against.

Each function is written the way the original research code does it (split, detach, separate
convolutions, add, cat), trading speed for being obviously right. Notation (docs/semantics.md):
``x+ = x[:, :Cp]`` are the shared channels, ``x- = x[:, Cp:]`` the referenced ones, ``sg`` is
``detach``. The split-point functions take the channel axis ``dim``: 1 for feature maps
[N, C, H, W], -1 for tokens [N, T, D] (the shared channels are then the first Cp features of D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def partition(x: torch.Tensor, shared_channels: int, dim: int = 1) -> torch.Tensor:
    """``[x+, sg(x-)]`` along ``dim``: what the next backbone layer consumes. Same shape as x."""
    shared, referenced = x.split([shared_channels, x.shape[dim] - shared_channels], dim=dim)
    return torch.cat([shared, referenced.detach()], dim=dim)


def exit_reference(x: torch.Tensor, shared_channels: int, dim: int = 1) -> torch.Tensor:
    """``[sg(x+), x-]`` along ``dim``: what an exit consumes. Same shape as x."""
    shared, referenced = x.split([shared_channels, x.shape[dim] - shared_channels], dim=dim)
    return torch.cat([shared.detach(), referenced], dim=dim)


def reroute(x: torch.Tensor, shared_channels: int, dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone view ``[x+, sg(x-)]`` and the exit view ``[sg(x+), x-]`` of one split point."""
    return partition(x, shared_channels, dim), exit_reference(x, shared_channels, dim)


def partitioned_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    shared_channels: int,
) -> torch.Tensor:
    """``conv(x+, W+) + conv(sg(x-), W-) + b`` with W split along its input channels.

    input [N, C_in, H, W], weight [C_out, C_in / groups, kH, kW], bias [C_out] -> [N, C_out, H_out, W_out].
    With groups > 1 a split of W along input channels cuts through groups, so the grouped case
    convolves ``[x+, sg(x-)]`` as one tensor, the same function by linearity.
    """
    cp, channels = shared_channels, input.shape[1]
    conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if cp == channels:
        return F.conv2d(input, weight, bias, **conv)
    if cp == 0:  # every channel referenced; x stays in the graph, with a zero gradient
        return F.conv2d(partition(input, 0), weight, bias, **conv)
    if groups != 1:
        return F.conv2d(partition(input, cp), weight, bias, **conv)
    shared = F.conv2d(input[:, :cp], weight[:, :cp], bias, **conv)
    referenced = F.conv2d(input[:, cp:].detach(), weight[:, cp:], None, **conv)
    return shared + referenced


def exit_avg_pool(x: torch.Tensor, shared_channels: int, dim: int = 1) -> torch.Tensor:
    """Global average pool of the exit view over every axis but the batch (0) and the channels
    (``dim``): [N, C, H, W] -> [N, C] with dim=1, [N, T, D] -> [N, D] with dim=-1."""
    channel_axis = dim % x.dim()
    pooled_axes = [axis for axis in range(1, x.dim()) if axis != channel_axis]
    view = exit_reference(x, shared_channels, dim)
    return view.mean(dim=pooled_axes) if pooled_axes else view  # mean(dim=[]) would reduce every axis


def partitioned_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shared_features: int
) -> torch.Tensor:
    """``linear([x+, sg(x-)], weight, bias)`` with the split on the last axis (the input features).
    input [..., in_features], weight [out_features, in_features], bias [out_features] -> [..., out_features]."""
    return F.linear(partition(input, shared_features, dim=-1), weight, bias)


def exit_head(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shared_channels: int
) -> torch.Tensor:
    """``fc(pool([sg(x+), x-]))``, the VGG exit. x [N, C, H, W], weight [K, C], bias [K] -> [N, K]."""
    return F.linear(exit_avg_pool(x, shared_channels), weight, bias)


def partitioned_conv2d_with_exit_pool(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    shared_channels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A DFS stage: x feeds the backbone's partitioned convolution ``conv([x+, sg(x-)])`` and an
    exit's pooled read ``mean([sg(x+), x-])``, with the same Cp.
    input [N, C_in, H, W] -> (conv [N, C_out, H_out, W_out], pooled [N, C_in])."""
    conv = partitioned_conv2d(
        input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
    )
    return conv, exit_avg_pool(input, shared_channels)
