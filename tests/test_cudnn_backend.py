"""The "cudnn" backend: cuDNN writes the shared channels' input gradient in place into the full-size
gradient, one kernel of ours the referenced channels' (zeros, or an exit's pooled gradient).

On CPU: an explicit request for it fails with the reason, and its backward routes the input gradient
to its own op (traced with fake tensors). On a GPU (``cuda`` marks; they also skip where the library was
built without the backend): the ops against a float64 run of dfs_kernels.reference over strides,
dilations, groups cut by Cp, odd sizes and all layouts, in float32 (IEEE and TF32), float16 and
bfloat16; that the gradient is written in place; the fallbacks (cuDNN disabled) and the cuDNN settings
(deterministic, benchmark); "auto" measuring it among the candidates. opcheck (tests/test_opcheck.py),
torch.compile and CUDA graphs (tests/test_cuda_capture.py) and the grids of tests/test_partitioned_conv2d.py
and tests/test_referencing.py run on it too.
"""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import backends, functional, reference
from helpers import (
    CONV_GRID, CUDA_DTYPES, GPU_SIZED_CONVS, LAYOUTS, LEAN_CONV_GRID, Conv, boundary_shared_counts, compare_backward,
    conv_leaves, cuda_dtype_cases, view_of,
)

REASON_CPU = dfs_kernels.unavailable_reason("cudnn", "cpu")


def cuda_backend_or_skip():
    reason = dfs_kernels.unavailable_reason("cudnn", "cuda")
    if reason is not None:
        pytest.skip(reason)


# --- CPU ------------------------------------------------------------------------------------------


def test_explicit_request_without_cuda_names_the_backend_and_the_reason():
    assert REASON_CPU is not None and "cudnn" not in dfs_kernels.available_backends("cpu")
    x, w = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3)
    with pytest.raises(dfs_kernels.BackendUnavailableError, match="backend='cudnn' is not available on cpu") as caught:
        functional.partitioned_conv2d(x, w, padding=1, shared_channels=2, backend="cudnn")
    assert REASON_CPU in str(caught.value)
    with pytest.raises(dfs_kernels.BackendUnavailableError, match="backend='cudnn'"):
        dfs_kernels.PartitionedConv2d(4, 3, 3, shared_channels=2, backend="cudnn")(x)
    if not torch.cuda.is_available():
        with pytest.raises(dfs_kernels.BackendUnavailableError, match="backend='cudnn' is not available on cuda"):
            dfs_kernels.resolve_backend("cudnn", "cuda")


@pytest.mark.skipif(not dfs_kernels.extension_loaded(), reason="the compiled ops library is not loaded")
@pytest.mark.parametrize("stage", [False, True], ids=["conv", "stage"])
def test_backward_routes_the_input_grad_to_the_cudnn_op(stage):
    """Traced with fake tensors (no kernel runs: this holds on CPU too): the backward of the cudnn ops
    computes the input gradient with cudnn_partitioned_conv2d_input_grad (the exit's gradient passed to
    it in a stage), and asks ATen for the weight gradient only."""
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = torch.ops.dfs_kernels

    def step(x, w, grad_out, grad_pooled):
        x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
        conv_args = (None, [1, 1], [1, 1], [1, 1], 1, 3)
        if stage:
            outputs = ops.cudnn_partitioned_conv2d_with_exit_pool(x, w, *conv_args)
            return torch.autograd.grad(outputs, (x, w), (grad_out, grad_pooled))
        return torch.autograd.grad(ops.cudnn_partitioned_conv2d(x, w, *conv_args), (x, w), grad_out)

    graph = make_fx(step, tracing_mode="fake")(
        torch.randn(2, 6, 5, 4), torch.randn(4, 6, 3, 3), torch.randn(2, 4, 5, 4), torch.randn(2, 6)
    ).graph
    calls = [node for node in graph.nodes if node.op == "call_function"]
    (input_grad,) = [node for node in calls if node.target == ops.cudnn_partitioned_conv2d_input_grad.default]
    assert (len(input_grad.args) == 9) == stage  # grad_pooled given in a stage
    (weight_grad,) = [node for node in calls if node.target == torch.ops.aten.convolution_backward.default]
    assert weight_grad.args[-1][0] is False  # output_mask: no input gradient from ATen
    assert not any(node.target in (ops.pad_channels.default, ops.partitioned_conv2d_input_grad.default)
                   for node in calls)


# --- CUDA -----------------------------------------------------------------------------------------

CONVS = {
    **LEAN_CONV_GRID,
    "groups4-stride2": CONV_GRID["groups4-stride2"],
    **GPU_SIZED_CONVS,
}


