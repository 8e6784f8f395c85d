"""``OpSet``: the calls the functional layer makes into one backend's registered ops."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from .. import _library
from .channels import ExitReference, Reroute
from .exit_avg_pool import pooled_feature_map


# The compiled split points (csrc/autograd/split_point_autograd.cpp) serve the "" glue prefix in eager mode.
# Traced code keeps the Python Functions: torch.compile cannot functionalize a custom op whose outputs are
# views of its input.
_COMPILED_SPLIT_POINTS = _library.has_autograd_kernel("dfs_kernels::reroute")


def _no_check(tensor: torch.Tensor) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class OpSet:
    """A backend whose DFS ops are registered ops: ``torch.ops.dfs_kernels.{conv_prefix}partitioned_conv2d``,
    ``..._with_exit_pool`` and ``{conv_prefix}partitioned_linear``, ``{glue_prefix}exit_avg_pool`` and,
    for the split-point views, ``{glue_prefix}merge_channels``. Arguments come validated from
    ``dfs_kernels.functional`` (padding numeric, ``dim`` a non-negative channel axis); ``check_input``
    rejects what the kernels cannot run (the Triton dtypes)."""

    name: str
    conv_prefix: str
    glue_prefix: str
    check_input: Callable[[torch.Tensor], None] = _no_check

    def _op(self, prefix: str, name: str):
        return getattr(torch.ops.dfs_kernels, prefix + name)

    def partitioned_conv2d(self, input, weight, bias, stride, padding, dilation, groups, shared_channels):
        self.check_input(input)
        return self._op(self.conv_prefix, "partitioned_conv2d")(
            input, weight, bias, list(stride), list(padding), list(dilation), groups, shared_channels
        )

    def partitioned_conv2d_with_exit_pool(self, input, weight, bias, stride, padding, dilation, groups,
                                          shared_channels):
        self.check_input(input)
        return self._op(self.conv_prefix, "partitioned_conv2d_with_exit_pool")(
            input, weight, bias, list(stride), list(padding), list(dilation), groups, shared_channels
        )

    def partitioned_linear(self, input, weight, bias, shared_features):
        self.check_input(input)
        return self._op(self.conv_prefix, "partitioned_linear")(input, weight, bias, shared_features)

    def exit_avg_pool(self, x, shared_channels, dim=1):
        self.check_input(x)
        return self._op(self.glue_prefix, "exit_avg_pool")(pooled_feature_map(x, dim), shared_channels)

    def reroute(self, x, shared_channels, dim=1):
        self.check_input(x)
        if _COMPILED_SPLIT_POINTS and self.glue_prefix == "" and not torch.compiler.is_compiling():
            return torch.ops.dfs_kernels.reroute.default(x, shared_channels, dim)
        return Reroute.apply(x, shared_channels, dim, self.glue_prefix)

    def exit_reference(self, x, shared_channels, dim=1):
        self.check_input(x)
        if _COMPILED_SPLIT_POINTS and self.glue_prefix == "" and not torch.compiler.is_compiling():
            return torch.ops.dfs_kernels.exit_reference.default(x, shared_channels, dim)
        return ExitReference.apply(x, shared_channels, dim, self.glue_prefix)
