"""The pooled read of an exit that references ``[sg(x+), x-]``: global average pooling whose
gradient reaches the referenced channels only (docs/semantics.md).

Forward: mean over H, W with float32 accumulation. Backward: ``grad / (H * W)`` broadcast into
channels [Cp, C) and zeros into [0, Cp), one launch writing every element of the gradient.

Registered as ``dfs_kernels::triton_exit_avg_pool`` and
``dfs_kernels::triton_exit_avg_pool_backward``, with the schemas, fakes and autograd formulas of
every backend's exit pooling (``dfs_kernels.ops.exit_avg_pool``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common

_POOL_CONFIGS = [
    ({"BLOCK_HW": 64, "BLOCK_C": 32}, 4, 2),
    ({"BLOCK_HW": 128, "BLOCK_C": 16}, 4, 2),
    ({"BLOCK_HW": 16, "BLOCK_C": 64}, 4, 2),
]
_BROADCAST_CONFIGS = [
    ({"BLOCK_HW": 64, "BLOCK_C": 64}, 4, 1),
    ({"BLOCK_HW": 128, "BLOCK_C": 32}, 4, 1),
    ({"BLOCK_HW": 32, "BLOCK_C": 128}, 4, 1),
]
_INTERPRETER_CONFIG = {"BLOCK_HW": 64, "BLOCK_C": 16}


@triton.jit
def _exit_pool_kernel(
    x_ptr,  # [N, C, H, W], any strides
    out_ptr,  # [N, C] pooled features, contiguous
    C, H, W,  # sizes
    inv_hw,  # 1 / (H * W)
    sxn, sxc, sxh, sxw,  # strides of x
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,  # tile of pixels x channels
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 operands
):
    n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    base = x_ptr + n.to(tl.int64) * sxn + offs_c * sxc  # [BLOCK_C]
    acc = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
    hw = H * W
    for p0 in range(0, hw, BLOCK_HW):
        offs_p = p0 + tl.arange(0, BLOCK_HW)
        mask_p = offs_p < hw
        h = offs_p // W
        w = offs_p % W
        tile = tl.load(
            base[None, :] + (h * sxh + w * sxw)[:, None], mask=mask_p[:, None] & mask_c[None, :], other=0.0
        )  # [BLOCK_HW, BLOCK_C]
        acc += tl.sum(tile.to(ACC_DTYPE), axis=0)
    tl.store(out_ptr + n * C + offs_c, (acc * inv_hw).to(out_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def _exit_pool_backward_kernel(
    gp_ptr,  # [N, C] gradient of the pooled features, any strides
    dx_ptr,  # [N, C, H, W] output, NCHW or NHWC; every element is written
    C, H, W,  # sizes
    CP,  # shared channels: [0, CP) get zeros (the stop-gradient of x+)
    inv_hw,  # 1 / (H * W)
    sgn, sgc,  # strides of gp
    sdxn, sdxc, sdxh, sdxw,  # strides of dx
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)  # (image, pixel block), flattened: no 65535 limit on the batch
    pid_c = tl.program_id(1)
    hw = H * W
    num_pb = tl.cdiv(hw, BLOCK_HW)
    n = pid // num_pb
    offs_p = (pid % num_pb) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < hw
    mask_c = offs_c < C
    n64 = n.to(tl.int64)
    g = tl.load(gp_ptr + n64 * sgn + offs_c * sgc, mask=mask_c & (offs_c >= CP), other=0.0).to(ACC_DTYPE)
    tile = tl.zeros((BLOCK_HW, BLOCK_C), dtype=ACC_DTYPE) + (g * inv_hw)[None, :]
    h = offs_p // W
    w = offs_p % W
    dx = dx_ptr + n64 * sdxn + offs_c[None, :] * sdxc + (h * sdxh + w * sdxw)[:, None]
    tl.store(dx, tile.to(dx_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


_exit_pool = triton.autotune(configs=_common.configs(_POOL_CONFIGS, _INTERPRETER_CONFIG), key=["C", "H", "W"])(_exit_pool_kernel)
_exit_pool_backward = triton.autotune(configs=_common.configs(_BROADCAST_CONFIGS, _INTERPRETER_CONFIG), key=["C", "H", "W"])(
    _exit_pool_backward_kernel
)


def exit_pool_forward(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out = x.new_empty((n, c))
    if out.numel() == 0:
        return out
    if h * w == 0:  # the mean of nothing, as torch's mean
        return out.fill_(float("nan"))

    def grid(meta):
        return (n, triton.cdiv(c, meta["BLOCK_C"]))

    wrap_triton(_exit_pool)[grid](
        x, out, c, h, w, 1.0 / (h * w), *x.stride(), ACC_DTYPE=_common.accumulator_dtype(x.dtype)
    )
    return out


def exit_pool_backward(grad_pooled: torch.Tensor, input_size, shared_channels: int, channels_last: bool) -> torch.Tensor:
    n, c, h, w = input_size
    grad_input = _common.empty_feature_map(input_size, like=grad_pooled, channels_last=channels_last)
    if grad_input.numel() == 0:
        return grad_input

    def grid(meta):
        return (n * triton.cdiv(h * w, meta["BLOCK_HW"]), triton.cdiv(c, meta["BLOCK_C"]))

    wrap_triton(_exit_pool_backward)[grid](
        grad_pooled, grad_input, c, h, w, shared_channels, 1.0 / (h * w), *grad_pooled.stride(), *grad_input.stride(),
        ACC_DTYPE=_common.accumulator_dtype(grad_pooled.dtype),
    )
    return grad_input


@triton_op("dfs_kernels::triton_exit_avg_pool", mutates_args={})
def triton_exit_avg_pool(input: torch.Tensor, shared_channels: int) -> torch.Tensor:
    """mean([sg(x+), x-], dim=(2, 3)): [N, C, H, W] -> [N, C]."""
    return exit_pool_forward(input)


@triton_op(
    "dfs_kernels::triton_exit_avg_pool_backward",
    mutates_args={},
    schema="(Tensor grad_pooled, SymInt[] input_size, int shared_channels, bool channels_last) -> Tensor",
)
def triton_exit_avg_pool_backward(
    grad_pooled: torch.Tensor, input_size: list[int], shared_channels: int, channels_last: bool
) -> torch.Tensor:
    """grad_pooled [N, C] / (H * W) broadcast into channels [shared_channels, C) of an
    [N, C, H, W] tensor (NHWC if ``channels_last``), zeros into [0, shared_channels)."""
    return exit_pool_backward(grad_pooled, input_size, shared_channels, channels_last)
