"""Weight (and bias) gradient of the partitioned convolution, over every input channel.

DFS keeps ``dL/dW`` in full (docs/semantics.md). GEMM view, per group:
``dW[co, (kh, kw, c)] = sum_p dY[p, co] * X[p, (kh, kw, c)]`` with co an output channel of the group,
(kh, kw, c) a tap and an input channel, and p = (n, oh, ow) an output pixel: the reduction runs over
N * H_out * W_out, usually far longer than the C_out x C_in*kH*kW outputs are wide. So the
reduction is split (split-K) over a grid axis when that fills the GPU better; the splits write
float32 partial sums that one deterministic ``sum`` adds (no atomics: reproducible gradients).
The bias gradient ``sum_p dY[p, co]`` rides on the dY tiles already loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common
from ._common import grouped_tile, load_tile

_GPU_CONFIGS = [
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 3),
    ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 2, 4),
]
# Under the interpreter: fewer, larger programs (its cost is per operation, not per element).
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 8}
# The tuning key: what changes the best tile, layouts and precision included (triton adds dtypes).
_KEY = ["N", "H", "W", "H_out", "W_out", "CIN_G", "COUT_G", "PIXELS_PER_SPLIT", "SH", "SW", "KH", "KW",
        "DY_CHANNELS_CONTIGUOUS", "X_PIXELS_CONTIGUOUS", "DOT_PRECISION"]
# Nominal tile used to size split-K before a configuration is chosen.
_NOMINAL_TILE = 64


@triton.jit
def _conv_weight_grad_kernel(
    dy_ptr,  # [N, C_out, H_out, W_out] gradient of the output, any strides
    x_ptr,  # [N, C_in, H, W] input of the forward, any strides
    dw_ptr,  # [SPLITS, C_out, C_in / groups, KH, KW] float32 partial sums, or the gradient itself
    db_ptr,  # [SPLITS, C_out] float32 partial sums or [C_out] (HAS_BIAS), else never written
    N, H, W, H_out, W_out,  # sizes
    CIN_G, COUT_G,  # input and output channels per group
    PIXELS_PER_SPLIT,  # length of the reduction each split covers (a multiple of every BLOCK_K)
    sdyn, sdyc, sdyh, sdyw,  # strides of dy
    sxn, sxc, sxh, sxw,  # strides of x
    sdws, sdwo, sdwc, sdwh, sdww,  # strides of dw (sdws = 0 without split)
    sdbs, sdbo,  # strides of db
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    KH: tl.constexpr, KW: tl.constexpr,
    DY_CHANNELS_CONTIGUOUS: tl.constexpr,  # NHWC dy: the rows (output channels) of its tile are contiguous
    X_PIXELS_CONTIGUOUS: tl.constexpr,  # NCHW x: the rows (pixels) of its tile are contiguous
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # C_out, C_in, pixel tiles
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    # Column tiles are (tap, block of input channels): within a tile every column reads the same
    # shifted pixels, so the x tile is a pixel vector plus a channel vector (cheap addressing,
    # contiguous channels for NHWC) rather than a per-element gather.
    num_pid_c = tl.cdiv(CIN_G, BLOCK_N)
    num_pid_m = tl.cdiv(COUT_G, BLOCK_M)
    num_pid_n = KH * KW * num_pid_c
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)
    tap = pid_n // num_pid_c
    kh = tap // KW
    kw = tap % KW

    # Rows: output channels of this group.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < COUT_G
    co = group * COUT_G + offs_m
    # Columns: input channels of this group at tap (kh, kw).
    offs_n = (pid_n % num_pid_c) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < CIN_G
    x_col = (group * CIN_G + offs_n) * sxc  # [BLOCK_N]
    h_off = kh * DH - PH  # ih = oh * SH + h_off
    w_off = kw * DW - PW

    hw_out = H_out * W_out
    pixels = N * hw_out
    k_start = split * PIXELS_PER_SPLIT
    k_end = tl.minimum(k_start + PIXELS_PER_SPLIT, pixels)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    bias_acc = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        n = offs_k // hw_out
        rem = offs_k % hw_out
        oh = rem // W_out
        ow = rem % W_out
        n64 = n.to(tl.int64)
        a = load_tile(dy_ptr, co * sdyc, n64 * sdyn + oh * sdyh + ow * sdyw, mask_m, mask_k,
                      DY_CHANNELS_CONTIGUOUS)  # [BLOCK_M, BLOCK_K]
        ih = oh * SH + h_off
        iw = ow * SW + w_off
        valid = mask_k & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # padding reads as zero
        b = load_tile(x_ptr, n64 * sxn + ih * sxh + iw * sxw, x_col, valid, mask_n,
                      X_PIXELS_CONTIGUOUS)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_BIAS:
            bias_acc += tl.sum(a.to(ACC_DTYPE), axis=1)

    dw = dw_ptr + split * sdws + co[:, None] * sdwo + (offs_n * sdwc)[None, :] + kh * sdwh + kw * sdww
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if HAS_BIAS:
        if pid_n == 0:  # every column tile saw the same dY rows: one of them writes the bias
            tl.store(db_ptr + split * sdbs + co * sdbo, bias_acc.to(db_ptr.dtype.element_ty), mask=mask_m)


_conv_weight_grad = triton.autotune(configs=_common.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)(_conv_weight_grad_kernel)


def conv2d_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride,
    padding,
    dilation,
    groups: int,
    bias_grad: bool,
    allow_tf32: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weight with the weight's shape and layout, grad_bias [C_out] or an empty tensor)."""
    n, c_in, h, w = input.shape
    c_out, cin_g, kh, kw = weight.shape
    h_out, w_out = grad_output.shape[2], grad_output.shape[3]
    cout_g = c_out // groups
    pixels = n * h_out * w_out
    tiles = triton.cdiv(cout_g, _NOMINAL_TILE) * kh * kw * triton.cdiv(cin_g, _NOMINAL_TILE) * groups
    splits, chunk = _common.weight_grad_split(pixels, tiles, input.device)
    grad_weight = torch.empty_like(weight)  # the weight's layout, as autograd expects
    grad_bias = weight.new_empty((c_out,) if bias_grad else (0,))
    if weight.numel() == 0:
        return grad_weight, grad_bias
    if pixels == 0:
        return grad_weight.zero_(), grad_bias.zero_()
    if splits > 1:
        partial_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        dw = torch.empty((splits, c_out, cin_g, kh, kw), dtype=partial_dtype, device=weight.device)
        db = torch.empty((splits, c_out) if bias_grad else (0,), dtype=partial_dtype, device=weight.device)
        dw_strides = dw.stride()
        db_strides = db.stride() if bias_grad else (0, 0)
    else:
        dw, db = grad_weight, grad_bias
        dw_strides = (0, *grad_weight.stride())
        db_strides = (0, grad_bias.stride(0)) if bias_grad else (0, 0)

    def grid(meta):
        return (triton.cdiv(cout_g, meta["BLOCK_M"]) * kh * kw * triton.cdiv(cin_g, meta["BLOCK_N"]), splits, groups)

    wrap_triton(_conv_weight_grad)[grid](
        grad_output, input, dw, db if bias_grad else dw,
        n, h, w, h_out, w_out, cin_g, cout_g, chunk,
        *grad_output.stride(), *input.stride(), *dw_strides, *db_strides,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, DY_CHANNELS_CONTIGUOUS=grad_output.stride(1) == 1,
        X_PIXELS_CONTIGUOUS=_common.pixels_contiguous(input), HAS_BIAS=bias_grad,
        DOT_PRECISION=_common.dot_precision(input.dtype, allow_tf32),
        ACC_DTYPE=_common.accumulator_dtype(input.dtype),
    )
    if splits > 1:
        grad_weight.copy_(dw.sum(dim=0))
        if bias_grad:
            grad_bias.copy_(db.sum(dim=0))
    return grad_weight, grad_bias


@triton_op("dfs_kernels::triton_conv2d_weight_grad", mutates_args={})
def triton_conv2d_weight_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dL/dW [C_out, C_in / groups, kH, kW] in the weight's layout, dL/db [C_out] when ``bias_grad``
    else an empty [0] tensor). ``weight`` is read for its shape, dtype and layout only."""
    return conv2d_weight_grad(
        grad_output, input, weight, stride, padding, dilation, groups, bias_grad, _common.allow_tf32()
    )
