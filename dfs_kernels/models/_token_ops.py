"""Token-axis DFS ops for the transformer models, resolved once at import.

The package's ops take the channel axis as ``dim`` (``dim=-1``: the hidden axis of [N, T, D]) and provide
``PartitionedLinear``; where this build predates them, the literal formulation below (split the last axis,
detach, cat) stands in, with the same values and gradients. Models import the token ops from here only.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional, reference
from .. import nn as dfs_nn

TOKEN_AXIS_OPS = "dim" in inspect.signature(functional.reroute).parameters


def _partition(x: torch.Tensor, shared: int) -> torch.Tensor:
    return torch.cat([x[..., :shared], x[..., shared:].detach()], dim=-1)


def _exit_reference(x: torch.Tensor, shared: int) -> torch.Tensor:
    return torch.cat([x[..., :shared].detach(), x[..., shared:]], dim=-1)


def reference_reroute(x: torch.Tensor, shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``([x+, sg(x-)], [sg(x+), x-])`` on the last axis, with ``dfs_kernels.reference``."""
    if TOKEN_AXIS_OPS:
        return reference.reroute(x, shared, dim=-1)
    return _partition(x, shared), _exit_reference(x, shared)


def reroute(x: torch.Tensor, shared: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``functional.reroute`` on the last axis."""
    if TOKEN_AXIS_OPS:
        return functional.reroute(x, shared, dim=-1, backend=backend)
    return reference_reroute(x, shared)


def reference_partitioned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 shared: int) -> torch.Tensor:
    """``linear([x+, sg(x-)], W, b)``, with ``dfs_kernels.reference``."""
    if hasattr(reference, "partitioned_linear"):
        return reference.partitioned_linear(x, weight, bias, shared)
    return F.linear(_partition(x, shared), weight, bias)


class _PartitionedLinearFunction(torch.autograd.Function):
    """``linear(x, W, b)`` whose input gradient is ``grad @ W[:, :Cp]`` on the first Cp features and zero on
    the rest: the GEMM over the referenced features is never run. First-order gradients only."""

    @staticmethod
    def forward(ctx, input, weight, bias, shared):
        ctx.save_for_backward(input, weight)
        ctx.shared, ctx.has_bias = shared, bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = torch.empty_like(input)
            grad_input[..., :ctx.shared] = grad_output @ weight[:, :ctx.shared]
            grad_input[..., ctx.shared:] = 0
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = rows.t() @ input.reshape(-1, input.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_input, grad_weight, grad_bias, None


class _PartitionedLinear(nn.Linear):
    """``nn.Linear`` whose input gradient reaches only the first ``shared_features`` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 beta: float = 0.5, shared_features: int | None = None, backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.shared_features = round(beta * in_features) if shared_features is None else shared_features
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _PartitionedLinearFunction.apply(input, self.weight, self.bias, self.shared_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_features={self.shared_features}"


PartitionedLinear = getattr(dfs_nn, "PartitionedLinear", None) or _PartitionedLinear
