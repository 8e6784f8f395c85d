"""reroute, exit_reference, exit_avg_pool and ExitHead on every backend against dfs_kernels.reference."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional, reference
from helpers import LAYOUTS, compare_backward, feature_map, view_of

SHAPES = {"odd": (2, 7, 5, 3), "batch1": (1, 6, 4, 4), "1x1": (3, 5, 1, 1)}
CASES = [
    pytest.param(shape, cp, id=f"{name}-cp{cp}")
    for name, shape in SHAPES.items()
    for cp in sorted({0, 1, shape[1] - 1, shape[1], round(0.5 * shape[1])})
]
BACKENDS_CPU = dfs_kernels.available_backends("cpu")
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, cp", CASES)
@pytest.mark.parametrize("backend", BACKENDS_CPU)
class TestAgainstReference:
    def test_reroute(self, backend, shape, cp, layout, dtype):
        base, _ = feature_map(shape, layout=layout, dtype=dtype)
        view = view_of(layout)
        compare_backward(
            lambda b: functional.reroute(view(b), cp, backend=backend),
            lambda b: reference.reroute(view(b), cp),
            [base], names=["x"],
        )

    def test_reroute_one_branch_used(self, backend, shape, cp, layout, dtype):
        """Only the exit (or only the backbone) sends a gradient: the other side reads as zeros."""
        base, _ = feature_map(shape, layout=layout, dtype=dtype)
        view = view_of(layout)
        for branch in (0, 1):
            compare_backward(
                lambda b: functional.reroute(view(b), cp, backend=backend)[branch] * 2,
                lambda b: reference.reroute(view(b), cp)[branch] * 2,
                [base], names=["x"],
            )

    def test_exit_reference(self, backend, shape, cp, layout, dtype):
        base, _ = feature_map(shape, layout=layout, dtype=dtype)
        view = view_of(layout)
        compare_backward(
            lambda b: functional.exit_reference(view(b), cp, backend=backend),
            lambda b: reference.exit_reference(view(b), cp),
            [base], names=["x"],
        )

    def test_exit_head(self, backend, shape, cp, layout, dtype):
        base, _ = feature_map(shape, layout=layout, dtype=dtype)
        view = view_of(layout)
        head = dfs_kernels.ExitHead(shape[1], 4, shared_channels=cp, bias=True, backend=backend, dtype=dtype)
        weight, bias = head.fc.weight.detach(), head.fc.bias.detach()
        compare_backward(
            lambda b, w, c: torch.func.functional_call(head, {"fc.weight": w, "fc.bias": c}, (view(b),)),
            lambda b, w, c: reference.exit_head(view(b), w, c, cp),
            [base, weight.requires_grad_(), bias.requires_grad_()], names=["x", "fc.weight", "fc.bias"],
        )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape, cp", CASES)
@pytest.mark.parametrize("backend", dfs_kernels.BACKENDS)
def test_referencing_cuda(backend, shape, cp, layout, dtype):
    if dfs_kernels.unavailable_reason(backend, "cuda"):
        pytest.skip(dfs_kernels.unavailable_reason(backend, "cuda"))
    base, _ = feature_map(shape, layout=layout, dtype=dtype, device="cuda")
    view = view_of(layout)
    compare_backward(
        lambda b: (*functional.reroute(view(b), cp, backend=backend), functional.exit_avg_pool(view(b), cp, backend=backend)),
        lambda b: (*reference.reroute(view(b), cp), reference.exit_avg_pool(view(b), cp)),
        [base], names=["x"], dtype=dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_reroute_returns_views_without_copy(backend):
    x = torch.randn(2, 6, 3, 3)
    backbone, exit_view = functional.reroute(x, 3, backend=backend)
    if backend != "reference":  # the oracle concatenates, as the original code did
        assert backbone.data_ptr() == x.data_ptr() and exit_view.data_ptr() == x.data_ptr()
    torch.testing.assert_close(backbone, x, rtol=0, atol=0)
    torch.testing.assert_close(exit_view, x, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS_CPU)
def test_gradcheck(backend):
    """Numerical gradients where the stop-gradients say there is a gradient, in float64: the
    backbone's shared channels, the exit's referenced channels and the pooled exit."""
    cp = 3
    x = torch.randn(2, 7, 4, 5, dtype=torch.float64)
    shared, referenced = x[:, :cp].clone().requires_grad_(), x[:, cp:].clone().requires_grad_()

    def fn(shared, referenced):
        x = torch.cat([shared, referenced], 1)
        backbone, exit_view = functional.reroute(x, cp, backend=backend)
        pooled = functional.exit_avg_pool(x, cp, backend=backend)
        return backbone[:, :cp] * 1.5, exit_view[:, cp:] * 0.5, pooled[:, cp:]

    assert torch.autograd.gradcheck(fn, (shared, referenced))
