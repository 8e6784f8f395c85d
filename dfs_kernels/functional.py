"""The DFS ops as functions. Each validates its arguments, resolves ``backend`` once and calls that
backend's ops (see ``dfs_kernels.backends`` and ``dfs_kernels.ops``).

Notation (docs/semantics.md): for a feature map x [N, C, H, W] and Cp = ``shared_channels``,
``x+ = x[:, :Cp]`` (shared), ``x- = x[:, Cp:]`` (referenced), ``sg`` = stop-gradient.

Under ``torch.func`` transforms (``grad``, ``jacrev``, ``jacfwd``, ``vmap``, ``jvp``) and forward-mode
AD, every backend computes with the differentiable ATen formulation of ``dfs_kernels.reference``: the
same values, tangents and (per-sample) gradients, without the fused kernels.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from torch.autograd import forward_ad

from . import backends
from ._validation import check_channel_axis, check_feature_map, check_matches, check_shared_channels

__all__ = [
    "exit_avg_pool", "exit_reference", "partitioned_conv2d", "partitioned_conv2d_with_exit_pool",
    "partitioned_linear", "reroute",
]


def _pair(value: object, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (
        not isinstance(value, Sequence)
        or len(value) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum for v in value)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


def _checked_weight_and_cast(input, weight, bias, dims: int, layout: str):
    """Checks that ``weight`` is a ``dims``-D tensor (``layout`` names its axes in the error), casts the
    three as autocast would, and checks weight and bias against the input's device and dtype."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != dims:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a {dims}-D {layout} tensor, got {shape}")
    input, weight, bias = _autocast(input, weight, bias)
    check_matches(weight, input, "weight")
    check_matches(bias, input, "bias")
    return input, weight, bias


def _checked_conv_arguments(input, weight, bias, stride, dilation, groups, shared_channels):
    """Validates a partitioned convolution's arguments (each error names its argument) and returns
    (input, weight, bias) as autocast would cast them, with stride and dilation as pairs."""
    check_feature_map(input, "input")
    input, weight, bias = _checked_weight_and_cast(input, weight, bias, 4, "[C_out, C_in / groups, kH, kW]")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    in_channels, out_channels = weight.shape[1] * groups, weight.shape[0]
    if input.shape[1] != in_channels:
        raise ValueError(
            f"input must have weight.shape[1] * groups = {in_channels} channels, got shape {tuple(input.shape)}"
        )
    if out_channels % groups != 0:
        raise ValueError(f"groups={groups} must divide weight.shape[0]={out_channels}")
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    check_shared_channels(shared_channels, in_channels)
    return input, weight, bias, _pair(stride, "stride", 1), _pair(dilation, "dilation", 1)


def _autocast(input, weight, bias):
    """Casts like ``conv2d`` under autocast, which the registered ops are not known to: into the
    autocast dtype when autocast is on for the input's device."""
    device_type = input.device.type
    try:  # not torch.amp.is_autocast_available, which Dynamo of torch 2.11 cannot trace
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. "meta")
        enabled = False
    if not enabled:
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _ops(backend: str, device: torch.device):
    """The ops a call runs: the resolved backend's (an unavailable explicit backend raises), or the
    reference formulation under function transforms and forward-mode AD, which the registered ops
    and their autograd formulas do not support."""
    resolved = backends.implementation(backend, device)
    if torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0:
        return backends.implementation("reference", device)
    return resolved


def records_no_derivative() -> bool:
    """Whether no derivative of any kind is being recorded: grad mode off (``torch.no_grad``, inference
    mode), no forward-mode AD, no ``torch.func`` transform. A DFS op's forward is then its PyTorch
    counterpart's (the partition changes derivatives only), which the modules call directly."""
    return (not torch.is_grad_enabled() and forward_ad._current_level < 0
            and not torch._C._are_functorch_transforms_active())


_RESOLVES_TO_ATEN: dict[tuple[str, str], bool] = {}  # (backend, device type) -> whether "aten" runs it


