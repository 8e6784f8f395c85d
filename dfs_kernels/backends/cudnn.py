"""The ``"cudnn"`` backend: the compiled library's cuDNN ops (csrc/cuda/), for CUDA tensors.

- ``dfs_kernels::cudnn_partitioned_conv2d`` / ``..._with_exit_pool``: forward and weight gradient by
  cuDNN through ATen, as in ``"aten"``. The shared channels' input gradient
  (``cudnn_partitioned_conv2d_input_grad``) is cuDNN's backward-data convolution called directly, with
  an output descriptor whose strides are those of the full-size gradient, so that it writes channels
  [0, Cp) in place, while one kernel of ours writes channels [Cp, C) (zeros, or the exit's pooled
  gradient in a DFS stage). No temporary, no copy. Where cuDNN declines the strided output (or is
  disabled), that convolution falls back to ATen's plus a copy into the slice
  (csrc/cuda/cudnn_input_grad.h).
- ``dfs_kernels::cudnn_partitioned_linear`` / ``..._input_grad`` (csrc/cuda/partitioned_linear_cuda.cpp):
  cuBLAS GEMMs through ATen; the input gradient's GEMM writes features [0, Cp) of the full gradient in
  place, with the gradient's leading dimension.
- ``exit_avg_pool``, ``reroute``, ``exit_reference``: the ``"aten"`` ops (their CUDA kernels).

Importing this module registers the fakes, autograd and FLOP formulas of the ``cudnn_`` ops.
"""

from __future__ import annotations

from .. import ops
from . import aten  # noqa: F401  (the exit-pooling and channel ops it shares)

ops.register_prefix("cudnn_", None)
OPS = ops.OpSet(name="cudnn", conv_prefix="cudnn_", glue_prefix="")
