"""The "triton" backend against dfs_kernels.reference.

On CPU every kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
when there is no GPU): float32 and float16, small odd shapes, stride 2, dilation 2, groups, NCHW,
NHWC and strided views, Cp at 0, 1, C-1, C. The interpreter runs every program in Python, so the
grid is lean. On a GPU (``cuda`` marks) the same kernels compiled, with bfloat16, TF32, autotuning,
torch.compile and CUDA graphs. Also: the registry's handling of the backend and "auto"'s measured
choice, with an injected timer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dfs_kernels
from dfs_kernels import backends, functional, reference
from dfs_kernels.testing import assert_close
from helpers import Conv, compare_backward, conv_leaves, feature_map, view_of

CUDA = torch.cuda.is_available()
TRITON_CPU_REASON = dfs_kernels.unavailable_reason("triton", "cpu")
requires_triton_cpu = pytest.mark.skipif(TRITON_CPU_REASON is not None, reason=f"triton on CPU: {TRITON_CPU_REASON}")


def cuda_triton_or_skip():
    reason = dfs_kernels.unavailable_reason("triton", "cuda")
    if reason is not None:
        pytest.skip(reason)


CONVS = {
    "k3": Conv(6, 5, 3, padding=1),
    "k1-stride2": Conv(5, 4, 1, stride=2, size=(7, 6), bias=False),
    "k5-stride2": Conv(5, 6, 5, stride=2, padding=2, size=(11, 9)),
    "k3x5-stride2x1": Conv(6, 5, (3, 5), stride=(2, 1), padding=(1, 2)),
    "stride2-dilation2": Conv(7, 3, 3, stride=2, dilation=2, size=(13, 11)),
    "groups2": Conv(8, 6, 3, padding=1, groups=2, batch=1),
    "depthwise-same": Conv(6, 6, 3, padding="same", groups=6, bias=False, size=(5, 4)),
    # More channels than one 16-wide tile: several channel tiles and K blocks, a tile straddling Cp.
    "wide": Conv(20, 18, 3, padding=1, size=(5, 4)),
}


def shared_channel_counts(conv: Conv) -> list[int]:
    c = conv.in_channels
    counts = {0, 1, c - 1, c}
    if conv.groups > 1:
        counts.add(c // conv.groups + 1)  # cuts a group
    return sorted(counts)


def check_conv(conv: Conv, cp: int, layout: str, dtype: torch.dtype, device="cpu", tol=None, backend="triton"):
    leaves = conv_leaves(conv, layout, dtype, device)
    view = view_of(layout)

    def actual(base, weight, bias=None):
        return functional.partitioned_conv2d(
            view(base), weight, bias, **conv.conv_args(), shared_channels=cp, backend=backend
        )

    def expected(base, weight, bias=None):
        return reference.partitioned_conv2d(view(base), weight, bias, **conv.conv_args(), shared_channels=cp)

    compare_backward(actual, expected, leaves, dtype=tol or dtype, names=["input", "weight", "bias"])


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
    check_conv(conv, cp, layout, torch.float32)


@requires_triton_cpu
@pytest.mark.parametrize("name, cp, layout", [
    ("k3", 3, "contiguous"), ("k5-stride2", 2, "channels_last"), ("stride2-dilation2", 6, "contiguous"),
    ("groups2", 5, "channels_last"), ("k1-stride2", 5, "strided"), ("k3", 1, "strided"),
])
def test_conv_float16_and_strided_views(name, cp, layout):
    check_conv(CONVS[name], cp, layout, torch.float16)
    if layout == "strided":
        check_conv(CONVS[name], cp, layout, torch.float32)


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
    args = (grad, x, w, [stride] * 2, [1, 1], [1, 1], 1, True, False)
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
    args = (grad, w, list(x.shape), False, [2, 2], [1, 1], [1, 1], 1, 4, False)
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
    x_shape, w = [2, 20, 9, 9], torch.randn(12, 20, 3, 3)
    grad = torch.randn(2, 12, 5, 5)
    for cp in (3, 16, 17):
        calls.clear()
        dx = torch.ops.dfs_kernels.triton_partitioned_conv2d_input_grad(
            grad, w, x_shape, False, [2, 2], [1, 1], [1, 1], 1, cp, False, None)
        expected = torch.nn.grad.conv2d_input(x_shape, w, grad, stride=2, padding=1)
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


def opcheck_cases(device="cpu", dtype=torch.float32):
    def t(*shape, cl=False, grad=False):
        x = torch.randn(*shape, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last) if cl else x
        return x.requires_grad_(grad)

    return [
        ("triton_partitioned_conv2d", (t(2, 6, 5, 4, grad=True), t(4, 6, 3, 3, grad=True), t(4, grad=True),
                                       [1, 1], [1, 1], [1, 1], 1, 2, False)),
        ("triton_partitioned_conv2d", (t(2, 6, 5, 4, cl=True, grad=True), t(4, 3, 3, 3, grad=True), None,
                                       [2, 1], [1, 2], [1, 2], 2, 4, False)),
        ("triton_partitioned_conv2d_input_grad", (t(2, 4, 5, 4), t(4, 6, 3, 3), [2, 6, 5, 4], False,
                                                  [1, 1], [1, 1], [1, 1], 1, 3, False, None)),
        ("triton_partitioned_conv2d_input_grad", (t(2, 4, 3, 2), t(4, 3, 3, 3), [2, 6, 5, 4], True,
                                                  [2, 2], [1, 1], [1, 1], 2, 4, False, t(2, 6))),
        ("triton_conv2d_weight_grad", (t(2, 4, 5, 4), t(2, 6, 5, 4, cl=True), t(4, 6, 3, 3), [1, 1], [1, 1], [1, 1],
                                       1, True, False)),
        ("triton_exit_avg_pool", (t(2, 6, 5, 4, grad=True), 2)),
        ("triton_exit_avg_pool", (t(2, 6, 5, 4, cl=True, grad=True), 0)),
        ("triton_exit_avg_pool_backward", (t(2, 6), [2, 6, 5, 4], 2, True)),
        ("triton_merge_channels", (t(2, 6, 5, 4), t(2, 6, 5, 4, cl=True), 2)),
        ("triton_merge_channels", (None, t(2, 6, 5, 4), 4)),
        ("triton_partitioned_conv2d_with_exit_pool", (t(2, 6, 5, 4, grad=True), t(4, 6, 3, 3, grad=True),
                                                      t(4, grad=True), [1, 1], [1, 1], [1, 1], 1, 2, False)),
    ]


@requires_triton_cpu
@pytest.mark.parametrize("name, args", opcheck_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_interpreter(name, args):
    # Schema, autograd registration and fake implementations (shapes and strides). The AOT-dispatch
    # checks trace the op's body with fake tensors, which the interpreter cannot run (GPU only).
    torch.library.opcheck(
        getattr(torch.ops.dfs_kernels, name).default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


# --- registry and "auto" ----------------------------------------------------------------------------


def test_registry_never_lists_or_picks_the_interpreter():
    assert "triton" in dfs_kernels.BACKENDS
    assert "triton" not in dfs_kernels.available_backends("cpu")
    assert dfs_kernels.resolve_backend("auto", "cpu") == dfs_kernels.available_backends("cpu")[0]
    assert dfs_kernels.resolve_backend("auto", "cpu") != "triton"
    if TRITON_CPU_REASON is None:  # the interpreter is on: listed only when asked for, usable explicitly
        assert "triton" in dfs_kernels.available_backends("cpu", include_interpreted=True)
        assert dfs_kernels.resolve_backend("triton", "cpu") == "triton"
        assert "triton" not in backends._auto_candidates("cpu")
    else:
        with pytest.raises(dfs_kernels.BackendUnavailableError, match="triton"):
            dfs_kernels.resolve_backend("triton", "cpu")
    assert dfs_kernels.unavailable_reason("triton", "meta") is not None


def test_package_does_not_import_triton_until_the_backend_is_used():
    code = (
        "import sys, torch, dfs_kernels\n"
        "x = torch.randn(2, 4, 5, 5, requires_grad=True); w = torch.randn(3, 4, 3, 3, requires_grad=True)\n"
        "dfs_kernels.functional.partitioned_conv2d(x, w, shared_channels=1).sum().backward()\n"
        "print(dfs_kernels.unavailable_reason('triton', 'cpu'))\n"
        "assert 'triton' not in sys.modules and 'dfs_kernels.backends.triton' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if not CUDA:
        assert "TRITON_INTERPRET" in result.stdout


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


def test_registry_traces_when_first_used_under_compile():
    """A fresh process whose first DFS call is inside torch.compile(fullgraph=True): resolving
    "auto" (which now also asks about triton) and building the backend namespaces must trace."""
    code = (
        "import torch, dfs_kernels\n"
        "conv = dfs_kernels.PartitionedConv2d(4, 3, 3, padding=1, shared_channels=2)\n"
        "head, split = dfs_kernels.ExitHead(3, 2, shared_channels=1), dfs_kernels.FeatureReroute(3, shared_channels=1)\n"
        "def step(x):\n"
        "    backbone, exit_view = split(conv(x))\n"
        "    return head(backbone) + head(exit_view)\n"
        "x = torch.randn(2, 4, 5, 5, requires_grad=True)\n"
        "torch.compile(step, backend='eager', fullgraph=True)(x).sum().backward()\n"
        "assert x.grad.shape == x.shape\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


class FakeTimer:
    """Times each candidate by the given table (seconds), in candidate order, and counts calls."""

    def __init__(self, seconds: list[float]) -> None:
        self.seconds = list(seconds)
        self.calls = 0

    def __call__(self, fn, device) -> float:
        fn()  # the workload must run
        value = self.seconds[self.calls % len(self.seconds)]
        self.calls += 1
        return value


@pytest.fixture
def fresh_auto_cache(monkeypatch):
    monkeypatch.setattr(backends.auto, "_AUTO_CACHE", {})
    monkeypatch.setattr(backends.auto, "_AUTO_TIMINGS", {})
    monkeypatch.setattr(backends.auto, "_STORED_CHOICES", {})
    monkeypatch.setattr(backends.auto, "_DISK_CACHE_LOADED", [])
    monkeypatch.delenv("DFS_KERNELS_AUTOTUNE_CACHE", raising=False)


def conv_call(size=6, requires_grad=True):
    x = torch.randn(2, 4, size, size, requires_grad=requires_grad)
    w = torch.randn(3, 4, 3, 3, requires_grad=requires_grad)
    return (x, w, None, (1, 1), (1, 1), (1, 1), 1, 2)


def test_measured_auto_picks_the_fastest_beyond_the_margin_and_caches(fresh_auto_cache):
    timer = FakeTimer([1.0, 0.5])  # candidates[0] ("aten") 1 s, the other 0.5 s
    auto = backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=timer)
    args = conv_call()
    out = auto.partitioned_conv2d(*args)
    assert_close(out, reference.partitioned_conv2d(*args[:7], shared_channels=2), name="output")
    assert timer.calls == 2
    (key, entry), = backends.auto_choices().items()
    assert entry == {"backend": "reference", "seconds": {"aten": 1.0, "reference": 0.5}}
    assert key[:2] == ("partitioned_conv2d", "cpu")
    auto.partitioned_conv2d(*args)  # cached: no new measurement
    assert timer.calls == 2
    auto.partitioned_conv2d(*conv_call(size=7))  # another shape: another key
    assert timer.calls == 4 and len(backends.auto_choices()) == 2
    auto.partitioned_conv2d(*conv_call(requires_grad=False))  # inference is its own key
    assert timer.calls == 6


def test_measured_auto_keeps_aten_within_noise(fresh_auto_cache):
    auto = backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=FakeTimer([1.0, 0.99]))
    x = torch.randn(2, 6, 4, 4, requires_grad=True)
    pooled = auto.exit_avg_pool(x, 3)
    assert_close(pooled, x.mean(dim=(2, 3)), name="pooled")
    backbone, exit_view = auto.reroute(x, 3)
    assert [entry["backend"] for entry in backends.auto_choices().values()] == ["aten", "aten"]


def test_measured_auto_disk_cache(fresh_auto_cache, tmp_path, monkeypatch):
    path = tmp_path / "auto.json"
    monkeypatch.setenv("DFS_KERNELS_AUTOTUNE_CACHE", str(path))
    timer = FakeTimer([1.0, 0.5])
    backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=timer).partitioned_conv2d(*conv_call())
    stored = json.loads(path.read_text())
    assert list(stored.values()) == ["reference"]
    # A new process (simulated): the choice comes from disk, nothing is measured.
    monkeypatch.setattr(backends.auto, "_AUTO_CACHE", {})
    monkeypatch.setattr(backends.auto, "_STORED_CHOICES", {})
    monkeypatch.setattr(backends.auto, "_DISK_CACHE_LOADED", [])
    timer = FakeTimer([1.0, 0.5])
    backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=timer).partitioned_conv2d(*conv_call())
    assert timer.calls == 0
    assert [entry["backend"] for entry in backends.auto_choices().values()] == ["reference"]


def test_measured_auto_traces_without_graph_breaks_once_chosen(fresh_auto_cache):
    torch._dynamo.reset()
    auto = backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=FakeTimer([1.0, 0.5]))
    args = conv_call()
    eager = auto.partitioned_conv2d(*args)  # measured here, eagerly

    def step(x, w):
        return auto.partitioned_conv2d(x, w, *args[2:])

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    assert_close(compiled(*args[:2]), eager, name="compiled output")


# --- CUDA: the compiled kernels --------------------------------------------------------------------

CUDA_CONVS = {
    **{name: CONVS[name] for name in ("k3", "k5-stride2", "stride2-dilation2", "groups2", "depthwise-same")},
    "vgg-64": Conv(64, 64, 3, padding=1, size=(16, 16), batch=4),
    "resnet-down": Conv(64, 128, 3, stride=2, padding=1, size=(16, 16), batch=4, bias=False),
    "1x1-down": Conv(64, 128, 1, stride=2, size=(15, 15), batch=3, bias=False),
}
CUDA_DTYPES = {"f32": (torch.float32, torch.float32), "tf32": (torch.float32, "tf32"),
               "f16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16)}


@pytest.fixture
def exact_cudnn(monkeypatch):
    """The oracle runs on cuDNN: keep it in IEEE float32 so only our kernels use TF32 when asked."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# TF32 against the IEEE oracle only on the short reductions (C_in * kH * kW <= 63) the "tf32" entry
