"""The "triton" backend against dfs_kernels.reference.

On CPU every kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU): float32 and float16, small odd shapes, stride 2, dilation 2, groups, NCHW,
NHWC and strided views, Cp at 0, 1, C-1, C. The interpreter runs every program in Python, so the
grid is lean. On a GPU (``cuda`` marks) the same kernels compiled, with bfloat16, TF32 and autotuning
(torch.compile and CUDA graphs: tests/test_cuda_capture.py; opcheck: tests/test_opcheck.py; the
registry and "auto": tests/test_backends.py).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional, reference
from dfs_kernels.testing import assert_close
from helpers import (  # noqa: F401  (exact_cuda_math: a fixture)
    CUDA_DTYPES, GPU_SIZED_CONVS, LEAN_CONV_GRID, Conv, boundary_shared_counts, check_conv, compare_backward,
    conv_leaves, cuda_dtype_cases, exact_cuda_math, feature_map, view_of,
)

CUDA = torch.cuda.is_available()
TRITON_CPU_REASON = dfs_kernels.unavailable_reason("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU_REASON is not None, reason=f"triton on CPU: {TRITON_CPU_REASON}")


def cuda_triton_or_skip():
    reason = dfs_kernels.unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True, scope="module")
def triton_ops_registered():
    """Tests that call ``torch.ops.dfs_kernels.triton_*`` directly need the backend imported, which
    otherwise happens only when some earlier test first asked for it."""
    if TRITON_CPU_REASON is None:
        dfs_kernels.backends.implementation("triton", "cpu")


CONVS = LEAN_CONV_GRID
shared_channel_counts = boundary_shared_counts


def check_triton(conv: Conv, cp: int, layout: str, dtype: torch.dtype, device="cpu", tol=None):
    check_conv("triton", conv, cp, layout, dtype, device=device, tol=tol)


# --- CPU, under the interpreter ------------------------------------------------------------------

# Every Cp of every convolution, layouts alternating along the Cp (each convolution sees both).
CONV_CASES = [
    pytest.param(conv, cp, layout, id=f"{name}-cp{cp}-{layout}")
    for name, conv in CONVS.items()
    for cp, layout in zip(shared_channel_counts(conv), ["contiguous", "channels_last"] * 3)
]


@requires_triton_cpu
@pytest.mark.parametrize("conv, cp, layout", CONV_CASES)
def test_conv_float32(conv, cp, layout):
    check_triton(conv, cp, layout, torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("name, cp, layout", [
    ("k3", 3, "contiguous"), ("k5-stride2", 2, "channels_last"), ("stride2-dilation2", 6, "contiguous"),
    ("groups2", 5, "channels_last"), ("k1-stride2", 5, "strided"), ("k3", 1, "strided"),
])
def test_conv_float16_and_strided_views(name, cp, layout):
    check_triton(CONVS[name], cp, layout, torch.float16)
    if layout == "strided":
        check_triton(CONVS[name], cp, layout, torch.float32)


@requires_triton_cpu
def test_conv_unbatched_and_module():
    conv = dfs_kernels.PartitionedConv2d(4, 3, 3, padding=1, shared_channels=2, backend="triton")
    x = torch.randn(4, 5, 6)
    assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1), name="output")


@requires_triton_cpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_output_layout_follows_input(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(4, 6, 3, 3, requires_grad=True)
    out = functional.partitioned_conv2d(x, w, padding=1, shared_channels=3, backend="triton")
    assert out.is_contiguous(memory_format=fmt)
    out.backward(torch.randn_like(out))
    assert x.grad.is_contiguous(memory_format=fmt) and x.grad[:, 3:].abs().max() == 0


@requires_triton_cpu
@pytest.mark.parametrize("stride", [1, 2])
def test_weight_grad_split_k_matches_unsplit(stride, monkeypatch):
    """Split-K (float32 partial sums added by one sum) gives the unsplit weight and bias gradients."""
    from dfs_kernels.backends.triton import _common

    x = torch.randn(3, 6, 17, 15)
    w = torch.randn(5, 6, 3, 3)
    out = torch.nn.functional.conv2d(x, w, stride=stride, padding=1)
    grad = torch.randn_like(out)
    pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    splits, chunk = _common.weight_grad_split(pixels, 1, x.device)
    assert splits > 1 and chunk % _common.SPLIT_K_GRANULE == 0 and (splits - 1) * chunk < pixels <= splits * chunk
    args = (grad, x, w, [stride] * 2, [1, 1], [1, 1], 1, True)
    split_w, split_b = torch.ops.dfs_kernels.triton_conv2d_weight_grad(*args)
    monkeypatch.setattr(_common, "weight_grad_split", lambda pixels, tiles, device: (1, pixels))
    whole_w, whole_b = torch.ops.dfs_kernels.triton_conv2d_weight_grad(*args)
    expected_w = torch.nn.grad.conv2d_weight(x, w.shape, grad, stride=stride, padding=1)
    for name, actual in [("split", split_w), ("whole", whole_w)]:
        assert_close(actual, expected_w, name=f"{name} weight grad")
    assert_close(split_b, grad.sum(dim=(0, 2, 3)), name="split bias grad")
    assert_close(whole_b, grad.sum(dim=(0, 2, 3)), name="whole bias grad")


@requires_triton_cpu
def test_input_grad_fills_referenced_channels_in_the_same_launch():
    """The input-gradient op writes every element: the shared channels' gradient, and zeros (or the
    exit's broadcast gradient) on the referenced ones, whatever the output buffer held before."""
    x = torch.randn(2, 6, 7, 5)
    w = torch.randn(4, 6, 3, 3)
    grad = torch.randn(2, 4, 4, 3)
    pooled_grad = torch.randn(2, 6)
    args = (grad, x, w, [2, 2], [1, 1], [1, 1], 1, 4)
    expected = torch.nn.grad.conv2d_input(x.shape, w, grad, stride=2, padding=1)
    for gp in (None, pooled_grad):
        torch.empty(10**6).fill_(float("nan"))  # leave garbage in freed memory
        dx = torch.ops.dfs_kernels.triton_partitioned_conv2d_input_grad(*args, gp)
        assert_close(dx[:, :4], expected[:, :4], name="shared channels")
        fill = torch.zeros(2, 2, 7, 5) if gp is None else (gp[:, 4:, None, None] / 35).expand(2, 2, 7, 5)
        assert_close(dx[:, 4:], fill, name="referenced channels")


