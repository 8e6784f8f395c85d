"""reroute, exit_reference and exit_avg_pool with the channels on another axis than 1 (tokens
[N, T, D] on ``dim=-1``), on every backend that runs here (Triton under the interpreter) against
``dfs_kernels.reference``; that the kernels read contiguous tokens as views; and that a bad ``dim``
is refused with an error naming it."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional, reference
from dfs_kernels.ops.channels import as_feature_map
from dfs_kernels.ops.exit_avg_pool import pooled_feature_map
from helpers import compare_backward

BACKENDS = dfs_kernels.available_backends("cpu", include_interpreted=True)
# (shape, dim): tokens on the last axis, given as -1 and as its index, a 4-D map on its last axis, a
# middle axis, [N, D], and feature maps on dim 1 for comparison.
SHAPES = {
    "tokens": ((3, 5, 7), -1),
    "tokens-index": ((2, 9, 6), 2),
    "batch1-tokens": ((1, 4, 5), -1),
    "map-last": ((2, 3, 4, 5), -1),
    "middle": ((2, 5, 3, 2), 2),
    "rows": ((4, 6), -1),
    "map": ((2, 7, 3, 3), 1),
}
CASES = [
    pytest.param(shape, dim, cp, id=f"{name}-cp{cp}")
    for name, (shape, dim) in SHAPES.items()
    for cp in sorted({0, 1, shape[dim] - 1, shape[dim]})
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _leaf(shape, dtype, strided):
    """A leaf and the view the op reads: the leaf itself, or every other row of the first axis after
    the batch (a layout the kernels cannot read as a view, so it is reshaped)."""
    if not strided:
        base = torch.randn(shape, dtype=dtype).requires_grad_()
        return base, lambda b: b
    wide = (shape[0], 2 * shape[1], *shape[2:])
    return torch.randn(wide, dtype=dtype).requires_grad_(), lambda b: b[:, ::2]


@DTYPES
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("shape, dim, cp", CASES)
@pytest.mark.parametrize("op", ["reroute", "exit_reference", "exit_avg_pool"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_reference(backend, op, shape, dim, cp, strided, dtype):
    if backend == "triton" and strided:
        pytest.skip("the interpreter is slow; one layout is enough for the Python path every backend shares")
    base, view = _leaf(shape, dtype, strided)
    actual, expected = getattr(functional, op), getattr(reference, op)
    compare_backward(
        lambda b: actual(view(b), cp, dim=dim, backend=backend),
        lambda b: expected(view(b), cp, dim), [base], names=["x"], dtype=dtype,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_view_unused(backend):
    """Only one of reroute's views sends a gradient: the other side of x gets zeros."""
    x = torch.randn(2, 3, 6, requires_grad=True)
    for branch in (0, 1):
        out = functional.reroute(x, 2, dim=-1, backend=backend)[branch]
        (grad,) = torch.autograd.grad(out.sum(), x)
        expected = torch.zeros_like(x)
        if branch == 0:
            expected[..., :2] = 1
        else:
            expected[..., 2:] = 1
        torch.testing.assert_close(grad, expected, rtol=0, atol=0)


def test_kernels_read_contiguous_tokens_as_views():
    """The compiled and Triton kernels see contiguous tokens through views, never copies: [N * T, D, 1, 1]
    for the split point, [N, D, T, 1] (NHWC) for the pool, whose backward then comes back contiguous."""
    tokens = torch.randn(3, 5, 7)
    merged = as_feature_map(tokens, 2)
    pooled = pooled_feature_map(tokens, 2)
    assert merged.shape == (15, 7, 1, 1) and merged.data_ptr() == tokens.data_ptr()
    assert pooled.shape == (3, 7, 5, 1) and pooled.data_ptr() == tokens.data_ptr()
    assert pooled.is_contiguous(memory_format=torch.channels_last)
    if dfs_kernels.extension_loaded():
        x = tokens.clone().requires_grad_()
        functional.exit_avg_pool(x, 3, dim=-1, backend="aten").sum().backward()
        assert x.grad.is_contiguous()


def test_feature_reroute_module_on_tokens():
    module = dfs_kernels.FeatureReroute(6, beta=0.5, dim=-1)
    x = torch.randn(2, 4, 6, requires_grad=True)
    backbone, exit_view = module(x)
    expected = reference.reroute(x, 3, -1)
    torch.testing.assert_close(backbone, expected[0])
    assert "dim=-1" in repr(module)
    with pytest.raises(ValueError, match="x must have 6 channels on dim -1"):
        module(torch.randn(2, 6, 4))


@pytest.mark.parametrize("call", ["reroute", "exit_reference", "exit_avg_pool"])
def test_bad_dim_is_refused(call):
    fn = getattr(functional, call)
    with pytest.raises(ValueError, match=r"dim must name a channel axis .* got dim=0"):
        fn(torch.randn(2, 3, 4), 1, dim=0)
    with pytest.raises(ValueError, match=r"dim must name a channel axis .* got dim=3"):
        fn(torch.randn(2, 3, 4), 1, dim=3)
    with pytest.raises(TypeError, match="dim must be an int"):
        fn(torch.randn(2, 3, 4), 1, dim=1.0)
    with pytest.raises(ValueError, match=r"shared_channels must be in \[0, 4\]"):
        fn(torch.randn(2, 3, 4), 5, dim=-1)
    with pytest.raises(ValueError, match="x must be 4-D"):  # dim=1 keeps meaning [N, C, H, W]
        fn(torch.randn(2, 3, 4), 1, dim=1)


@pytest.mark.skipif("aten" not in BACKENDS, reason="aten backend unavailable")
def test_compile_fullgraph_on_tokens():
    def split_and_pool(tokens):
        backbone, exit_view = functional.reroute(tokens, 3, dim=-1, backend="aten")
        return backbone.tanh(), functional.exit_avg_pool(exit_view.sin(), 3, dim=-1, backend="aten")

    compiled = torch.compile(split_and_pool, backend="aot_eager", fullgraph=True)
    tokens = torch.randn(2, 5, 7, requires_grad=True)
    compare_backward(compiled, split_and_pool, [tokens], names=["tokens"])
