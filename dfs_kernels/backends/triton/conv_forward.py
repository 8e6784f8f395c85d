"""Forward of the partitioned convolution: an implicit-GEMM convolution over every input channel.

DFS changes only the backward (docs/semantics.md): the forward of ``conv([x+, sg(x-)], W)`` is
``conv(x, W) + b``, so the shared and referenced channels go through one reduction.

GEMM view, per group g: ``Y[m, co] = sum_k A[m, k] * B[k, co] + bias[co]`` with
m = (n, oh, ow) an output pixel (M = N * H_out * W_out), co an output channel of the group and
k = (kh, kw, c) a tap and an input channel of the group (K = kH * kW * C_in / groups). A is never
materialized (no im2col): each tile of A is gathered from x, padding read as zeros.

Registered as ``dfs_kernels::triton_partitioned_conv2d`` (a ``torch.library.triton_op``, so
``torch.compile`` sees the kernels), with the schema of ``dfs_kernels::partitioned_conv2d``; its fake
and autograd formula are those of every backend (``dfs_kernels.ops.partitioned_conv2d``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common
from ._common import grouped_tile, load_tile, store_tile

_GPU_CONFIGS = _common.IMPLICIT_GEMM_GPU_CONFIGS
_INTERPRETER_CONFIG = _common.IMPLICIT_GEMM_INTERPRETER_CONFIG
# The tuning key: what changes the best tile, layouts and precision included (triton adds dtypes).
_KEY = ["N", "H", "W", "H_out", "W_out", "CIN_G", "COUT_G", "SH", "SW", "KH", "KW",
        "X_PIXELS_CONTIGUOUS", "Y_PIXELS_CONTIGUOUS", "DOT_PRECISION"]


@triton.jit
def _conv_forward_kernel(
    x_ptr,  # [N, C_in, H, W], any strides (NCHW, NHWC or a strided view)
    w_ptr,  # [C_out, C_in / groups, KH, KW], any strides
    b_ptr,  # [C_out] (HAS_BIAS), else any tensor, never read
    y_ptr,  # [N, C_out, H_out, W_out] output, NCHW or NHWC
    pool_ptr,  # [N, C_in] float32, zero-initialized: sums of x over H, W (POOL), else never touched
    N, H, W, H_out, W_out,  # sizes
    CIN_G, COUT_G,  # input and output channels per group
    C_IN,  # C_in, the row length of pool_ptr
    sxn, sxc, sxh, sxw,  # strides of x (elements)
    swo, swc, swh, sww,  # strides of the weight
    syn, syc, syh, syw,  # strides of y
    SH, SW, PH, PW, DH, DW,  # stride, padding, dilation
    POOL_TAP,  # kh * KW + kw of the tap that reads x[n, c, oh, ow] itself (POOL only)
    KH: tl.constexpr, KW: tl.constexpr,  # kernel size: the tap loop bounds
    X_PIXELS_CONTIGUOUS: tl.constexpr, Y_PIXELS_CONTIGUOUS: tl.constexpr,  # NCHW x / y (see load_tile)
    W_CHANNELS_CONTIGUOUS: tl.constexpr,  # weight stride along C_in is 1 (NHWC weight or 1x1 kernel)
    HAS_BIAS: tl.constexpr,
    POOL: tl.constexpr,  # also sum x over H, W into pool_ptr (fused exit pooling)
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32"
    ACC_DTYPE: tl.constexpr,  # float32, or float64 for float64 operands
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,  # tile of pixels, C_out, C_in
    GROUP_M: tl.constexpr,  # pixel tiles visited together, so their weight tiles stay in L2
):
    pid = tl.program_id(0)
    group = tl.program_id(1)
    hw_out = H_out * W_out
    M = N * hw_out
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(COUT_G, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    # Rows of the tile: output pixels (n, oh, ow).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    n = offs_m // hw_out
    rem = offs_m % hw_out
    oh = rem // W_out
    ow = rem % W_out
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    # int64 batch offsets: a feature map may exceed 2**31 elements at large batch.
    x_group = x_ptr + (group * CIN_G) * sxc
    x_n = n.to(tl.int64) * sxn  # [BLOCK_M]

    # Columns: output channels of this group.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < COUT_G
    co = group * COUT_G + offs_n
    w_co = co * swo  # [BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    # One flat loop over (tap, channel block) rather than two nested ones: the compiler pipelines
    # the innermost loop only, and C_in / BLOCK_K is often just 1 or 2.
    num_kb = tl.cdiv(CIN_G, BLOCK_K)
    for it in range(0, KH * KW * num_kb):
        tap = it // num_kb
        c0 = (it % num_kb) * BLOCK_K
        kh = tap // KW
        kw = tap % KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        valid = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # padding reads as zero
        offs_k = c0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CIN_G
        a = load_tile(x_group, x_n + ih * sxh + iw * sxw, offs_k * sxc, valid, mask_k,
                      X_PIXELS_CONTIGUOUS)  # [BLOCK_M, BLOCK_K]
        b = load_tile(w_ptr + kh * swh + kw * sww, offs_k * swc, w_co, mask_k, mask_n,
                      W_CHANNELS_CONTIGUOUS)  # [BLOCK_K, BLOCK_N]
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if POOL:
            # The fused exit pooling: with stride 1 and an output the size of the input, the tap
            # POOL_TAP reads every x[n, c, h, w] exactly once over the pixel tiles, so the exit's
            # global sums come from the tile already in registers (one read of x for both). Only
            # the first column tile of each group adds them, so each element is added once.
            if (tap == POOL_TAP) & (pid_n == 0):
                a32 = a.to(ACC_DTYPE)
                first_image = (pid_m * BLOCK_M) // hw_out
                last_image = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, M) - 1) // hw_out
                # A tile spans one image or a few (small maps): one partial sum per image.
                for image in range(first_image, last_image + 1):
                    part = tl.sum(tl.where((n == image)[:, None], a32, 0.0), axis=0)  # [BLOCK_K]
                    tl.atomic_add(pool_ptr + image * C_IN + group * CIN_G + offs_k, part, mask=mask_k)

    if HAS_BIAS:  # fused: no separate pass over the output
        acc += tl.load(b_ptr + co, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    store_tile(y_ptr, n.to(tl.int64) * syn + oh * syh + ow * syw, co * syc, mask_m, mask_n,
               acc.to(y_ptr.dtype.element_ty), Y_PIXELS_CONTIGUOUS)


_conv_forward = triton.autotune(configs=_common.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=_KEY)(_conv_forward_kernel)
# The pooling variant accumulates with atomics: benchmarking a configuration must start from zeros.
_conv_forward_pooled = triton.autotune(
    configs=_common.configs(_GPU_CONFIGS, _INTERPRETER_CONFIG), key=_KEY, reset_to_zero=["pool_ptr"]
)(_conv_forward_kernel)


def output_shape(input_shape, weight_shape, stride, padding, dilation) -> list[int]:
    n, _, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    return [
        n,
        c_out,
        _common.conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
        _common.conv_output_size(w, kw, stride[1], padding[1], dilation[1]),
    ]


def pool_tap(input_shape, weight_shape, stride, padding, dilation) -> int | None:
    """The tap (kh * kW + kw) of the convolution that reads x[n, c, oh, ow] at output pixel
    (oh, ow) for every pixel, or None: then the exit's pooling cannot ride on the convolution's
    reads. Exists for stride 1 with an output of the input's size and a tap offset equal to the
    padding, e.g. every 3x3 / padding 1 convolution of VGG."""
    if list(stride) != [1, 1]:
        return None
    out = output_shape(input_shape, weight_shape, stride, padding, dilation)
    if out[2:] != list(input_shape[2:]):
        return None
    _, _, kh, kw = weight_shape
    if padding[0] % dilation[0] or padding[1] % dilation[1]:
        return None
    th, tw = padding[0] // dilation[0], padding[1] // dilation[1]
    if th >= kh or tw >= kw:
        return None
    return th * kw + tw


def conv2d_forward(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride,
    padding,
    dilation,
    groups: int,
    allow_tf32: bool,
    pool: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(conv2d(input, weight, bias), sums)`` where ``sums`` [N, C_in] float32 are the sums of
    ``input`` over H and W when ``pool`` (``pool_tap`` must exist), else None. The output follows
    the input's layout (NCHW or NHWC)."""
    n, c_in, h, w = input.shape
    c_out, cin_g, kh, kw = weight.shape
    shape = output_shape(input.shape, weight.shape, stride, padding, dilation)
    out = _common.empty_feature_map(shape, like=input, channels_last=_common.is_channels_last(input))
    tap = pool_tap(input.shape, weight.shape, stride, padding, dilation) if pool else None
    if pool and tap is None:
        raise ValueError("conv2d_forward: this convolution does not read every pixel once at one tap")
    sums_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    sums = torch.zeros((n, c_in), dtype=sums_dtype, device=input.device) if pool else None
    cout_g = c_out // groups
    h_out, w_out = shape[2], shape[3]
    pixels = n * h_out * w_out
    if pixels == 0 or cout_g == 0:
        return out, sums

    def grid(meta):
        return (triton.cdiv(pixels, meta["BLOCK_M"]) * triton.cdiv(cout_g, meta["BLOCK_N"]), groups)

    kernel = _conv_forward_pooled if pool else _conv_forward
    wrap_triton(kernel)[grid](
        input, weight, bias if bias is not None else out, out, sums if pool else out,
        n, h, w, h_out, w_out, cin_g, cout_g, c_in,
        *input.stride(), *weight.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        tap if pool else 0,
        KH=kh, KW=kw, X_PIXELS_CONTIGUOUS=_common.pixels_contiguous(input),
        Y_PIXELS_CONTIGUOUS=_common.pixels_contiguous(out), W_CHANNELS_CONTIGUOUS=weight.stride(1) == 1,
        HAS_BIAS=bias is not None, POOL=pool,
        DOT_PRECISION=_common.dot_precision(input.dtype, allow_tf32),
        ACC_DTYPE=_common.accumulator_dtype(input.dtype),
    )
    return out, sums


@triton_op("dfs_kernels::triton_partitioned_conv2d", mutates_args={})
def triton_partitioned_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    shared_channels: int,
) -> torch.Tensor:
    """conv2d(input, weight, bias) over every input channel; the backward's input gradient covers
    channels [0, shared_channels) only. input [N, C_in, H, W] -> [N, C_out, H_out, W_out].
    Fake and autograd: ``dfs_kernels.ops.partitioned_conv2d``."""
    return conv2d_forward(input, weight, bias, stride, padding, dilation, groups, _common.allow_tf32())[0]
