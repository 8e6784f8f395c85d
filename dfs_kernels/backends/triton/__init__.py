"""The ``"triton"`` backend: the DFS ops as Triton kernels (one op per file), registered as
``dfs_kernels::triton_*`` ops with the schemas of the compiled ops, so that the fakes and autograd
formulas of ``dfs_kernels.ops`` serve them too.

- ``conv_forward``: implicit-GEMM convolution over all input channels, bias fused, any layout,
  stride / padding / dilation / groups (``triton_partitioned_conv2d``).
- ``conv_input_grad``: input gradient of the shared channels only, written with the referenced
  channels' fill into one full-size tensor; stride phases skip the inserted zeros.
- ``conv_weight_grad``: weight (and bias) gradient over all input channels, split-K when the
  reduction over N * H_out * W_out is long next to the output tile count.
- ``exit_pool``: the exit's pooled read of ``[sg(x+), x-]`` and its backward into [Cp:] only.
- ``merge_channels``: the one-pass gradient assembly of a split point (reroute, exit_reference).
- ``fused_stage``: conv + exit pooling from one read of x, and one gradient tensor for both.
- ``linear_input_grad``: the partitioned linear layer's input gradient, the shared features' GEMM
  and the referenced features' zeros in one launch (its forward and weight gradient are ATen's GEMM).

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``
when this package is first imported: for tests and debugging, never chosen by ``"auto"``).
This package imports triton; ``dfs_kernels.backends`` imports it only when the backend is used.
Supported dtypes: float32 (TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is set), float16,
bfloat16 (GPU only); under the interpreter also float64 (for ``gradcheck``), never bfloat16.
Accumulation is float32 (float64 for float64 operands).
"""

from __future__ import annotations

import torch

from ... import ops

# Importing the op files defines their ops (dfs_kernels::triton_*).
from . import (  # noqa: F401
    conv_forward,
    conv_input_grad,
    conv_weight_grad,
    exit_pool,
    fused_stage,
    linear_input_grad,
    merge_channels,
)
from ._common import INTERPRET

__all__ = ["INTERPRET", "OPS", "SUPPORTED_DTYPES"]

# bfloat16 has no NumPy type: the interpreter cannot run it. float64 runs only there.
SUPPORTED_DTYPES = (
    (torch.float32, torch.float16, torch.float64) if INTERPRET else (torch.float32, torch.float16, torch.bfloat16)
)


def _check_dtype(tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"the 'triton' backend supports {names}{' under the Triton interpreter' if INTERPRET else ''}, "
            f"got {tensor.dtype}; use backend='aten' for it"
        )


ops.register_prefix("triton_", "triton_")
OPS = ops.OpSet(name="triton", conv_prefix="triton_", glue_prefix="triton_", check_input=_check_dtype)