def shared_channel_counts(conv: Conv) -> list[int]:
    return sorted({*boundary_shared_counts(conv), conv.in_channels // 2})


CASES = cuda_dtype_cases(CONVS)


@pytest.fixture
def cudnn_mode(monkeypatch):
    """Sets cuDNN's TF32 switch for a mode; the oracle runs in float64, where TF32 never applies."""

    def set_mode(mode: str):
        dtype, tol = CUDA_DTYPES[mode]
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", mode == "tf32")
        return dtype, tol

    return set_mode


def exact(fn):
    """``fn`` run on float64 copies of its tensor arguments, its results rounded once to their dtype:
    the oracle, free of TF32 and of intermediate rounding (and its cotangents match the backend's)."""

    def run(*tensors):
        out, dtype = fn(*(t.double() for t in tensors)), tensors[0].dtype
        return tuple(o.to(dtype) for o in out) if isinstance(out, tuple) else out.to(dtype)

    return run


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, mode", CASES)
def test_conv_matches_reference(name, mode, layout, cudnn_mode):
    cuda_backend_or_skip()
    dtype, tol = cudnn_mode(mode)
    conv, view = CONVS[name], view_of(layout)
    for cp in shared_channel_counts(conv):
        compare_backward(
            lambda b, w, c=None: functional.partitioned_conv2d(view(b), w, c, **conv.conv_args(), shared_channels=cp,
                                                               backend="cudnn"),
            exact(lambda b, w, c=None: reference.partitioned_conv2d(view(b), w, c, **conv.conv_args(),
                                                                    shared_channels=cp)),
            conv_leaves(conv, layout, dtype, "cuda"), dtype=tol, names=["input", "weight", "bias"],
        )


@pytest.mark.cuda
@pytest.mark.parametrize("used", ["both", "conv", "pooled"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, mode", [("vgg-64", "f32"), ("vgg-64", "bf16"), ("groups2", "f16"), ("k3", "tf32")],
                         ids=["vgg-64-f32", "vgg-64-bf16", "groups2-f16", "k3-tf32"])
def test_stage_matches_reference(name, mode, layout, used, cudnn_mode):
    """The DFS stage: the exit's gradient lands on [Cp, C) in the same pass that zero-fills otherwise."""
    cuda_backend_or_skip()
    dtype, tol = cudnn_mode(mode)
    conv, view = CONVS[name], view_of(layout)
    pick = {"both": lambda out: out, "conv": lambda out: out[0], "pooled": lambda out: out[1]}[used]
    for cp in shared_channel_counts(conv):
        compare_backward(
            lambda b, w, c=None: pick(functional.partitioned_conv2d_with_exit_pool(
                view(b), w, c, **conv.conv_args(), shared_channels=cp, backend="cudnn")),
            exact(lambda b, w, c=None: pick(reference.partitioned_conv2d_with_exit_pool(
                view(b), w, c, **conv.conv_args(), shared_channels=cp))),
            conv_leaves(conv, layout, dtype, "cuda"), dtype=tol, names=["input", "weight", "bias"],
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("name", ["vgg-64", "groups2", "depthwise-same", "1x1-down"])
def test_input_grad_written_in_place(name, channels_last, dtype):
    """cuDNN accepts the strided output: the input gradient's backward runs no ATen convolution_backward
    (the fallback, which computes into a tensor of its own and copies) and no channel assembly."""
    cuda_backend_or_skip()
    conv = CONVS[name]
    layout = "channels_last" if channels_last else "contiguous"
    base, weight, *bias = (t.detach() for t in conv_leaves(conv, layout, dtype, "cuda"))
    base.requires_grad_()  # only the input gradient is asked for: no weight gradient's convolution_backward
    out = functional.partitioned_conv2d(base, weight, bias[0] if bias else None, **conv.conv_args(),
                                        shared_channels=conv.in_channels // 2 + 1, backend="cudnn")
    grad = torch.randn_like(out)
    torch.autograd.grad(out, base, grad, retain_graph=True)  # the first call chooses cuDNN's algorithm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        torch.autograd.grad(out, base, grad)
    names = {event.name for event in profiler.events()}
    assert "dfs_kernels::cudnn_partitioned_conv2d_input_grad" in names
    assert not {"aten::convolution_backward", "dfs_kernels::pad_channels"} & names, sorted(names)


@pytest.mark.cuda
@pytest.mark.parametrize("setting", ["cudnn-disabled", "deterministic", "benchmark"])
def test_cudnn_settings_and_fallback(setting, monkeypatch):
    """cuDNN disabled: every convolution goes to ATen (the input gradient's then copied into its slice).
    Deterministic or benchmark: cuDNN's algorithm is chosen under that rule. The results stay the oracle's."""
    cuda_backend_or_skip()
    attribute = {"cudnn-disabled": ("enabled", False), "deterministic": ("deterministic", True),
                 "benchmark": ("benchmark", True)}[setting]
    monkeypatch.setattr(torch.backends.cudnn, *attribute)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    for conv in (CONVS["vgg-64"], CONVS["groups2"]):
        cp = conv.in_channels // 2 + 1
        for layout in ("contiguous", "channels_last"):
            compare_backward(
                lambda b, w, c=None: functional.partitioned_conv2d_with_exit_pool(
                    b, w, c, **conv.conv_args(), shared_channels=cp, backend="cudnn"),
                exact(lambda b, w, c=None: reference.partitioned_conv2d_with_exit_pool(
                    b, w, c, **conv.conv_args(), shared_channels=cp)),
                conv_leaves(conv, layout, torch.float32, "cuda"), dtype=torch.float32,
                names=["input", "weight", "bias"],
            )


@pytest.mark.cuda
def test_auto_measures_the_cudnn_backend(monkeypatch):
    cuda_backend_or_skip()
    assert "cudnn" in backends._auto_candidates("cuda")
    monkeypatch.setattr(backends.auto, "_AUTO_CACHE", {})
    monkeypatch.setattr(backends.auto, "_AUTO_TIMINGS", {})
    monkeypatch.delenv("DFS_KERNELS_AUTOTUNE_CACHE", raising=False)
    auto = backends.MeasuredAuto(["aten", "cudnn"], device_type="cuda")
    x = torch.randn(8, 32, 16, 16, device="cuda", requires_grad=True)
    w = torch.randn(32, 32, 3, 3, device="cuda", requires_grad=True)
    out = auto.partitioned_conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, 16)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, padding=1))
    (entry,) = backends.auto_choices().values()
    assert set(entry["seconds"]) == {"aten", "cudnn"} and entry["backend"] in {"aten", "cudnn"}
