"""What the multi-exit models share: the three flavours and the few layers in which they differ.

A model is written once against ``FlavourLayers``, which hands out, per flavour, the layers that touch
a DFS split point (docs/semantics.md). Every other layer is an ordinary ``torch.nn`` layer, and the layers
handed out keep the parameter names of their plain counterparts (``weight``/``bias`` of a conv,
``fc.*`` of a pooled exit), so one state_dict loads into all three flavours:

- ``"dsn"``: plain multi-exit network (deep supervision), no stop-gradient anywhere.
- ``"dfs_eager"``: DFS written literally with ``dfs_kernels.reference`` (split, detach, two
  convolutions, cat), the way the original research code does it.
- ``"dfs"``: DFS through the package's modules and functional ops, with ``backend=``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional, reference
from .._validation import check_beta, shared_channels_for
from ..backends import check_backend_name
from ..nn import ExitHead, FeatureReroute, PartitionedConv2d, PartitionedLinear

FLAVOURS = ("dsn", "dfs_eager", "dfs")
EXIT_GRADS = ("partitioned", "all")


class MultiExitNetwork(nn.Module):
    """Base of the models: ``forward(x, return_features=False)`` returns the exits' logits, shallow
    to deep (a list of [N, num_classes]), and with ``return_features=True`` the pair
    ``(logits, features)``. ``exit_modules()`` lists, in the same order, the module whose forward
    ends each exit, so exit costs can be measured cumulatively (``dfs_kernels.models.summary``).
    ``input_size`` is the (C, H, W) the architecture is configured for."""

    input_size: tuple[int, int, int]

    def exit_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random batch of what ``forward`` reads (on CPU): images of ``input_size`` by default."""
        return torch.randn(batch_size, *self.input_size, generator=generator)


class ReferencePartitionedConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing ``conv(x+, W+) + conv(sg(x-), W-)`` with ``dfs_kernels.reference``
    (zero padding only, as every convolution of the models)."""

    def __init__(self, *args, shared_channels: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shared_channels = shared_channels

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return reference.partitioned_conv2d(
            input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
            shared_channels=self.shared_channels,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_channels={self.shared_channels}"


class PooledLinearExit(nn.Module):
    """DSN exit: ``fc(global_avg_pool(x))``. x [N, C, H, W] -> [N, num_classes]; keys ``fc.*`` as
    ``dfs_kernels.ExitHead``."""

    def __init__(self, in_channels: int, num_classes: int, *, bias: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class ReferencePooledLinearExit(PooledLinearExit):
    """DFS exit ``fc(global_avg_pool([sg(x+), x-]))`` written with ``dfs_kernels.reference``."""

    def __init__(self, in_channels: int, num_classes: int, *, shared_channels: int, bias: bool = False) -> None:
        super().__init__(in_channels, num_classes, bias=bias)
        self.shared_channels = shared_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.exit_head(x, self.fc.weight, self.fc.bias, self.shared_channels)


class ReferenceExitView(nn.Module):
    """``[sg(x+), x-]`` with ``dfs_kernels.reference``. x [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, shared_channels: int) -> None:
        super().__init__()
        self.shared_channels = shared_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.exit_reference(x, self.shared_channels)


class ExitView(nn.Module):
    """``[sg(x+), x-]`` through ``dfs_kernels.functional.exit_reference``: a view of x in the forward.
    x [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, shared_channels: int, backend: str) -> None:
        super().__init__()
        self.shared_channels = shared_channels
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.exit_reference(x, self.shared_channels, backend=self.backend)


class PlainSplit(nn.Module):
    """DSN split point: backbone and exit both read x with full gradient. x -> (x, x)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class ReferenceSplit(nn.Module):
    """DFS split point with ``dfs_kernels.reference``: x -> ([x+, sg(x-)], exit view), the exit view
    being ``[sg(x+), x-]``, or x itself when ``full_exit_gradient``."""

    def __init__(self, shared_channels: int, *, full_exit_gradient: bool) -> None:
        super().__init__()
        self.shared_channels = shared_channels
        self.full_exit_gradient = full_exit_gradient

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone = reference.partition(x, self.shared_channels)
        exit = x if self.full_exit_gradient else reference.exit_reference(x, self.shared_channels)
        return backbone, exit


