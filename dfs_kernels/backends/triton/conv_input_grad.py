"""Input gradient of the partitioned convolution, for the shared channels only.

``dL/dx+ = conv_input_grad(dL/dy, W+)`` and ``dL/dx- = 0`` (docs/semantics.md). One launch writes the
whole [N, C_in, H, W] gradient: the programs of shared channel tiles run the GEMM, those of
referenced tiles only fill (zeros, or the exit's broadcast gradient in the fused DFS stage), so
there is no separate zeros tensor, no slice copy and no GEMM work for referenced channels.

GEMM view, per group: ``dX[m, c] = sum_k dY[m, k] * W[k, c]`` with m = (n, ih, iw) an input pixel,
c a shared input channel, k = (kh, kw, co) a tap and an output channel of the group, where
``oh = (ih + pH - kh * dH) / sH`` must be a whole number in [0, H_out).

Stride > 1 without inserted zeros: the input pixels are split into sH * sW stride phases
(ih % sH, iw % sW). Within a phase, a tap either reaches a whole output pixel for every pixel or for
none, so each program walks its phase's taps only; nothing is computed for the taps that would read
the zeros a transposed convolution inserts between output pixels. The taps of a phase are a lattice
(along H: kh = kh0, kh0 + step, ... with step = sH / gcd(sH, dH)), so the K loop enumerates exactly
them and its body has no branch: Triton software-pipelines only loops whose loads are unconditional,
and a test on the tap inside the loop left ``num_stages`` without effect.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common
from ._common import grouped_tile, load_tile, store_tile

# The same implicit-GEMM shape family as the forward (pixels x channels x taps * channels), but the
# narrowest tile on 4 warps: on 2, triton 3.6 spills registers in the plain bfloat16 channels-last
# gradient (and pipelines 3 tiles deep, not 4). tests/triton_compile_check.py --pipelining checks these.
_GPU_CONFIGS = [
    (meta, 4, stages) if (meta["BLOCK_M"], meta["BLOCK_N"], warps) == (64, 32, 2) else (meta, warps, stages)
    for meta, warps, stages in _common.IMPLICIT_GEMM_GPU_CONFIGS
]
# 4-byte operands (TF32 or IEEE float32): K tiles of 32 only. Those of 64 take 144-192 KiB of shared
# memory at 3 stages (one program per SM, and more than an A100 has) and spill registers on triton 3.6.
_GPU_CONFIGS_4_BYTES = [config for config in _GPU_CONFIGS if config[0]["BLOCK_K"] == 32]
_INTERPRETER_CONFIG = _common.IMPLICIT_GEMM_INTERPRETER_CONFIG
# The tuning key: what changes the best tile, layouts and precision included (triton adds dtypes).
_KEY = ["N", "H", "W", "H_out", "W_out", "CIN_G", "COUT_G", "CP", "SH", "SW", "KH", "KW",
        "DY_PIXELS_CONTIGUOUS", "DX_PIXELS_CONTIGUOUS", "DOT_PRECISION"]


@triton.jit
def _first_tap(phase, pad, dilation, stride, tap_step, KERNEL: tl.constexpr):
    """The smallest tap k with (phase + pad - k * dilation) divisible by stride, or KERNEL if none:
    the condition repeats with period tap_step, so the first one, if any, lies in [0, tap_step)."""
    first = tap_step * 0 + KERNEL  # a run-time integer: it is carried through the loop
    for k in range(0, tap_step):
        hit = ((phase + pad - k * dilation) % stride == 0) & (k < KERNEL)
        first = tl.minimum(first, tl.where(hit, k, KERNEL))
    return first


@triton.jit
def _referenced_fill(gp_ptr, n, c, mask_m, mask_n, CP, sgn, sgc, inv_hw,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FILL_POOLED: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """What the referenced channels c >= CP receive: nothing from the convolution (the point of DFS),
    and in the fused stage the exit's gradient gp / (H * W), which reaches exactly these channels.
    gp is [N, C_in]: 32-bit offsets suffice, and spare registers that the epilogue is short of."""
    if FILL_POOLED:
        mask = mask_m[:, None] & (mask_n & (c >= CP))[None, :]
        return tl.load(gp_ptr + n[:, None] * sgn + c[None, :] * sgc, mask=mask, other=0.0).to(ACC_DTYPE) * inv_hw
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)


@triton.jit
def _conv_input_grad_kernel(
    dy_ptr,  # [N, C_out, H_out, W_out] gradient of the output, any strides
    w_ptr,  # [C_out, C_in / groups, KH, KW], any strides
    gp_ptr,  # [N, C_in] gradient of the exit's pooled features (FILL_POOLED), else never read
    dx_ptr,  # [N, C_in, H, W] output, NCHW or NHWC; every element is written
    N, H, W, H_out, W_out,  # sizes
    CIN_G, COUT_G,  # input and output channels per group
    CP,  # shared channels: [0, CP) get the convolution's gradient, [CP, C_in) the fill
    H_PHASE, W_PHASE,  # cdiv(H, SH), cdiv(W, SW): rows and columns of the largest stride phase
    inv_hw,  # 1 / (H * W): the exit's mean pooling spreads its gradient evenly
    sdyn, sdyc, sdyh, sdyw,  # strides of dy
    swo, swc, swh, sww,  # strides of the weight
    sgn, sgc,  # strides of gp
    sdxn, sdxc, sdxh, sdxw,  # strides of dx
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation of the forward convolution
    TAP_STEP_H, TAP_STEP_W,  # SH / gcd(SH, DH), SW / gcd(SW, DW): period of a phase's taps
    KH: tl.constexpr, KW: tl.constexpr,
    DY_PIXELS_CONTIGUOUS: tl.constexpr, DX_PIXELS_CONTIGUOUS: tl.constexpr,  # NCHW dy / dx (see load_tile)
    FILL_POOLED: tl.constexpr,  # fill [CP, C_in) with gp / (H * W) instead of zeros
    DOT_PRECISION: tl.constexpr,
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # pixels, C_in, C_out tiles
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    phase = tl.program_id(1)  # stride phase (ih % SH, iw % SW)
    group = tl.program_id(2)
    phase_h = phase // SW
    phase_w = phase % SW
    phase_pixels = H_PHASE * W_PHASE
    M = N * phase_pixels
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(CIN_G, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    # Rows: input pixels (n, ih, iw) of this phase, ih = phase_h + th * SH.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = offs_m // phase_pixels
    t = offs_m % phase_pixels
    th = t // W_PHASE
    tw = t % W_PHASE
    ih = phase_h + th * SH
    iw = phase_w + tw * SW
    mask_m = (offs_m < M) & (ih < H) & (iw < W)  # the last row/column of a phase may not exist
    n64 = n.to(tl.int64)

    # Columns: input channels of this group.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c = group * CIN_G + offs_n
    mask_n = offs_n < CIN_G
    shared = c < CP
    if group * CIN_G + pid_n * BLOCK_N >= CP:
        # A tile of referenced channels only: fill it, no GEMM.
        fill = _referenced_fill(gp_ptr, n, c, mask_m, mask_n, CP, sgn, sgc, inv_hw, BLOCK_M, BLOCK_N,
                                FILL_POOLED, ACC_DTYPE)
        dx_rows = n64 * sdxn + ih * sdxh + iw * sdxw  # [BLOCK_M]
        store_tile(dx_ptr, dx_rows, c * sdxc, mask_m, mask_n, fill.to(dx_ptr.dtype.element_ty), DX_PIXELS_CONTIGUOUS)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        # This phase's taps: kh0, kh0 + TAP_STEP_H, ... (none when kh0 >= KH), the same along W.
        kh0 = _first_tap(phase_h, PH, DH, SH, TAP_STEP_H, KH)
        kw0 = _first_tap(phase_w, PW, DW, SW, TAP_STEP_W, KW)
        taps_w = tl.cdiv(KW - kw0, TAP_STEP_W)
        num_kb = tl.cdiv(COUT_G, BLOCK_K)
        # One flat loop over (tap, channel block), as in the forward: only the innermost loop is pipelined.
        for it in range(0, tl.cdiv(KH - kh0, TAP_STEP_H) * taps_w * num_kb):
            tap = it // num_kb
            k0 = (it % num_kb) * BLOCK_K
            kh = kh0 + (tap // taps_w) * TAP_STEP_H
            kw = kw0 + (tap % taps_w) * TAP_STEP_W
            # oh * SH = ih + PH - kh * DH, a whole number for every pixel of the phase at these taps;
            # exact divisions, so truncating and flooring division agree for negative numerators.
            oh = th + (phase_h + PH - kh * DH) // SH
            ow = tw + (phase_w + PW - kw * DW) // SW
            valid = mask_m & (oh >= 0) & (oh < H_out) & (ow >= 0) & (ow < W_out)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < COUT_G
            co = group * COUT_G + offs_k
            a = load_tile(dy_ptr, n64 * sdyn + oh * sdyh + ow * sdyw, co * sdyc, valid, mask_k,
                          DY_PIXELS_CONTIGUOUS)  # [BLOCK_M, BLOCK_K]
            # Weights of referenced channels are never read: a tile straddling CP computes
            # zeros there, which are not stored (the fill is, below).
            b = tl.load(
                w_ptr + co[:, None] * swo + offs_n[None, :] * swc + kh * swh + kw * sww,
                mask=mask_k[:, None] & (mask_n & shared)[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_N]
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dx_rows = n64 * sdxn + ih * sdxh + iw * sdxw  # computed after the loop: fewer registers live in it
        store_tile(dx_ptr, dx_rows, c * sdxc, mask_m, mask_n & shared, acc.to(dx_ptr.dtype.element_ty),
                   DX_PIXELS_CONTIGUOUS)
        if group * CIN_G + pid_n * BLOCK_N + BLOCK_N > CP:
            # The tile straddling CP: its referenced channels get the fill, stored once the
            # accumulator's registers are free (merging the two in registers spilled).
            fill = _referenced_fill(gp_ptr, n, c, mask_m, mask_n, CP, sgn, sgc, inv_hw, BLOCK_M, BLOCK_N,
                                FILL_POOLED, ACC_DTYPE)
            store_tile(dx_ptr, dx_rows, c * sdxc, mask_m, mask_n & (c >= CP), fill.to(dx_ptr.dtype.element_ty),
                       DX_PIXELS_CONTIGUOUS)


_conv_input_grad = triton.autotune(configs=_common.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)(_conv_input_grad_kernel)
_conv_input_grad_4_bytes = triton.autotune(
    configs=_common.configs(_GPU_CONFIGS_4_BYTES, _INTERPRETER_CONFIG), key=_KEY
)(_conv_input_grad_kernel)


def gpu_configs(dtype: torch.dtype) -> list[tuple[dict, int, int]]:
    """The (meta-parameters, num_warps, num_stages) autotuned on a GPU for operands of ``dtype``."""
    return _GPU_CONFIGS_4_BYTES if dtype.itemsize >= 4 else _GPU_CONFIGS


def conv2d_input_grad(
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    input_size,
    channels_last: bool,
    stride,
    padding,
    dilation,
    groups: int,
    shared_channels: int,
    allow_tf32: bool,
    grad_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    n, c_in, h, w = input_size
    c_out, cin_g, kh, kw = weight.shape
    h_out, w_out = grad_output.shape[2], grad_output.shape[3]
    grad_input = _common.empty_feature_map(input_size, like=grad_output, channels_last=channels_last)
    h_phase, w_phase = triton.cdiv(h, stride[0]), triton.cdiv(w, stride[1])
    pixels = n * h_phase * w_phase
    if grad_input.numel() == 0:
        return grad_input

    def grid(meta):
        return (
            triton.cdiv(pixels, meta["BLOCK_M"]) * triton.cdiv(cin_g, meta["BLOCK_N"]),
            stride[0] * stride[1],
            groups,
        )

    gp = grad_pooled if grad_pooled is not None else grad_output
    kernel = _conv_input_grad_4_bytes if grad_output.dtype.itemsize >= 4 else _conv_input_grad
    wrap_triton(kernel)[grid](
        grad_output, weight, gp, grad_input,
        n, h, w, h_out, w_out, cin_g, c_out // groups, shared_channels,
        h_phase, w_phase, 1.0 / (h * w),
        *grad_output.stride(), *weight.stride(),
        *(grad_pooled.stride() if grad_pooled is not None else (0, 0)),
        *grad_input.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        stride[0] // math.gcd(stride[0], dilation[0]), stride[1] // math.gcd(stride[1], dilation[1]),
        KH=kh, KW=kw, DY_PIXELS_CONTIGUOUS=_common.pixels_contiguous(grad_output),
        DX_PIXELS_CONTIGUOUS=_common.pixels_contiguous(grad_input), FILL_POOLED=grad_pooled is not None,
        DOT_PRECISION=_common.dot_precision(grad_output.dtype, allow_tf32),
        ACC_DTYPE=_common.accumulator_dtype(grad_output.dtype),
    )
    return grad_input


@triton_op("dfs_kernels::triton_partitioned_conv2d_input_grad", mutates_args={})
def triton_partitioned_conv2d_input_grad(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shared_channels: int,
    grad_pooled: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N, C_in, H, W] in ``input``'s layout (``input`` is read for its shape and layout only): the
    convolution's input gradient on channels [0, shared_channels); on the rest zeros, or
    ``grad_pooled`` [N, C_in] / (H * W) broadcast over H, W when given (the fused DFS stage).
    The schema, fake and autograd of every backend's ``partitioned_conv2d_input_grad``."""
    return conv2d_input_grad(
        grad_output, weight, list(input.shape), _common.is_channels_last(input), stride, padding, dilation, groups,
        shared_channels, _common.allow_tf32(), grad_pooled,
    )
