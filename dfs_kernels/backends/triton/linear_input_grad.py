"""The partitioned linear layer of the "triton" backend.

``triton_partitioned_linear_input_grad``: ``dL/dx+ = dL/dy @ W[:, :Cp]`` and ``dL/dx- = 0`` for x
[..., in_features] split on its last axis. One launch writes the whole [M, in_features] gradient
(M = the product of the leading axes): the programs of tiles of shared features run the GEMM over the
output features, those of referenced features only store zeros, so there is no zeros tensor, no slice
copy and no GEMM work for the referenced features. A tile straddling Cp never reads the referenced
columns of W (masked loads give zeros there).

``triton_partitioned_linear``: the forward is ATen's GEMM (``linear``), as is the weight gradient of
the family's backward (``dfs_kernels.ops.partitioned_linear``): a plain GEMM that cuBLAS already runs
at its best; DFS changes only the input gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common
from ._common import grouped_tile

# The implicit-GEMM convolutions' tiles (rows x input features x output features) fit a plain GEMM.
_GPU_CONFIGS = _common.IMPLICIT_GEMM_GPU_CONFIGS
_INTERPRETER_CONFIG = _common.IMPLICIT_GEMM_INTERPRETER_CONFIG
_KEY = ["M", "IN_FEATURES", "OUT_FEATURES", "CP", "DOT_PRECISION"]


@triton.jit
def _linear_input_grad_kernel(
    dy_ptr,  # [M, OUT_FEATURES] gradient of the output, any strides
    w_ptr,  # [OUT_FEATURES, IN_FEATURES] weight, any strides
    dx_ptr,  # [M, IN_FEATURES] output; every element is written
    M, IN_FEATURES, OUT_FEATURES,
    CP,  # shared features: [0, CP) get dy @ W[:, :CP], [CP, IN_FEATURES) zeros
    sdym, sdyk,  # strides of dy
    swk, swn,  # strides of the weight
    sdxm, sdxn,  # strides of dx
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # rows, input, output features
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(IN_FEATURES, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < IN_FEATURES
    shared = offs_n < CP
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    if pid_n * BLOCK_N < CP:  # a tile of referenced features only stores the zeros
        offs_m64 = offs_m.to(tl.int64)
        for k0 in range(0, OUT_FEATURES, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < OUT_FEATURES
            a = tl.load(dy_ptr + offs_m64[:, None] * sdym + offs_k[None, :] * sdyk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            b = tl.load(w_ptr + offs_k[:, None] * swk + offs_n[None, :] * swn,
                        mask=mask_k[:, None] & (mask_n & shared)[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    tl.store(dx_ptr + offs_m.to(tl.int64)[:, None] * sdxm + offs_n[None, :] * sdxn,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_linear_input_grad = triton.autotune(configs=_common.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)(
    _linear_input_grad_kernel
)


def _check_arguments(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, shared_features: int,
                     op: str) -> None:
    """The checks of the aten op (csrc/partitioned_linear.cpp), for direct calls: the kernel would read out of
    bounds or silently write a wrong gradient otherwise."""
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"{op}: input must be [..., in_features={in_features}], got shape {tuple(input.shape)}")
    if not 0 <= shared_features <= in_features:
        raise ValueError(f"{op}: shared_features must be in [0, in_features={in_features}], got {shared_features}")
    if tuple(grad_output.shape) != (*input.shape[:-1], out_features):
        raise ValueError(f"{op}: grad_output must be input's leading sizes and out_features={out_features}, got "
                         f"shape {tuple(grad_output.shape)} for input shape {tuple(input.shape)}")


@triton_op("dfs_kernels::triton_partitioned_linear_input_grad", mutates_args={})
def triton_partitioned_linear_input_grad(
    grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, shared_features: int
) -> torch.Tensor:
    """[..., in_features] shaped like ``input`` (read for its shape only), contiguous: ``grad_output @
    weight[:, :shared_features]`` on the first ``shared_features`` features, zeros on the others. The
    schema, fake and autograd of every backend's ``partitioned_linear_input_grad``."""
    _check_arguments(grad_output, input, weight, shared_features, "triton_partitioned_linear_input_grad")
    out_features, in_features = weight.shape
    grad_input = grad_output.new_empty(input.shape)
    if grad_input.numel() == 0:
        return grad_input
    rows = grad_input.numel() // in_features
    dy = grad_output.reshape(rows, out_features)
    dx = grad_input.view(rows, in_features)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(in_features, meta["BLOCK_N"]),)

    wrap_triton(_linear_input_grad)[grid](
        dy, weight, dx, rows, in_features, out_features, shared_features,
        *dy.stride(), *weight.stride(), *dx.stride(),
        DOT_PRECISION=_common.dot_precision(grad_output.dtype, _common.allow_tf32()),
        ACC_DTYPE=_common.accumulator_dtype(grad_output.dtype),
    )
    return grad_input


@triton_op("dfs_kernels::triton_partitioned_linear", mutates_args={})
def triton_partitioned_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, shared_features: int
) -> torch.Tensor:
    """``linear(input, weight, bias)`` by ATen's GEMM; the family's autograd routes its input gradient to
    the kernel above."""
    return torch.nn.functional.linear(input, weight, bias)
