"""Modules: ``PartitionedConv2d`` (a drop-in ``nn.Conv2d``), ``PartitionedLinear`` (a drop-in
``nn.Linear``), ``ExitHead``, ``FeatureReroute``;
``convert``, which partitions the layers of an existing model that read its exit points, and
``unconvert``, its inverse."""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from ._exit_points import as_call, exit_point_readers
from ._validation import (
    check_beta,
    check_channel_axis,
    check_feature_map,
    check_shared_channels,
    shared_channels_for,
)
from .backends import check_backend_name

__all__ = ["ExitHead", "FeatureReroute", "PartitionedConv2d", "PartitionedLinear", "convert", "partitioned_like",
           "unconvert"]


class _Partition:
    """``beta`` of a module whose forward partitions ``_partitioned_size`` (C) channels or features,
    Cp of them shared. Assigning ``beta`` (or the subclass's Cp property) after construction is validated
    and takes effect at the next forward. Neither is a parameter or buffer, so state_dict keys do not
    change."""

    _shared_count: int

    @property
    def _partitioned_size(self) -> int:
        raise NotImplementedError

    @property
    def beta(self) -> float:
        """Cp / C, the fraction shared; assigning it sets Cp = round(beta * C)."""
        size = self._partitioned_size
        return self._shared_count / size if size else 0.0

    @beta.setter
    def beta(self, value: float) -> None:
        self._shared_count = shared_channels_for(self._partitioned_size, value)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling anything: the one place to
        # stop it with a useful message instead of a type error deep inside the backend dispatch.
        raise RuntimeError(
            f"torch.jit.script is not supported for dfs_kernels.{type(self).__name__}: TorchScript cannot "
            "compile the backend dispatch of the DFS ops. Use torch.export instead, with "
            "ep.run_decompositions(dfs_kernels.export_decompositions()) for a program of plain ATen ops, "
            "or torch.jit.trace; dfs_kernels.unconvert(model) turns PartitionedConv2d back into nn.Conv2d "
            "and PartitionedLinear.to_linear() gives the plain nn.Linear."
        )


class _ChannelPartition(_Partition):
    """``shared_channels`` (Cp) and ``beta`` of a module whose forward partitions ``_partitioned_size``
    (C) channels."""

    @property
    def shared_channels(self) -> int:
        """Cp, an int in [0, C]: channels [0, Cp) are shared, [Cp, C) referenced."""
        return self._shared_count

    @shared_channels.setter
    def shared_channels(self, value: int) -> None:
        check_shared_channels(value, self._partitioned_size)
        self._shared_count = int(value)