def eager_aten(backend: str, input: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether a module, whose configuration was validated at construction, may call the compiled "aten"
    op on ``input`` directly, without the per-call checks of this module: eager (not traced), outside
    function transforms, forward-mode AD and autocast, ``input`` of ``weight``'s dtype and device, and
    ``backend`` resolving to "aten" on that device. Any other call goes through the functions here."""
    if (torch.compiler.is_compiling() or torch._C._is_any_autocast_enabled() or forward_ad._current_level >= 0
            or torch._C._are_functorch_transforms_active()):
        return False
    if weight is not None and (input.dtype != weight.dtype or input.device != weight.device):
        return False
    key = (backend, input.device.type)
    if key not in _RESOLVES_TO_ATEN:
        try:
            _RESOLVES_TO_ATEN[key] = backends.resolve_backend(backend, key[1]) == "aten"
        except ValueError:  # unavailable: the validating call raises the error that says why
            return False
    return _RESOLVES_TO_ATEN[key]


_HAS_MKLDNN = torch.backends.mkldnn.is_available()  # read once: Dynamo cannot trace the call


def _compiled_cpu_layout(input: torch.Tensor) -> torch.Tensor:
    """``input`` channels-last when torch.compile traces a CPU convolution, else ``input``.

    Inductor runs every ATen convolution of a CPU graph channels-last (oneDNN is fastest there), writing
    the layout change into the kernels that produce the convolution's input. Our ops are opaque to it:
    without this they would run NCHW inside a graph whose DSN counterpart runs channels-last, and lose
    to it (VGG7-64, batch 64, 2 threads: compiled NCHW DFS was 4% slower than compiled DSN)."""
    if (torch.compiler.is_compiling() and input.device.type == "cpu" and input.dim() == 4
            and _HAS_MKLDNN):
        return input.contiguous(memory_format=torch.channels_last)
    return input


def _numeric_padding(input, weight, padding, stride, dilation):
    """(input, (pad_h, pad_w)) with string padding turned into numbers. "same" with an odd total
    padding pads one extra row/column at the bottom/right, as torch's conv2d does."""
    if isinstance(padding, str):
        if padding == "valid":
            return input, (0, 0)
        if padding != "same":
            raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")
        if stride != (1, 1):
            raise ValueError(f"padding='same' requires stride=1, got stride={stride}")
        totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
        before = tuple(total // 2 for total in totals)
        extra_h, extra_w = (total - 2 * b for total, b in zip(totals, before))
        if extra_h or extra_w:
            input = F.pad(input, [0, extra_w, 0, extra_h])
        return input, before
    return input, _pair(padding, "padding", 0)


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
    backend: str = "auto",
) -> torch.Tensor:
    """``conv2d([x+, sg(x-)], weight, bias)``: a convolution whose input gradient reaches only the
    first ``shared_channels`` input channels.

    Args:
        input: [N, C_in, H, W] (or unbatched [C_in, H, W]).
        weight: [C_out, C_in / groups, kH, kW].
        bias: [C_out] or None.
        stride, padding, dilation, groups: as ``torch.nn.functional.conv2d`` (padding may be
            "same" or "valid").
        shared_channels: Cp in [0, C_in]; channels [0, Cp) are shared, [Cp, C_in) referenced.
        backend: "auto" or a name from ``dfs_kernels.available_backends()``.

    Returns:
        [N, C_out, H_out, W_out], equal to ``conv2d(input, weight, bias, ...)``. Backward gives the
        weight and bias gradients in full and an input gradient that is zero on [Cp, C_in), where
        backends other than "reference" never compute it.
    """
    unbatched = isinstance(input, torch.Tensor) and input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    input, weight, bias, stride, dilation = _checked_conv_arguments(
        input, weight, bias, stride, dilation, groups, shared_channels
    )

    ops = _ops(backend, input.device)
    if ops.name != "reference":  # the oracle keeps torch's own handling of string padding
        input, padding = _numeric_padding(_compiled_cpu_layout(input), weight, padding, stride, dilation)
    output = ops.partitioned_conv2d(
        input, weight, bias, stride, padding, dilation, int(groups), int(shared_channels)
    )
    return output.squeeze(0) if unbatched else output


def partitioned_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    shared_features: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``linear([x+, sg(x-)], weight, bias)`` split on the last axis: a linear layer whose input
    gradient reaches only the first ``shared_features`` input features.

    Args:
        input: [..., in_features] (any leading dimensions: a batch, tokens [N, T, in_features]).
        weight: [out_features, in_features].
        bias: [out_features] or None.
        shared_features: Cp in [0, in_features]; features [0, Cp) are shared, [Cp, in_features) referenced.
        backend: "auto" or a name from ``dfs_kernels.available_backends()``.

    Returns:
        [..., out_features], equal to ``F.linear(input, weight, bias)``. Backward gives the weight and
        bias gradients in full and an input gradient that is zero on [Cp, in_features), where backends
        other than "reference" never compute it.
    """
    if not isinstance(input, torch.Tensor) or input.dim() < 1:
        shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
        raise ValueError(f"input must be a tensor [..., in_features] of at least 1 dimension, got {shape}")
    if not input.is_floating_point():
        raise TypeError(f"input must have a floating dtype, got {input.dtype}")
    input, weight, bias = _checked_weight_and_cast(input, weight, bias, 2, "[out_features, in_features]")
    out_features, in_features = weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input must have weight.shape[1] = {in_features} features on its last axis, got shape {tuple(input.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    check_shared_channels(shared_features, in_features, "shared_features")
    return _ops(backend, input.device).partitioned_linear(input, weight, bias, int(shared_features))


def reroute(
    x: torch.Tensor, shared_channels: int, *, dim: int = 1, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split point of a DFS network: ``(backbone, exit) = ([x+, sg(x-)], [sg(x+), x-])``.

    x: [N, C, H, W] with ``dim=1``; with another ``dim`` (not 0), any tensor whose channels lie on
    that axis, e.g. tokens [N, T, D] with ``dim=-1`` (the first Cp features of D are shared). Both
    outputs equal ``x`` in the forward (views, no copy). In the backward, the gradient of ``x`` is the
    backbone gradient on [:Cp] and the exit gradient on [Cp:], assembled in one pass.
    """
    axis = check_channel_axis(x, dim, "x")
    check_shared_channels(shared_channels, x.shape[axis])
    if records_no_derivative():  # both views are x
        return x, x
    return _ops(backend, x.device).reroute(x, int(shared_channels), axis)


def exit_reference(
    x: torch.Tensor, shared_channels: int, *, dim: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """``[sg(x+), x-]``: the forward is ``x``; the gradient reaches only channels [Cp:] of axis ``dim``.
    x: [N, C, H, W] with ``dim=1``, or channels on another axis (``dim=-1`` for tokens [N, T, D])."""
    axis = check_channel_axis(x, dim, "x")
    check_shared_channels(shared_channels, x.shape[axis])
    if records_no_derivative():  # the view is x
        return x
    return _ops(backend, x.device).exit_reference(x, int(shared_channels), axis)


def exit_avg_pool(x: torch.Tensor, shared_channels: int, *, dim: int = 1, backend: str = "auto") -> torch.Tensor:
    """The pooled read of an exit: the mean of ``[sg(x+), x-]`` over every axis but the batch axis 0
    and the channel axis ``dim``. [N, C, H, W] -> [N, C] with ``dim=1``; tokens [N, T, D] -> [N, D]
    with ``dim=-1``."""
    axis = check_channel_axis(x, dim, "x")
    check_shared_channels(shared_channels, x.shape[axis])
    return _ops(backend, x.device).exit_avg_pool(x, int(shared_channels), axis)


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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused DFS stage: one feature map x feeding both a partitioned convolution and an exit, as at
    every VGG split point. Returns ``(partitioned_conv2d(x, ...), exit_avg_pool(x, Cp))``.

    Args:
        input: [N, C_in, H, W].
        weight, bias, stride, padding, dilation, groups, shared_channels, backend: as
            ``partitioned_conv2d``; the exit references the same ``shared_channels``.

    Returns:
        (conv [N, C_out, H_out, W_out], pooled [N, C_in]). In the backward, dL/dx+ comes from the
        convolution only and dL/dx- from the exit only, written into their channel ranges of one
        tensor with no zero-fill and no add (every backend but "reference"). The "triton" backend also
        computes both outputs from one read of x when the convolution has a tap that reads every
        pixel once (stride 1, output of the input's size).
    """
    input, weight, bias, stride, dilation = _checked_conv_arguments(
        input, weight, bias, stride, dilation, groups, shared_channels
    )

    ops = _ops(backend, input.device)
    cp = int(shared_channels)
    if ops.name == "reference":  # the oracle keeps torch's own handling of string padding
        return ops.partitioned_conv2d_with_exit_pool(
            input, weight, bias, stride, padding, dilation, int(groups), cp
        )
    input = _compiled_cpu_layout(input)
    padded, padding = _numeric_padding(input, weight, padding, stride, dilation)
    if padded is not input:  # "same" with an extra row/column: the exit must pool x, not the padded x
        output = ops.partitioned_conv2d(padded, weight, bias, stride, padding, dilation, int(groups), cp)
        return output, ops.exit_avg_pool(input, cp)
    return ops.partitioned_conv2d_with_exit_pool(
        input, weight, bias, stride, padding, dilation, int(groups), cp
    )