@requires_triton_cpu
def test_input_grad_does_no_work_for_inserted_zeros_or_referenced_channels(monkeypatch):
    """Counts the interpreter's tl.dot calls. Stride 2: each stride phase walks only the taps that
    reach whole output pixels, so the 4 phases together run the 9 taps once (a zero-inserting
    transposed convolution would run 4 x 9). Referenced channel tiles run no GEMM at all."""
    from triton.runtime import interpreter

    from dfs_kernels.backends.triton.conv_input_grad import _INTERPRETER_CONFIG

    calls = []
    original = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, *args: calls.append(1) or original(self, *args))
    x, w = torch.randn(2, 20, 9, 9), torch.randn(12, 20, 3, 3)
    grad = torch.randn(2, 12, 5, 5)
    for cp in (3, 16, 17):
        calls.clear()
        dx = torch.ops.dfs_kernels.triton_partitioned_conv2d_input_grad(
            grad, x, w, [2, 2], [1, 1], [1, 1], 1, cp)
        expected = torch.nn.grad.conv2d_input(x.shape, w, grad, stride=2, padding=1)
        assert_close(dx[:, :cp], expected[:, :cp], name="shared channels")
        assert dx[:, cp:].abs().max() == 0
        shared_tiles = -(-cp // _INTERPRETER_CONFIG["BLOCK_N"])  # channel tiles holding a shared channel
        pixel_tiles_per_phase = -(-2 * 5 * 5 // _INTERPRETER_CONFIG["BLOCK_M"])  # phases are 5x5, 5x4, 4x5, 4x4
        assert len(calls) == 9 * shared_tiles * pixel_tiles_per_phase, (cp, len(calls))


SHAPES = {"odd": (2, 7, 5, 3), "1x1": (3, 5, 1, 1)}
REFERENCING_CASES = [
    pytest.param(shape, cp, layout, id=f"{name}-cp{cp}-{layout}")
    for name, shape in SHAPES.items()
    for cp in sorted({0, 1, shape[1] - 1, shape[1]})
    for layout in ("contiguous", "channels_last", "strided")
]


@requires_triton_cpu
@pytest.mark.parametrize("shape, cp, layout", REFERENCING_CASES)
def test_referencing(shape, cp, layout):
    base, _ = feature_map(shape, layout=layout)
    view = view_of(layout)
    compare_backward(
        lambda b: (
            *functional.reroute(view(b), cp, backend="triton"),
            functional.exit_avg_pool(view(b), cp, backend="triton"),
            functional.exit_reference(view(b), cp, backend="triton"),
        ),
        lambda b: (*reference.reroute(view(b), cp), reference.exit_avg_pool(view(b), cp), reference.exit_reference(view(b), cp)),
        [base], names=["x"],
    )
    for branch in (0, 1):  # only one side of the split point sends a gradient
        compare_backward(
            lambda b: functional.reroute(view(b), cp, backend="triton")[branch] * 2,
            lambda b: reference.reroute(view(b), cp)[branch] * 2,
            [base], names=["x"],
        )


@requires_triton_cpu
def test_referencing_float16_and_views():
    base, _ = feature_map((2, 6, 4, 3), layout="channels_last", dtype=torch.float16)
    compare_backward(
        lambda b: (*functional.reroute(b, 2, backend="triton"), functional.exit_avg_pool(b, 4, backend="triton")),
        lambda b: (*reference.reroute(b, 2), reference.exit_avg_pool(b, 4)),
        [base], names=["x"], dtype=torch.float16,
    )
    x = torch.randn(2, 6, 3, 3)
    backbone, exit_view = functional.reroute(x, 3, backend="triton")
    assert backbone.data_ptr() == x.data_ptr() and exit_view.data_ptr() == x.data_ptr()


STAGES = {
    "fused-k3": Conv(7, 4, 3, padding=1),  # a tap reads every pixel once: pooled from the conv's reads
    "fused-k5-dilation2-groups": Conv(6, 4, 5, padding=4, dilation=2, groups=2, size=(7, 6)),
    "unfused-stride2": Conv(7, 4, 3, stride=2, padding=1, bias=False),
    "unfused-same-even": Conv(5, 3, (2, 4), padding="same"),
}
STAGE_CASES = [
    pytest.param(conv, cp, layout, id=f"{name}-cp{cp}-{layout}")
    for name, conv in STAGES.items()
    for cp, layout in [(0, "contiguous"), (1, "channels_last"), (conv.in_channels - 1, "contiguous"),
                       (conv.in_channels, "channels_last"), (conv.in_channels // 2, "strided")]
]


@requires_triton_cpu
@pytest.mark.parametrize("conv, cp, layout", STAGE_CASES)
def test_fused_stage(conv, cp, layout):
    leaves = conv_leaves(conv, layout, torch.float32)
    view = view_of(layout)

    def run(fn, index=None):
        def call(base, weight, bias=None):
            outputs = fn(view(base), weight, bias, **conv.conv_args(), shared_channels=cp)
            return outputs if index is None else outputs[index] * 2

        return call

    triton_stage = lambda *a, **k: functional.partitioned_conv2d_with_exit_pool(*a, **k, backend="triton")  # noqa: E731
    for index in (None, 0, 1):  # both outputs used, or only the conv, or only the exit
        compare_backward(run(triton_stage, index), run(reference.partitioned_conv2d_with_exit_pool, index), leaves,
                         names=["input", "weight", "bias"])


@requires_triton_cpu
def test_fused_stage_float16_and_pool_tap():
    from dfs_kernels.backends.triton.conv_forward import pool_tap

    assert pool_tap((2, 8, 9, 9), (8, 8, 3, 3), [1, 1], [1, 1], [1, 1]) == 4
    assert pool_tap((2, 8, 9, 9), (8, 8, 5, 5), [1, 1], [4, 4], [2, 2]) == 12
    assert pool_tap((2, 8, 9, 9), (8, 8, 3, 3), [2, 2], [1, 1], [1, 1]) is None
    assert pool_tap((2, 8, 9, 9), (8, 8, 3, 3), [1, 1], [0, 0], [1, 1]) is None
    conv = Conv(6, 5, 3, padding=1)
    leaves = conv_leaves(conv, "channels_last", torch.float16)
    compare_backward(
        lambda b, w, c: functional.partitioned_conv2d_with_exit_pool(b, w, c, padding=1, shared_channels=2,
                                                                    backend="triton"),
        lambda b, w, c: reference.partitioned_conv2d_with_exit_pool(b, w, c, padding=1, shared_channels=2),
        leaves, dtype=torch.float16, names=["input", "weight", "bias"],
    )


@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_fused_stage_on_every_backend(backend):
    conv = Conv(6, 4, 3, padding=1)
    leaves = conv_leaves(conv, "contiguous", torch.float64)
    compare_backward(
        lambda b, w, c: functional.partitioned_conv2d_with_exit_pool(b, w, c, padding=1, shared_channels=2,
                                                                    backend=backend),
        lambda b, w, c: reference.partitioned_conv2d_with_exit_pool(b, w, c, padding=1, shared_channels=2),
        leaves, names=["input", "weight", "bias"],
    )


@pytest.mark.slow
def test_kernels_compile_for_nvidia_gpus():
    """Every kernel variant compiles for sm_90 with a GPU autotuning configuration (Triton's bundled
    ptxas, no driver needed): what the interpreter, which never compiles, cannot check on CPU."""
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script, "--arch", "90"], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


# --- CUDA: the compiled kernels --------------------------------------------------------------------

CUDA_CONVS = {
    **{name: CONVS[name] for name in ("k3", "k5-stride2", "stride2-dilation2", "groups2", "depthwise-same")},
    **GPU_SIZED_CONVS,
}
CUDA_CASES = cuda_dtype_cases(CUDA_CONVS)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name, dtype_name", CUDA_CASES)
def test_cuda_conv_matches_reference(name, dtype_name, layout, exact_cuda_math, monkeypatch):
    cuda_triton_or_skip()
    dtype, tol = CUDA_DTYPES[dtype_name]
    if dtype_name == "tf32":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    conv = CUDA_CONVS[name]
    for cp in sorted(set(shared_channel_counts(conv) + [conv.in_channels // 2])):
        check_triton(conv, cp, layout, dtype, device="cuda", tol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_fused_stage_and_referencing(layout, dtype_name, exact_cuda_math):
    cuda_triton_or_skip()
    dtype, tol = CUDA_DTYPES[dtype_name]
    for conv in (Conv(64, 32, 3, padding=1, size=(8, 8), batch=8), Conv(32, 16, 3, stride=2, padding=1)):
        for cp in (0, 1, conv.in_channels // 2, conv.in_channels):
            leaves = conv_leaves(conv, layout, dtype, "cuda")
            compare_backward(
                lambda b, w, c: functional.partitioned_conv2d_with_exit_pool(b, w, c, **conv.conv_args(),
                                                                            shared_channels=cp, backend="triton"),
                lambda b, w, c: reference.partitioned_conv2d_with_exit_pool(b, w, c, **conv.conv_args(),
                                                                           shared_channels=cp),
                leaves, dtype=tol, names=["input", "weight", "bias"],
            )
            base, _ = feature_map((3, conv.in_channels, 9, 7), layout=layout, dtype=dtype, device="cuda")
            compare_backward(
                lambda b: (*functional.reroute(b, cp, backend="triton"), functional.exit_avg_pool(b, cp, backend="triton")),
                lambda b: (*reference.reroute(b, cp), reference.exit_avg_pool(b, cp)),
                [base], dtype=tol, names=["x"],
            )
