"""The ``"reference"`` backend: ``dfs_kernels.reference``, the literal eager formulation, behind the
call signature of the other backends. Always available; made of differentiable ATen ops, so it also
serves every backend under ``torch.func`` transforms and forward-mode AD."""

from __future__ import annotations

from .. import reference


class ReferenceOps:
    name = "reference"

    @staticmethod
    def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return reference.partitioned_conv2d(
            input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
        )

    @staticmethod
    def partitioned_conv2d_with_exit_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return reference.partitioned_conv2d_with_exit_pool(
            input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
        )

    @staticmethod
    def partitioned_linear(input, weight, bias, shared_features):
        return reference.partitioned_linear(input, weight, bias, shared_features)

    reroute = staticmethod(reference.reroute)
    exit_reference = staticmethod(reference.exit_reference)
    exit_avg_pool = staticmethod(reference.exit_avg_pool)


OPS = ReferenceOps()
