"""Argument checks shared by the functional API and the modules. Each error names the argument and
what was expected, so a wrong call is fixed from the message alone."""

from __future__ import annotations

import numbers

import torch


def shared_channels_for(channels: int, beta: float = 0.5, shared_channels: int | None = None,
                        name: str = "shared_channels") -> int:
    """Cp for a feature map of ``channels`` channels: ``shared_channels`` when given, else
    ``round(beta * channels)`` with Python's (banker's) rounding, as the original DFS code. ``name``
    is the argument's name in errors (``shared_features`` for a linear layer)."""
    if shared_channels is not None:
        check_shared_channels(shared_channels, channels, name)
        return shared_channels
    check_beta(beta)
    return round(beta * channels)


def check_beta(beta: object) -> None:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta must be a real number in [0, 1], got {beta!r} of type {type(beta).__name__}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


def check_shared_channels(shared_channels: object, channels: int, name: str = "shared_channels") -> None:
    if isinstance(shared_channels, bool) or not isinstance(shared_channels, numbers.Integral):
        raise TypeError(
            f"{name} must be an int in [0, {channels}], got {shared_channels!r} "
            f"of type {type(shared_channels).__name__}"
        )
    if not 0 <= shared_channels <= channels:
        raise ValueError(f"{name} must be in [0, {channels}] (the input's size on the partitioned axis), "
                         f"got {shared_channels}")


def check_feature_map(tensor: object, name: str = "input", channels: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D [N, C, H, W], got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if channels is not None and tensor.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (dim 1), got shape {tuple(tensor.shape)}")


def check_channel_axis(tensor: object, dim: object, name: str = "x", channels: int | None = None) -> int:
    """Validates ``tensor`` and its channel axis ``dim`` and returns the axis as a non-negative index.
    ``dim=1`` is a feature map [N, C, H, W]; any other axis but the batch axis 0 of a tensor of rank
    >= 2 also works (``dim=-1``: tokens [N, T, D], channels on D)."""
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int (1 for [N, C, H, W], -1 for [..., C]), got {dim!r}")
    if dim == 1:
        check_feature_map(tensor, name, channels)
        return 1
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {tensor.dtype}")
    rank = tensor.dim()
    if rank < 2 or not -rank <= dim < rank or dim % rank == 0:
        raise ValueError(
            f"dim must name a channel axis of {name} other than the batch axis 0, in [1, {rank}) or "
            f"[-{rank}, -1], got dim={dim} for shape {tuple(tensor.shape)}"
        )
    axis = int(dim) % rank
    if channels is not None and tensor.shape[axis] != channels:
        raise ValueError(f"{name} must have {channels} channels on dim {dim}, got shape {tuple(tensor.shape)}")
    return axis


def check_matches(tensor: torch.Tensor | None, like: torch.Tensor, name: str, like_name: str = "input") -> None:
    """``tensor`` (when given) must share ``like``'s device and dtype."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(tensor).__name__}")
    if tensor.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {tensor.device}")
    if tensor.dtype != like.dtype:
        raise TypeError(f"{name} must have {like_name}'s dtype {like.dtype}, got {tensor.dtype}")
