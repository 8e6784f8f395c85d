"""The host path of a training call on the "aten" backend: the autograd of the compiled ops is C++
(csrc/autograd/), so a backward runs no Python at all, and a DFS module records one autograd node; under
``torch.no_grad()`` a module runs its PyTorch counterpart's forward. Speed itself is measured in
bench/bench_host_overhead.py, never here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional

pytestmark = pytest.mark.skipif(
    dfs_kernels.unavailable_reason("aten", "cpu") is not None, reason="the compiled ops library is not loaded"
)

COMPILED_AUTOGRAD_OPS = ("partitioned_conv2d", "partitioned_conv2d_with_exit_pool", "partitioned_linear",
                         "cudnn_partitioned_conv2d", "cudnn_partitioned_conv2d_with_exit_pool",
                         "cudnn_partitioned_linear", "exit_avg_pool", "reroute", "exit_reference")


def _python_calls(fn) -> list[str]:
    """The Python functions that run while ``fn()`` runs (the profiler hook sees every Python frame)."""
    calls = []

    def hook(frame, event, arg):
        if event == "call":
            calls.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}")

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return [call for call in calls if not call.endswith(":hook")]


def _modules():
    x_map = torch.randn(2, 8, 5, 5)
    return [
        (dfs_kernels.PartitionedConv2d(8, 6, 3, padding=1, shared_channels=3, backend="aten"), x_map),
        (dfs_kernels.PartitionedConv2d(8, 6, 3, padding=1, groups=2, bias=False, shared_channels=5, backend="auto"),
         x_map.contiguous(memory_format=torch.channels_last)),
        (dfs_kernels.PartitionedLinear(8, 6, shared_features=3, backend="aten"), torch.randn(2, 4, 8)),
        (dfs_kernels.FeatureReroute(8, shared_channels=3, backend="aten"), x_map),
        (dfs_kernels.FeatureReroute(8, shared_channels=5, dim=-1, backend="aten"), torch.randn(2, 4, 8)),
        (dfs_kernels.ExitHead(8, 4, shared_channels=3, backend="aten"), x_map),
    ]


@pytest.mark.parametrize("name", COMPILED_AUTOGRAD_OPS)
def test_compiled_ops_have_cpp_autograd(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"dfs_kernels::{name}", "Autograd")


@pytest.mark.parametrize("index", range(len(_modules())))
def test_backward_runs_no_python(index):
    module, x = _modules()[index]
    x = x.detach().requires_grad_()
    outputs = module(x)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = tuple(torch.randn_like(out) for out in outputs)
    engine = torch.autograd.Variable._execution_engine  # the C++ engine, without the Python of autograd.backward
    run = lambda: engine.run_backward(outputs, grads, False, False, (), True, True)  # noqa: E731
    assert _python_calls(run) == ["test_hot_path.py:<lambda>"]
    assert x.grad is not None


@pytest.mark.parametrize("index", range(3))
def test_training_call_records_one_node(index):
    """The DFS module's output hangs off one C++ node whose next edges lead to the leaves."""
    module, x = _modules()[index]
    x = x.detach().requires_grad_()
    node = module(x).grad_fn
    leaves = {id(fn.variable) for fn, _ in node.next_functions if fn is not None and hasattr(fn, "variable")}
    assert id(x) in leaves and id(module.weight) in leaves


@pytest.mark.parametrize("index", range(len(_modules())))
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_forward_equals_training_forward(index, mode):
    module, x = _modules()[index]
    expected = module(x)
    with mode():
        actual = module(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_no_grad_forward_calls_no_dfs_op():
    """Under torch.no_grad a PartitionedConv2d is an nn.Conv2d: no dfs_kernels op runs."""
    module, x = _modules()[0]
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        module(x)
    names = {event.name for event in profile.events()}
    assert not any(name.startswith("dfs_kernels::") for name in names), names
    assert "aten::conv2d" in names


def test_no_grad_shortcut_keeps_forward_ad():
    """Forward-mode AD records a derivative even under no_grad: the DFS tangent, not conv2d's."""
    from torch.autograd import forward_ad

    module, x = _modules()[0]
    tangent = torch.randn_like(x)
    with torch.no_grad(), forward_ad.dual_level():
        out = forward_ad.unpack_dual(module(forward_ad.make_dual(x, tangent))).tangent
    expected = torch.nn.functional.conv2d(
        torch.cat([tangent[:, :3], torch.zeros_like(tangent[:, 3:])], 1), module.weight, None, padding=1
    )
    torch.testing.assert_close(out, expected)
    assert functional.records_no_derivative() is False  # grad mode is back on here


@pytest.mark.parametrize("name", ["triton_partitioned_conv2d", "triton_partitioned_linear", "triton_exit_avg_pool"])
def test_triton_ops_keep_their_python_formulas(name):
    """triton_op gives every Triton op an Autograd kernel of torch's own, which must not be taken for a
    C++ formula: the Python one is what the Triton backend differentiates with."""
    assert not dfs_kernels._library.has_autograd_kernel(f"dfs_kernels::{name}")
