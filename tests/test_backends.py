"""The backend registry and "auto": availability and its reasons, resolution (an explicit backend
never falls back), the lazy import of triton, tracing under torch.compile from a fresh process, and
"auto"'s measured choice per call key (with an injected timer on CPU; with CUDA events on a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import dfs_kernels
from dfs_kernels import backends, reference
from dfs_kernels.testing import assert_close
from helpers import exact_cuda_math  # noqa: F401  (a fixture)

CUDA = torch.cuda.is_available()
TRITON_CPU_REASON = dfs_kernels.unavailable_reason("triton", "cpu")


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


def test_measured_auto_token_ops_and_linear(fresh_auto_cache):
    """The channel axis and the linear layer go through the measured choice like the other ops, each
    call shape its own key."""
    auto = backends.MeasuredAuto(["aten", "reference"], device_type="cpu", timer=FakeTimer([1.0, 0.5]))
    tokens = torch.randn(2, 5, 6, requires_grad=True)
    weight = torch.randn(4, 6, requires_grad=True)
    assert_close(auto.exit_avg_pool(tokens, 3, 2), tokens.mean(dim=1), name="pooled")
    assert_close(auto.partitioned_linear(tokens, weight, None, 3), tokens @ weight.t(), name="linear")
    keys = list(backends.auto_choices())
    assert [key[0] for key in keys] == ["exit_avg_pool", "partitioned_linear"]
    assert all(entry["backend"] == "reference" for entry in backends.auto_choices().values())


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


@pytest.mark.cuda
def test_cuda_auto_measures_and_reports(fresh_auto_cache, exact_cuda_math):
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


def test_auto_is_a_backend_name_only_for_resolution():
    """Every backend resolves once; "auto" is not a backend of its own in the availability queries."""
    with pytest.raises(ValueError, match="not 'auto'"):
        dfs_kernels.unavailable_reason("auto", "cpu")
    assert backends.implementation("auto", "cpu").name == dfs_kernels.resolve_backend("auto", "cpu")
    assert backends.implementation("reference", "cpu").name == "reference"
    assert "cudnn" in dfs_kernels.BACKENDS and "cuda" not in dfs_kernels.BACKENDS