class RerouteFullExit(FeatureReroute):
    """``FeatureReroute`` whose exit reads x itself (``exit_grad="all"``): x -> ([x+, sg(x-)], x).
    The rerouted exit view is left unused; its backward then contributes nothing."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone, _ = super().forward(x)
        return backbone, x


class FlavourLayers:
    """Hands out the layers that touch a split point, for one flavour.

    Args:
        flavour: "dsn", "dfs_eager" or "dfs".
        beta: fraction of shared channels at each split point; Cp = round(beta * C).
        backend: backend of the "dfs" flavour's ops ("auto" or a name).
        exit_grad: "partitioned" (exits reach only x-, docs/semantics.md) or "all" (exits reach every channel).
    """

    def __init__(self, flavour: str, beta: float, backend: str, exit_grad: str) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour must be one of {FLAVOURS}, got {flavour!r}")
        if exit_grad not in EXIT_GRADS:
            raise ValueError(f"exit_grad must be one of {EXIT_GRADS}, got {exit_grad!r}")
        check_beta(beta)
        check_backend_name(backend)
        self.flavour, self.beta, self.backend, self.exit_grad = flavour, beta, backend, exit_grad

    def _shared(self, channels: int) -> int:
        return shared_channels_for(channels, self.beta)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
             bias: bool = False) -> nn.Conv2d:
        """A convolution that reads a split point: the backbone side ``[x+, sg(x-)]`` (DFS flavours)."""
        args = (in_channels, out_channels, kernel_size, stride, padding)
        if self.flavour == "dsn":
            return nn.Conv2d(*args, bias=bias)
        if self.flavour == "dfs_eager":
            return ReferencePartitionedConv2d(*args, bias=bias, shared_channels=self._shared(in_channels))
        return PartitionedConv2d(*args, bias=bias, beta=self.beta, backend=self.backend)

    def pooled_exit(self, in_channels: int, num_classes: int, *, final: bool = False) -> nn.Module:
        """Global average pool -> Linear(bias=False) exit reading a split point; the ``final`` exit (and
        every exit under ``exit_grad="all"``) sends gradient to every channel."""
        if self.flavour == "dsn":
            return PooledLinearExit(in_channels, num_classes)
        shared = 0 if final or self.exit_grad == "all" else self._shared(in_channels)
        if self.flavour == "dfs_eager":
            return ReferencePooledLinearExit(in_channels, num_classes, shared_channels=shared)
        return ExitHead(in_channels, num_classes, shared_channels=shared, backend=self.backend)

    def exit_view(self, channels: int) -> nn.Module:
        """The exit side ``[sg(x+), x-]`` of a split point whose backbone side is taken by ``conv``s."""
        if self.flavour == "dsn" or self.exit_grad == "all":
            return nn.Identity()
        if self.flavour == "dfs_eager":
            return ReferenceExitView(self._shared(channels))
        return ExitView(self._shared(channels), self.backend)

    def split(self, channels: int) -> nn.Module:
        """A split point x -> (backbone view, exit view), for backbones that read x other than by convs."""
        if self.flavour == "dsn":
            return PlainSplit()
        full_exit_gradient = self.exit_grad == "all"
        if self.flavour == "dfs_eager":
            return ReferenceSplit(self._shared(channels), full_exit_gradient=full_exit_gradient)
        reroute = RerouteFullExit if full_exit_gradient else FeatureReroute
        return reroute(channels, beta=self.beta, backend=self.backend)


# ------------------------------------------------------------------- token models ([N, T, D], split on D)


class ReferencePartitionedLinear(nn.Linear):
    """``nn.Linear`` computing ``linear([x+, sg(x-)], W, b)`` on the last axis with ``dfs_kernels.reference``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, shared_features: int) -> None:
        super().__init__(in_features, out_features, bias)
        self.shared_features = shared_features

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return reference.partitioned_linear(input, self.weight, self.bias, self.shared_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_features={self.shared_features}"


class ReferenceTokenSplit(nn.Module):
    """DFS split point on the hidden axis with ``dfs_kernels.reference``: h [..., D] -> ([h+, sg(h-)], exit
    view), the exit view being ``[sg(h+), h-]``, or h itself when ``full_exit_gradient``."""

    def __init__(self, shared_features: int, *, full_exit_gradient: bool) -> None:
        super().__init__()
        self.shared_features = shared_features
        self.full_exit_gradient = full_exit_gradient

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone, exit = reference.reroute(x, self.shared_features, dim=-1)
        return backbone, x if self.full_exit_gradient else exit


class TokenReroute(ReferenceTokenSplit):
    """The same split point through ``dfs_kernels.functional.reroute(..., dim=-1)``: views of h in the forward,
    one assembled gradient in the backward."""

    def __init__(self, shared_features: int, *, full_exit_gradient: bool, backend: str) -> None:
        super().__init__(shared_features, full_exit_gradient=full_exit_gradient)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        backbone, exit = functional.reroute(x, self.shared_features, dim=-1, backend=self.backend)
        return backbone, x if self.full_exit_gradient else exit


class TokenFlavourLayers(FlavourLayers):
    """``FlavourLayers`` for token models, whose split points cut the hidden axis of [N, T, D]."""

    def token_split(self, features: int, *, full_exit_gradient: bool) -> nn.Module:
        """A split point h -> (backbone view ``[h+, sg(h-)]``, exit view ``[sg(h+), h-]`` or h)."""
        if self.flavour == "dsn":
            return PlainSplit()
        shared = self._shared(features)
        if self.flavour == "dfs_eager":
            return ReferenceTokenSplit(shared, full_exit_gradient=full_exit_gradient)
        return TokenReroute(shared, full_exit_gradient=full_exit_gradient, backend=self.backend)

    def partitioned_linear(self, in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
        """A linear layer whose input gradient reaches only the first Cp input features (DFS flavours)."""
        if self.flavour == "dsn":
            return nn.Linear(in_features, out_features, bias)
        if self.flavour == "dfs_eager":
            return ReferencePartitionedLinear(in_features, out_features, bias,
                                              shared_features=self._shared(in_features))
        return PartitionedLinear(in_features, out_features, bias, beta=self.beta, backend=self.backend)


def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int, *,
                         mask: torch.Tensor | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention over ``heads`` heads. query/key/value [N, T, D] -> [N, T, D]; ``mask``
    is additive, broadcastable to [N, heads, T, T]."""
    batch, tokens, width = query.shape

    def split_heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, heads, width // heads).transpose(1, 2)

    context = F.scaled_dot_product_attention(split_heads(query), split_heads(key), split_heads(value),
                                             attn_mask=mask, dropout_p=dropout)
    return context.transpose(1, 2).reshape(batch, tokens, width)
