"""The ``"triton"`` backend: the DFS ops as Triton kernels (one op per file).

- ``conv_forward``: implicit-GEMM convolution over all input channels, bias fused, any layout,
  stride / padding / dilation / groups (``dfs_kernels::triton_partitioned_conv2d``).
- ``conv_input_grad``: input gradient of the shared channels only, written with the referenced
  channels' fill into one full-size tensor; stride phases skip the inserted zeros.
- ``conv_weight_grad``: weight (and bias) gradient over all input channels, split-K when the
  reduction over N * H_out * W_out is long next to the output tile count.
- ``exit_pool``: the exit's pooled read of ``[sg(x+), x-]`` and its backward into [Cp:] only.
- ``referencing``: reroute and exit_reference, split-point views and their one-pass gradient assembly.
- ``fused_stage``: conv + exit pooling from one read of x, and one gradient tensor for both.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
when this package is first imported: for tests and debugging, never chosen by ``"auto"``).
This package imports triton; ``dfs_kernels.backends`` imports it only when the backend is used.
Supported dtypes: float32 (TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set), float16,
bfloat16 (GPU only); accumulation is always float32.
"""

from __future__ import annotations

import torch

# Importing the op files registers their ops (dfs_kernels::triton_*), fakes and autograd formulas.
from . import conv_forward, conv_input_grad, conv_weight_grad, exit_pool, fused_stage  # noqa: F401
from . import referencing as _referencing
from ._common import INTERPRET

__all__ = [
    "INTERPRET",
    "SUPPORTED_DTYPES",
    "exit_avg_pool",
    "exit_reference",
    "partitioned_conv2d",
    "partitioned_conv2d_with_exit_pool",
    "reroute",
]

# bfloat16 has no NumPy type: the interpreter cannot run it.
SUPPORTED_DTYPES = (torch.float32, torch.float16) if INTERPRET else (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"the 'triton' backend supports {names}{' under the Triton interpreter' if INTERPRET else ''}, "
            f"got {tensor.dtype}; use backend='aten' for it"
        )


def _allow_tf32() -> bool:
    # Read per call (torch.compile guards on it): TF32 is opted into as for matmuls, through
    # torch.backends.cuda.matmul.allow_tf32 or torch.set_float32_matmul_precision("high").
    return bool(torch.backends.cuda.matmul.allow_tf32)


def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    """Validated arguments from ``dfs_kernels.functional`` (padding already numeric)."""
    _check_dtype(input)
    return torch.ops.dfs_kernels.triton_partitioned_conv2d(
        input, weight, bias, list(stride), list(padding), list(dilation), groups, shared_channels, _allow_tf32()
    )


def partitioned_conv2d_with_exit_pool(input, weight, bias, stride, padding, dilation, groups, shared_channels):
    """(partitioned_conv2d(...), exit_avg_pool(input, shared_channels)) from one read of input."""
    _check_dtype(input)
    return torch.ops.dfs_kernels.triton_partitioned_conv2d_with_exit_pool(
        input, weight, bias, list(stride), list(padding), list(dilation), groups, shared_channels, _allow_tf32()
    )


def exit_avg_pool(x, shared_channels):
    _check_dtype(x)
    return exit_pool.exit_avg_pool(x, shared_channels)


def reroute(x, shared_channels):
    _check_dtype(x)
    return _referencing.reroute(x, shared_channels)


def exit_reference(x, shared_channels):
    _check_dtype(x)
    return _referencing.exit_reference(x, shared_channels)
