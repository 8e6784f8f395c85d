"""The ``"aten"`` backend: convolutions on ATen (oneDNN on CPU, cuDNN on CUDA), DFS glue in the
compiled ops library (csrc/).

- ``dfs_kernels::partitioned_conv2d`` and ``..._with_exit_pool``: one ATen convolution forward. The
  backward's input gradient (``..._input_grad``) is ATen's convolution restricted to the shared
  channels (with groups: one grouped call for the groups they fill, one for the group they cut),
  assembled with the referenced channels' zeros, or the exit's gradient, by ``pad_channels``.
- ``dfs_kernels::partitioned_linear``: one GEMM forward; the input gradient (``..._input_grad``) is one
  GEMM over the shared features, written by BLAS straight into its slice of the full gradient
  (csrc/partitioned_linear.cpp).
- ``exit_avg_pool`` (its backward writes every element once), ``merge_channels`` (the gradient of a
  split point, one pass): parallel CPU kernels and CUDA kernels.

Importing this module registers the fakes, autograd and FLOP formulas of these ops
(``dfs_kernels.ops``); the registry imports it once the library is loaded.
"""

from __future__ import annotations

from .. import ops

ops.register_prefix("", "")
OPS = ops.OpSet(name="aten", conv_prefix="", glue_prefix="")
