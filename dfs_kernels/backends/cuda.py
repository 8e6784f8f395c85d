"""The ``"cuda"`` backend: the DFS ops of the compiled library's CUDA build (csrc/cuda/), for CUDA tensors.

- ``partitioned_conv2d`` / ``partitioned_conv2d_with_exit_pool`` (``dfs_kernels::cuda_*``): forward and
  weight gradient by cuDNN through ATen, as in ``"aten"``; the shared channels' input gradient by
  cuDNN's backward-data convolution called directly, with an output descriptor whose strides are those
  of the full-size gradient, so that it writes channels [0, Cp) in place, while one kernel of ours
  writes channels [Cp, C) (zeros, or the exit's pooled gradient in a DFS stage). No temporary, no copy.
  Where cuDNN declines the strided output (or is disabled), that convolution falls back to ATen's
  plus a copy into the slice (csrc/cuda/cudnn_input_grad.h).
- ``reroute``, ``exit_reference``, ``exit_avg_pool``: the compiled library's CUDA kernels, shared with
  ``"aten"`` (one-pass gradient assembly ``merge_channels``; ``exit_avg_pool_backward``, which writes
  the referenced channels' broadcast gradient and the shared channels' zeros in one pass; the pooling
  forward is ATen's mean).

Autograd formulas and fakes are those of ``"aten"`` (``dfs_kernels.backends._partitioned_conv``).
"""

from __future__ import annotations

from ._partitioned_conv import register_partitioned_conv2d_ops
from .aten import exit_avg_pool, exit_reference, reroute

__all__ = [
    "exit_avg_pool", "exit_reference", "partitioned_conv2d", "partitioned_conv2d_with_exit_pool", "reroute",
]

_ops = register_partitioned_conv2d_ops("cuda_")
partitioned_conv2d = _ops.partitioned_conv2d
partitioned_conv2d_with_exit_pool = _ops.partitioned_conv2d_with_exit_pool