class PartitionedConv2d(_ChannelPartition, nn.Conv2d):
    """``nn.Conv2d`` whose input is partitioned for Deep Feature Surgery: ``conv([x+, sg(x-)])``.

    Same constructor arguments, parameters, initialization and state_dict keys as ``nn.Conv2d``, so
    a checkpoint loads into either. The forward equals ``nn.Conv2d``'s; in the backward the input
    gradient reaches only the first ``shared_channels`` (Cp) input channels, and the backends other
    than "reference" never compute it for the others: the input-gradient work drops to Cp / C_in.

    Keyword-only args:
        beta: fraction of shared input channels, in [0, 1]; Cp = round(beta * in_channels).
        shared_channels: Cp as an int in [0, in_channels]; overrides ``beta``.
        backend: "auto" or a backend name (``dfs_kernels.available_backends()``).

    ``shared_channels`` and ``beta`` may be assigned after construction (validated, effective at the
    next forward). ``torch.jit.script`` is refused with a clear error; see ``dfs_kernels.export``.

    Shapes: input [N, C_in, H, W] (or [C_in, H, W]) -> [N, C_out, H_out, W_out].

    With groups > 1 the shared channels' gradient is computed by one grouped call for the groups they
    fill and one call for the group they cut, if any; the saving is exact but the extra call costs a
    launch. Depthwise convolutions (groups == in_channels) save in proportion like dense ones.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        beta: float = 0.5,
        shared_channels: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._shared_count = shared_channels_for(in_channels, beta, shared_channels)
        check_backend_name(backend)
        self.backend = backend

    @property
    def _partitioned_size(self) -> int:
        return self.in_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if functional.records_no_derivative():  # the forward is nn.Conv2d's
            return nn.Conv2d._conv_forward(self, input, self.weight, self.bias)
        if (self.padding_mode == "zeros" and not isinstance(self.padding, str) and input.dim() == 4
                and input.shape[1] == self.in_channels and functional.eager_aten(self.backend, input, self.weight)):
            return torch.ops.dfs_kernels.partitioned_conv2d.default(
                input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                self._shared_count,
            )
        return self._conv_forward(input, self.weight, self.bias)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            input = nn.functional.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return functional.partitioned_conv2d(
            input, weight, bias, self.stride, padding, self.dilation, self.groups,
            shared_channels=self.shared_channels, backend=self.backend,
        )

    def forward_with_exit_pool(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(input), exit_avg_pool(input, self.shared_channels))``: this convolution and the pooled
        read of an exit that references the same input with the same shared channels (a DFS stage, as
        at every VGG split point). The backward writes both input gradients, the convolution's into
        [0, Cp) and the exit's into [Cp, C_in), into one tensor in one pass.
        Shapes: input [N, C_in, H, W] -> ([N, C_out, H_out, W_out], [N, C_in])."""
        if self.padding_mode != "zeros":  # the convolution reads a padded copy: nothing to share
            return self(input), functional.exit_avg_pool(input, self.shared_channels, backend=self.backend)
        return functional.partitioned_conv2d_with_exit_pool(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
            shared_channels=self.shared_channels, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_channels={self.shared_channels}, backend={self.backend!r}"

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, *, beta: float = 0.5, shared_channels: int | None = None, backend: str = "auto"
    ) -> PartitionedConv2d:
        """A PartitionedConv2d that shares ``conv``'s parameters (the same Parameter objects, so an
        optimizer built on ``conv`` keeps working) and its configuration."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        _check_initialized(conv, "conv")
        partitioned = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, conv.bias is not None, conv.padding_mode, device="meta",
            beta=beta, shared_channels=shared_channels, backend=backend,
        )
        _adopt(partitioned, conv)
        return partitioned

    def to_conv(self) -> nn.Conv2d:
        """The plain ``nn.Conv2d`` with the same parameters (shared, not copied): for export and
        inference, where forward values are identical."""
        conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
            self.groups, self.bias is not None, self.padding_mode, device="meta",
        )
        _adopt(conv, self)
        return conv


class PartitionedLinear(_Partition, nn.Linear):
    """``nn.Linear`` whose input is partitioned for Deep Feature Surgery: ``linear([x+, sg(x-)])`` with
    the split on the last axis (the input features), as for the Q/K/V projections of a post-LN
    transformer layer that reads a rerouted hidden state.

    Same constructor arguments, parameters, initialization and state_dict keys as ``nn.Linear``. The
    forward equals ``nn.Linear``'s; in the backward the weight and bias gradients are full, the input
    gradient reaches only the first ``shared_features`` (Cp) input features, and the backends other
    than "reference" never compute it for the others: the input-gradient GEMM shrinks to Cp / in_features.

    Keyword-only args:
        beta: fraction of shared input features, in [0, 1]; Cp = round(beta * in_features) (banker's
            rounding, as ``PartitionedConv2d``).
        shared_features: Cp as an int in [0, in_features]; overrides ``beta``.
        backend: "auto" or a backend name (``dfs_kernels.available_backends()``).

    ``shared_features`` and ``beta`` may be assigned after construction (validated, effective at the
    next forward). Shapes: input [..., in_features] -> [..., out_features].
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        beta: float = 0.5,
        shared_features: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._shared_count = shared_channels_for(in_features, beta, shared_features, "shared_features")
        check_backend_name(backend)
        self.backend = backend

    @property
    def _partitioned_size(self) -> int:
        return self.in_features

    @property
    def shared_features(self) -> int:
        """Cp, an int in [0, in_features]: input features [0, Cp) are shared, [Cp, in_features) referenced."""
        return self._shared_count

    @shared_features.setter
    def shared_features(self, value: int) -> None:
        check_shared_channels(value, self.in_features, "shared_features")
        self._shared_count = int(value)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if functional.records_no_derivative():  # the forward is nn.Linear's
            return nn.functional.linear(input, self.weight, self.bias)
        if input.dim() >= 1 and input.shape[-1] == self.in_features and functional.eager_aten(
                self.backend, input, self.weight):
            return torch.ops.dfs_kernels.partitioned_linear.default(input, self.weight, self.bias, self._shared_count)
        return functional.partitioned_linear(
            input, self.weight, self.bias, shared_features=self.shared_features, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_features={self.shared_features}, backend={self.backend!r}"

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, beta: float = 0.5, shared_features: int | None = None, backend: str = "auto"
    ) -> PartitionedLinear:
        """A PartitionedLinear that shares ``linear``'s parameters (the same Parameter objects, so an
        optimizer built on ``linear`` keeps working)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if _is_lazy(linear):
            raise ValueError(
                f"linear is an uninitialized lazy layer ({type(linear).__name__} before its first forward): its "
                "in_features and weight do not exist yet. Run one forward pass first, then convert it."
            )
        partitioned = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta",
            beta=beta, shared_features=shared_features, backend=backend,
        )
        _adopt(partitioned, linear)
        return partitioned

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` with the same parameters (shared, not copied): for export and
        inference, where forward values are identical."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        _adopt(linear, self)
        return linear


def _is_lazy(module: nn.Module) -> bool:
    """Whether ``module`` is a lazy module before its first forward (its parameters do not exist yet)."""
    return isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params()


def _check_initialized(conv: nn.Conv2d, name: str) -> None:
    if _is_lazy(conv):
        raise ValueError(
            f"{name} is an uninitialized lazy convolution ({type(conv).__name__} before its first forward): "
            "its in_channels and weight do not exist yet. Run one forward pass first, then convert it."
        )


def _adopt(target: nn.Conv2d, source: nn.Conv2d) -> None:
    target.weight = source.weight
    target.bias = source.bias
    target.train(source.training)


class ExitHead(_ChannelPartition, nn.Module):
    """The VGG exit of docs/semantics.md: ``fc(global_avg_pool([sg(x+), x-]))``.

    Its gradient reaches only the referenced channels [Cp, C) of x; ``shared_channels=0`` lets it
    reach every channel (the ``exit_grad="all"`` variant). Shapes: x [N, C, H, W] -> [N, num_classes].
    State_dict keys: ``fc.weight`` (and ``fc.bias``). ``shared_channels`` and ``beta`` may be
    assigned after construction (validated against ``in_channels``).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        beta: float = 0.5,
        shared_channels: int | None = None,
        bias: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes, bias=bias, device=device, dtype=dtype)
        self._shared_count = shared_channels_for(in_channels, beta, shared_channels)
        check_backend_name(backend)
        self.backend = backend

    @property
    def _partitioned_size(self) -> int:
        return self.fc.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_feature_map(x, "x", channels=self.fc.in_features)
        if functional.records_no_derivative():  # the pooled read is a plain mean
            return self.fc(x.mean((2, 3)))
        pooled = functional.exit_avg_pool(x, self.shared_channels, backend=self.backend)
        return self.fc(pooled)

    def extra_repr(self) -> str:
        return f"shared_channels={self.shared_channels}, backend={self.backend!r}"


