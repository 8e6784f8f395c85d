"""The gradient of a split point: ``dfs_kernels::triton_merge_channels(head, tail, split)`` writes
channels [0, split) from ``head`` (the backbone view's gradient) and [split, C) from ``tail`` (the exit
view's), a missing source read as zeros, in one pass.

The views themselves (``reroute``, ``exit_reference``), the fake and the autograd formula are those of
every backend (``dfs_kernels.ops.channels``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import _common

_CONFIGS = [
    ({"BLOCK_HW": 64, "BLOCK_C": 64}, 4, 1),
    ({"BLOCK_HW": 128, "BLOCK_C": 32}, 4, 1),
    ({"BLOCK_HW": 32, "BLOCK_C": 128}, 4, 1),
]
_INTERPRETER_CONFIG = {"BLOCK_HW": 64, "BLOCK_C": 16}


@triton.jit
def _merge_channels_kernel(
    head_ptr,  # [N, C, H, W] source of channels [0, SPLIT) (HAS_HEAD), any strides
    tail_ptr,  # [N, C, H, W] source of channels [SPLIT, C) (HAS_TAIL), any strides
    out_ptr,  # [N, C, H, W] output, NCHW or NHWC; every element is written
    C, H, W, SPLIT,  # sizes and the partition point Cp
    shn, shc, shh, shw,  # strides of head
    stn, stc, sth, stw,  # strides of tail
    son, soc, soh, sow,  # strides of out
    HAS_HEAD: tl.constexpr, HAS_TAIL: tl.constexpr,  # a missing source reads as zeros
    BLOCK_HW: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)  # (image, pixel block), flattened
    pid_c = tl.program_id(1)
    hw = H * W
    num_pb = tl.cdiv(hw, BLOCK_HW)
    n = (pid // num_pb).to(tl.int64)
    offs_p = (pid % num_pb) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    h = offs_p // W
    w = offs_p % W
    mask = (offs_p < hw)[:, None] & (offs_c < C)[None, :]
    from_head = (offs_c < SPLIT)[None, :]
    value = tl.zeros((BLOCK_HW, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    # Each element is read from exactly one source: the masks are complementary.
    if HAS_HEAD:
        value += tl.load(
            head_ptr + n * shn + offs_c[None, :] * shc + (h * shh + w * shw)[:, None], mask=mask & from_head, other=0.0
        )
    if HAS_TAIL:
        value += tl.load(
            tail_ptr + n * stn + offs_c[None, :] * stc + (h * sth + w * stw)[:, None], mask=mask & ~from_head, other=0.0
        )
    tl.store(out_ptr + n * son + offs_c[None, :] * soc + (h * soh + w * sow)[:, None], value, mask=mask)


_merge_channels = triton.autotune(configs=_common.configs(_CONFIGS, _INTERPRETER_CONFIG), key=["C", "H", "W"])(_merge_channels_kernel)


@triton_op("dfs_kernels::triton_merge_channels", mutates_args={})
def triton_merge_channels(head: torch.Tensor | None, tail: torch.Tensor | None, split: int) -> torch.Tensor:
    """[N, C, H, W] with channels [0, split) from ``head`` and [split, C) from ``tail``, a missing
    one reading as zeros, in the layout of the first given source."""
    like = head if head is not None else tail
    n, c, h, w = like.shape
    out = _common.empty_feature_map(like.shape, like=like, channels_last=_common.is_channels_last(like))
    if out.numel() == 0:
        return out

    def grid(meta):
        return (n * triton.cdiv(h * w, meta["BLOCK_HW"]), triton.cdiv(c, meta["BLOCK_C"]))

    wrap_triton(_merge_channels)[grid](
        head if head is not None else like, tail if tail is not None else like, out, c, h, w, split,
        *(head.stride() if head is not None else (0, 0, 0, 0)),
        *(tail.stride() if tail is not None else (0, 0, 0, 0)),
        *out.stride(),
        HAS_HEAD=head is not None, HAS_TAIL=tail is not None,
    )
    return out
