"""What the Triton kernels of the ``"triton"`` backend share: whether they run under the Triton
interpreter, their autotuning configurations, the dot precision, the layout helpers and the split-K
heuristic of the weight gradient.

``@triton.jit`` decides at decoration time whether a kernel is compiled for a GPU or interpreted on
the host (``TRITON_INTERPRET=1``), so ``INTERPRET`` is read once, when this package is first
imported; ``dfs_kernels.backends`` imports it lazily, on first use of the backend.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format


def _interpret() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the variable directly
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# Fixed for the life of the process: every kernel of this package is decorated after this line.
INTERPRET: bool = _interpret()


IMPLICIT_GEMM_GPU_CONFIGS = [
    # Implicit-GEMM convolutions (forward and input gradient), as (meta-parameters, num_warps,
    # num_stages): tiles for wide (C >= 128) and narrow layers, K tiles of 32 and 64 channels
    # (VGG / ResNet channel counts are multiples of 64).
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, 4, 3),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, 4, 4),
    ({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, 2, 4),
]
# Under the interpreter: fewer, larger programs (its cost is per operation, not per element).
IMPLICIT_GEMM_INTERPRETER_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 8}


def configs(gpu: list[tuple[dict, int, int]], interpreter: dict) -> list[triton.Config]:
    """Autotuning configurations: ``gpu`` as (meta-parameters, num_warps, num_stages) on a GPU; the
    single configuration ``interpreter`` under the interpreter.

    The interpreter runs every program of a grid in Python at a roughly fixed cost per tl operation,
    whatever the tile size, and its autotuner would benchmark (never cache) every configuration. So
    it gets one configuration with few, large-ish tiles, whose sizes are still valid on a GPU (tl.dot
    needs every dimension >= 16 there), so the tests exercise tile shapes a GPU can compile.
    """
    if INTERPRET:
        return [triton.Config(dict(interpreter), num_warps=4, num_stages=1)]
    return [triton.Config(meta, num_warps=warps, num_stages=stages) for meta, warps, stages in gpu[:_gpu_config_limit()]]


def _gpu_config_limit() -> int | None:
    """``DFS_KERNELS_TRITON_CONFIGS=N`` keeps the first N GPU configurations of every kernel (read
    when the kernels are defined): a correctness run then compiles each specialization once instead
    of autotuning over all of them."""
    value = os.environ.get("DFS_KERNELS_TRITON_CONFIGS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"DFS_KERNELS_TRITON_CONFIGS must be a positive integer, got {value!r}")
    return int(value)


def accumulator_dtype(dtype: torch.dtype):
    """The kernels' accumulator type (a ``tl.constexpr`` argument): float64 for float64 operands
    (interpreter only, for gradcheck), float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def allow_tf32() -> bool:
    """Whether float32 dots may run in TF32, read at each launch: opted into as for matmuls, through
    ``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high")``
    (``torch.compile`` guards on it)."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """``input_precision`` of ``tl.dot``: float32 operands run in IEEE float32 unless TF32 was opted
    into (``torch.backends.cuda.matmul.allow_tf32``); half-precision operands ignore it."""
    if dtype == torch.float32 and not allow_tf32:
        return "ieee"
    return "ieee" if INTERPRET else "tf32"


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` [N, C, H, W] is laid out channels-last (NHWC); the outputs of the kernels
    follow their input's layout, as ATen's convolutions do."""
    return suggest_memory_format(tensor) == torch.channels_last


def empty_feature_map(shape, *, like: torch.Tensor, channels_last: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized [N, C, H, W] tensor in NCHW or NHWC layout, on ``like``'s device."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        tuple(shape), dtype=dtype or like.dtype, device=like.device, memory_format=memory_format
    )


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessor_count(device: torch.device) -> int:
    """Programs that run concurrently, roughly: SMs on a GPU; under the interpreter a small number,
    so that split-K (which depends on it) is exercised by the small test shapes."""
    if INTERPRET or device.type != "cuda":
        return 2
    return _multiprocessor_count(device.index if device.index is not None else torch.cuda.current_device())


# Pixels of the reduction that one split of the weight gradient covers at least: a multiple of every
# BLOCK_K of the configurations (so each split but the last is whole blocks), large enough on a GPU
# that a split amortizes its tile's prologue and the extra partial-sum traffic.
SPLIT_K_GRANULE = 64
_SPLIT_K_MIN_PIXELS = SPLIT_K_GRANULE if INTERPRET else 1024


def weight_grad_split(pixels: int, output_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, pixels per split) of the weight gradient's reduction over N * H_out * W_out.

    Its GEMM has only C_out x C_in*kH*kW outputs (one 64x64 tile for a 64-channel 3x3 conv) but a
    reduction of N * H_out * W_out (262144 for CIFAR at batch 256): without splitting, a handful of
    programs would run the whole reduction while the rest of the GPU idles. Split so that about two
    waves of programs fill the GPU, each split at least _SPLIT_K_MIN_PIXELS long.
    """
    if pixels <= 0:
        return 1, SPLIT_K_GRANULE
    target_programs = 2 * multiprocessor_count(device)
    splits = max(1, min(target_programs // max(output_tiles, 1), pixels // _SPLIT_K_MIN_PIXELS))
    chunk = triton.cdiv(triton.cdiv(pixels, splits), SPLIT_K_GRANULE) * SPLIT_K_GRANULE
    return triton.cdiv(pixels, chunk), chunk


def pixels_contiguous(tensor: torch.Tensor) -> bool:
    """Whether neighbouring pixels (along W) of ``tensor`` [N, C, H, W] are neighbours in memory while
    channels are not (NCHW). The kernels then lay their tiles out pixel-major (see ``load_tile``)."""
    return tensor.stride(3) == 1 and tensor.stride(1) != 1 and tensor.shape[3] > 1


@triton.jit
def grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: consecutive programs walk GROUP_M row tiles
    under one column tile, so the column operand's tiles stay in L2 while they are reused."""
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (pid % num_pid_in_group) % group_size_m, (pid % num_pid_in_group) // group_size_m


@triton.jit
def load_tile(base, row_offsets, col_offsets, row_mask, col_mask, ROWS_CONTIGUOUS: tl.constexpr):
    """The [R, C] tile ``base[row_offsets[:, None] + col_offsets[None, :]]``, masked entries zero.

    A warp's lanes walk the last dimension of a tile unless Triton can prove the other one
    contiguous, which it cannot through the div/mod that turn a pixel index into (n, h, w). When the
    rows are the contiguous dimension in memory (pixels of an NCHW tensor) the tile is therefore
    loaded as [C, R] and transposed in registers, so that the loads coalesce.
    """
    if ROWS_CONTIGUOUS:
        tile = tl.load(
            base + row_offsets[None, :] + col_offsets[:, None], mask=row_mask[None, :] & col_mask[:, None], other=0.0
        )
        return tl.trans(tile)
    else:
        return tl.load(
            base + row_offsets[:, None] + col_offsets[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0
        )


@triton.jit
def store_tile(base, row_offsets, col_offsets, row_mask, col_mask, value, ROWS_CONTIGUOUS: tl.constexpr):
    """``base[row_offsets[:, None] + col_offsets[None, :]] = value`` [R, C] (masked), with the
    layout choice of ``load_tile``."""
    if ROWS_CONTIGUOUS:
        tl.store(
            base + row_offsets[None, :] + col_offsets[:, None], tl.trans(value), mask=row_mask[None, :] & col_mask[:, None]
        )
    else:
        tl.store(base + row_offsets[:, None] + col_offsets[None, :], value, mask=row_mask[:, None] & col_mask[None, :])
