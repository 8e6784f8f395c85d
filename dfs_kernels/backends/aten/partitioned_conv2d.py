"""``dfs_kernels::partitioned_conv2d`` and ``dfs_kernels::partitioned_conv2d_with_exit_pool`` on ATen:
one convolution forward (oneDNN / cuDNN); in the backward, the shared channels' input gradient by
ATen's convolution into a tensor of its own, then assembled with the referenced channels' zeros (or
the exit's gradient) by the compiled ``pad_channels`` (csrc/partitioned_conv2d.cpp). Autograd formulas
and fakes: ``dfs_kernels.backends._partitioned_conv``."""

from __future__ import annotations

from .._partitioned_conv import register_partitioned_conv2d_ops

_ops = register_partitioned_conv2d_ops("")
partitioned_conv2d = _ops.partitioned_conv2d
partitioned_conv2d_with_exit_pool = _ops.partitioned_conv2d_with_exit_pool