class FeatureReroute(_ChannelPartition, nn.Module):
    """A DFS split point: ``forward(x) -> (backbone, exit)`` with backbone = ``[x+, sg(x-)]`` and
    exit = ``[sg(x+), x-]`` (see ``dfs_kernels.functional.reroute``). x: [N, C, H, W] with ``dim=1``,
    tokens [N, T, C] with ``dim=-1``. ``shared_channels`` and ``beta`` may be assigned after
    construction (validated against ``channels``)."""

    def __init__(
        self, channels: int, *, beta: float = 0.5, shared_channels: int | None = None, dim: int = 1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim == 0:
            raise ValueError(f"dim must be a channel axis other than the batch axis 0 (1 or -1), got {dim!r}")
        self.channels = channels
        self.dim = dim
        self._shared_count = shared_channels_for(channels, beta, shared_channels)
        check_backend_name(backend)
        self.backend = backend

    @property
    def _partitioned_size(self) -> int:
        return self.channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if functional.records_no_derivative():  # both views are x
            return x, x
        rank = x.dim()
        if ((rank == 4 if self.dim == 1 else rank >= 2 and self.dim == -1) and x.shape[self.dim] == self.channels
                and x.is_floating_point() and functional.eager_aten(self.backend, x)):
            return torch.ops.dfs_kernels.reroute.default(x, self._shared_count, self.dim % rank)
        check_channel_axis(x, self.dim, "x", channels=self.channels)
        return functional.reroute(x, self.shared_channels, dim=self.dim, backend=self.backend)

    def extra_repr(self) -> str:
        dim = "" if self.dim == 1 else f", dim={self.dim}"
        return f"channels={self.channels}, shared_channels={self.shared_channels}{dim}, backend={self.backend!r}"


def partitioned_like(layer: nn.Module, shared: int, backend: str = "auto") -> PartitionedConv2d | PartitionedLinear:
    """The partitioned counterpart of ``layer`` (an ``nn.Conv2d`` or ``nn.Linear``) sharing its parameters,
    with ``shared`` (Cp) shared input channels or features."""
    if isinstance(layer, nn.Conv2d):
        return PartitionedConv2d.from_conv(layer, shared_channels=shared, backend=backend)
    return PartitionedLinear.from_linear(layer, shared_features=shared, backend=backend)


def convert(
    model: nn.Module,
    *,
    exits: list[str] | None = None,
    beta: float = 0.5,
    every_conv: bool = False,
    skip_first: bool = True,
    backend: str = "auto",
    example_input: object = None,
) -> nn.Module:
    """Partitions, in place, the layers of ``model`` that read an exit point, sharing their parameters.
    Returns ``model`` (or, when ``model`` is itself an ``nn.Conv2d`` converted with ``every_conv=True,
    skip_first=False``, its replacement).

    With ``exits`` (qualified module names, as for ``multi_exit``): every ``nn.Conv2d`` and ``nn.Linear`` that
    reads one of those modules' outputs directly becomes a ``PartitionedConv2d`` / ``PartitionedLinear`` with
    Cp = round(beta * C), and nothing else changes. The readers are found by one forward on ``example_input``
    (default: told from the model, see ``multi_exit``). Your exits must then read the exit view through the
    package (``ExitHead``, ``functional.exit_reference``), not the exit point itself, or their own first layer
    would be partitioned as a backbone layer. To add the exits and their referencing as well, use
    ``dfs_kernels.multi_exit``.

    ``every_conv=True`` is the layout of the paper's VGG, where an exit reads the input of every convolution
    after the first: every ``nn.Conv2d`` is partitioned, except the first in module order (which sees the
    image) unless ``skip_first=False``.

    Only layers computing exactly ``nn.Conv2d``'s / ``nn.Linear``'s forward are replaced. A layer held in
    several places becomes one partitioned layer in all of them. An uninitialized lazy convolution raises
    ``ValueError``.

    Raises ValueError without ``exits`` or ``every_conv``: partitioning a convolution whose input no exit
    reads leaves channels [Cp, C) of that input with no gradient at all, so the filters producing them
    would never learn.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_beta(beta)
    check_backend_name(backend)
    if exits is not None and every_conv:
        raise ValueError("convert takes exits or every_conv=True, not both")
    if exits is None and not every_conv:
        raise ValueError(
            "convert needs exits=[module names]: the layers it partitions must read a tensor that an exit "
            "reads, or the channels [Cp, C) of their input get gradient from nobody and the filters producing "
            "them never learn. dfs_kernels.multi_exit(model, exits, num_classes=...) adds exits and DFS in one "
            "step; every_conv=True partitions every convolution after the first (the paper's VGG layout, where "
            "an exit reads the input of each)."
        )
    if every_conv:
        return _convert_every_conv(model, beta, skip_first, backend)
    readers = exit_point_readers(model, exits, as_call(example_input) if example_input is not None else None)
    replacements = {}
    for (name, layer), channels in readers:
        _check_initialized(layer, f"model.{name}")
        replacements[id(layer)] = partitioned_like(layer, shared_channels_for(channels, beta), backend)
    return _replace(model, replacements)


def _convert_every_conv(model: nn.Module, beta: float, skip_first: bool, backend: str) -> nn.Module:
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if skip_first and convs:
        convs = convs[1:]
    replacements = {}
    for name, conv in convs:  # named_modules lists a shared module once, under its first name
        if type(conv) is nn.Conv2d or _is_lazy(conv):
            _check_initialized(conv, f"model.{name}" if name else "model")
            replacements[id(conv)] = PartitionedConv2d.from_conv(conv, beta=beta, backend=backend)
    return _replace(model, replacements)


def unconvert(model: nn.Module) -> nn.Module:
    """The inverse of ``convert``: replaces, in place, every ``PartitionedConv2d`` of ``model`` (exactly
    that type) by the plain ``nn.Conv2d`` sharing its parameters (``PartitionedConv2d.to_conv``); a
    module held in several places becomes one ``nn.Conv2d`` in all of them. Forward values do not
    change. Returns ``model``, or the replacement when ``model`` is itself a PartitionedConv2d.
    ``ExitHead`` and ``FeatureReroute`` have no plain counterpart and stay; ``dfs_kernels.export``
    lowers them (and every other DFS op) to ATen for deployment."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    partitioned = [module for module in model.modules() if type(module) is PartitionedConv2d]
    return _replace(model, {id(module): module.to_conv() for module in partitioned})


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Puts ``replacements[id(module)]`` in every place that holds ``module``, under every name
    (``named_modules(remove_duplicate=False)`` lists a shared module once per place)."""
    if id(model) in replacements:  # the model itself: nothing holds it, so return its replacement
        return replacements[id(model)]
    uses = model.named_modules(remove_duplicate=False)
    for name, module in [(name, module) for name, module in uses if id(module) in replacements]:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, replacements[id(module)])
    return model