# of the tolerance table is meant for: TF32's error grows with the reduction's length.
CUDA_CASES = [
    pytest.param(name, dtype_name, id=f"{name}-{dtype_name}")
    for name, conv in CUDA_CONVS.items()
    for dtype_name in CUDA_DTYPES
    if dtype_name != "tf32" or conv.in_channels // conv.groups * conv.kernel()[0] * conv.kernel()[1] <= 63
]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("name, dtype_name", CUDA_CASES)
def test_cuda_conv_matches_reference(name, dtype_name, layout, exact_cudnn, monkeypatch):
    cuda_triton_or_skip()
    dtype, tol = CUDA_DTYPES[dtype_name]
    if dtype_name == "tf32":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    conv = CUDA_CONVS[name]
    for cp in sorted(set(shared_channel_counts(conv) + [conv.in_channels // 2])):
        check_conv(conv, cp, layout, dtype, device="cuda", tol=tol)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_fused_stage_and_referencing(layout, dtype_name, exact_cudnn):
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


@pytest.mark.cuda
@pytest.mark.parametrize("index", range(len(opcheck_cases())), ids=[name for name, _ in opcheck_cases()])
def test_cuda_opcheck(index):
    cuda_triton_or_skip()
    name, args = opcheck_cases("cuda")[index]  # built here: collection must not touch CUDA
    torch.library.opcheck(getattr(torch.ops.dfs_kernels, name).default, args)


@pytest.mark.cuda
def test_cuda_auto_measures_and_reports(fresh_auto_cache, exact_cudnn):
    if len(backends._auto_candidates("cuda")) < 2:
        pytest.skip(f"'auto' has a single candidate on CUDA: {backends._auto_candidates('cuda')}")
    monkeypatch_choices = backends._AUTO_CHOICES.pop("cuda", None)
    try:
        assert dfs_kernels.resolve_backend("auto", "cuda") == "auto"
        x = torch.randn(8, 32, 16, 16, device="cuda", requires_grad=True)
        w = torch.randn(32, 32, 3, 3, device="cuda", requires_grad=True)
        out = functional.partitioned_conv2d(x, w, padding=1, shared_channels=16, backend="auto")
        assert_close(out, torch.nn.functional.conv2d(x, w, padding=1), name="output")
        (entry,) = backends.auto_choices().values()
        assert entry["backend"] in backends._auto_candidates("cuda")
        assert set(entry["seconds"]) == set(backends._auto_candidates("cuda"))
    finally:
        if monkeypatch_choices is not None:
            backends._AUTO_CHOICES["cuda"] = monkeypatch_choices
