"""PartitionedLinear and ``functional.partitioned_linear`` on every backend that runs here (Triton under
the interpreter) against ``dfs_kernels.reference``: outputs and every gradient over odd shapes, batch
and sequence leading axes, Cp at 0, 1, in-1 and in, float32 / float64, with and without bias; the
module's equality with ``nn.Linear`` (init, parameters, state_dict), ``from_linear`` / ``to_linear``,
validation, the in-place write of the aten input gradient, FLOPs, ``torch.compile`` and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dfs_kernels
from conftest import requires_aten
from dfs_kernels import functional, reference
from helpers import compare_backward

BACKENDS = dfs_kernels.available_backends("cpu", include_interpreted=True)
# (leading shape, in_features, out_features): rows, tokens [N, T, D], one row, a 4-D input.
SHAPES = {"rows": ((7,), 13, 5), "tokens": ((3, 5), 11, 9), "one": ((1,), 6, 3), "4d": ((2, 3, 2), 5, 4)}
CASES = [
    pytest.param(leading, in_features, out_features, cp, id=f"{name}-cp{cp}")
    for name, (leading, in_features, out_features) in SHAPES.items()
    for cp in sorted({0, 1, in_features - 1, in_features})
]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


@DTYPES
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("leading, in_features, out_features, cp", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_against_reference(backend, leading, in_features, out_features, cp, bias, dtype):
    leaves = [torch.randn(*leading, in_features, dtype=dtype).requires_grad_(),
              torch.randn(out_features, in_features, dtype=dtype).requires_grad_()]
    if bias:
        leaves.append(torch.randn(out_features, dtype=dtype).requires_grad_())
    compare_backward(
        lambda x, w, b=None: functional.partitioned_linear(x, w, b, shared_features=cp, backend=backend),
        lambda x, w, b=None: reference.partitioned_linear(x, w, b, cp),
        leaves, dtype=dtype, names=["input", "weight", "bias"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_input_and_weight(backend):
    """A transposed token tensor and a transposed weight: the kernels read strides, nothing assumes
    contiguity."""
    x = torch.randn(5, 3, 8).transpose(0, 1).requires_grad_()
    w = torch.randn(8, 6).t().requires_grad_()
    compare_backward(
        lambda x, w: functional.partitioned_linear(x, w, shared_features=3, backend=backend),
        lambda x, w: reference.partitioned_linear(x, w, None, 3), [x, w], names=["input", "weight"],
    )


@requires_aten
def test_aten_input_grad_writes_the_shared_slice_in_place():
    """The aten input gradient is one [M, in] tensor: the GEMM writes [:, :Cp] in place (no copy, no
    second allocation) and the zeros fill [:, Cp:]."""
    grad_output, x, w = torch.randn(4, 6, 5), torch.randn(4, 6, 9), torch.randn(5, 9)
    with torch.profiler.profile() as profile:
        grad = torch.ops.dfs_kernels.partitioned_linear_input_grad(grad_output, x, w, 4)
    names = [event.name for event in profile.events()]
    assert "aten::copy_" not in names and names.count("aten::empty") == 1, names
    torch.testing.assert_close(grad[..., :4], grad_output @ w[:, :4])
    assert torch.equal(grad[..., 4:], torch.zeros(4, 6, 5))


@requires_aten
def test_backward_copies_a_non_contiguous_grad_output_once():
    """Q/K/V's output gradient arrives non-contiguous (attention's head transposes). The weight-gradient
    and input-gradient GEMMs share one [M, out] copy of it, as nn.Linear's backward does: one copy, not two."""
    x, w, b = (torch.randn(*shape).requires_grad_() for shape in ((2, 6, 8), (12, 8), (12,)))
    grad = torch.randn(2, 12, 6).transpose(1, 2)  # [2, 6, 12], rows not flattenable: reshape copies
    assert not grad.is_contiguous()
    out = functional.partitioned_linear(x, w, b, shared_features=4, backend="aten")
    with torch.profiler.profile() as profile:
        out.backward(grad)
    names = [event.name for event in profile.events()]
    assert names.count("aten::copy_") == 1, names
    plain = [leaf.detach().clone().requires_grad_() for leaf in (x, w, b)]
    plain_out = F.linear(*plain)
    with torch.profiler.profile() as profile:
        plain_out.backward(grad)
    assert [event.name for event in profile.events()].count("aten::copy_") == 1  # nn.Linear's: the same one
    expected = torch.autograd.grad(reference.partitioned_linear(*plain, 4), plain, grad)
    for actual, wanted in zip((x.grad, w.grad, b.grad), expected):
        torch.testing.assert_close(actual, wanted)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend unavailable (set TRITON_INTERPRET=1 on CPU)")
@DTYPES
@pytest.mark.parametrize("cp", [16, 20, 33, 0, 40])
def test_triton_input_grad_over_several_tiles(cp, dtype):
    """More rows, input and output features than one tile (64 x 16 x 16 under the interpreter): the GEMM
    loops over output features, a tile straddling Cp masks the referenced columns of W, and the tiles of
    referenced features only store zeros, all in the one launch."""
    dfs_kernels.backends.implementation("triton", "cpu")  # imports (and so registers) the Triton ops
    grad_output, x = torch.randn(7, 10, 35, dtype=dtype), torch.randn(7, 10, 40, dtype=dtype)
    w = torch.randn(40, 35, dtype=dtype).t()  # [35, 40], strided
    grad = torch.ops.dfs_kernels.triton_partitioned_linear_input_grad(grad_output, x, w, cp)
    assert grad.shape == x.shape and grad.is_contiguous()
    torch.testing.assert_close(grad[..., :cp], grad_output @ w[:, :cp])
    assert torch.equal(grad[..., cp:], torch.zeros(7, 10, 40 - cp, dtype=dtype))


# --- the module --------------------------------------------------------------------------------------


def test_module_is_nn_linear_with_the_same_init_and_state_dict():
    torch.manual_seed(0)
    plain = nn.Linear(10, 4)
    torch.manual_seed(0)
    partitioned = dfs_kernels.PartitionedLinear(10, 4, beta=0.5)
    assert isinstance(partitioned, nn.Linear)
    assert list(partitioned.state_dict()) == list(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(partitioned.state_dict()[key], value)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(partitioned(x), plain(x), rtol=0, atol=0)
    partitioned.load_state_dict(nn.Linear(10, 4).state_dict())
    assert "shared_features=5" in repr(partitioned)


@pytest.mark.parametrize("in_features, beta, expected", [(10, 0.5, 5), (5, 0.5, 2), (7, 0.5, 4), (9, 0.1, 1),
                                                         (8, 0.0, 0), (8, 1.0, 8)])
def test_beta_rounds_like_partitioned_conv2d(in_features, beta, expected):
    linear = dfs_kernels.PartitionedLinear(in_features, 3, beta=beta)
    conv = dfs_kernels.PartitionedConv2d(in_features, 3, 1, beta=beta)
    assert linear.shared_features == conv.shared_channels == expected
    assert dfs_kernels.PartitionedLinear(in_features, 3, shared_features=1).shared_features == 1


def test_module_gradient_is_dfs():
    module = dfs_kernels.PartitionedLinear(6, 4, shared_features=2, bias=False)
    x = torch.randn(3, 6, requires_grad=True)
    module(x).square().sum().backward()
    assert torch.equal(x.grad[:, 2:], torch.zeros(3, 4)) and x.grad[:, :2].abs().sum() > 0
    expected_weight_grad = torch.autograd.grad(F.linear(x, module.weight).square().sum(), module.weight)[0]
    torch.testing.assert_close(module.weight.grad, expected_weight_grad)


def test_from_linear_and_to_linear_share_parameters():
    linear = nn.Linear(8, 3).double()
    partitioned = dfs_kernels.PartitionedLinear.from_linear(linear, beta=0.25, backend="reference")
    assert partitioned.weight is linear.weight and partitioned.bias is linear.bias
    assert partitioned.shared_features == 2 and partitioned.backend == "reference"
    assert partitioned.weight.dtype == torch.float64
    back = partitioned.to_linear()
    assert type(back) is nn.Linear and back.weight is linear.weight and back.bias is linear.bias
    no_bias = dfs_kernels.PartitionedLinear.from_linear(nn.Linear(4, 2, bias=False), shared_features=3)
    assert no_bias.bias is None and no_bias.to_linear().bias is None


def test_settable_partition_is_validated():
    module = dfs_kernels.PartitionedLinear(8, 3)
    module.shared_features = 3
    assert module.shared_features == 3 and module.beta == 3 / 8
    module.beta = 0.75
    assert module.shared_features == 6
    with pytest.raises(ValueError, match=r"shared_features must be in \[0, 8\]"):
        module.shared_features = 9
    with pytest.raises(TypeError, match="shared_features must be an int"):
        module.shared_features = 2.0
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        module.beta = 1.5
    assert module.shared_features == 6


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"shared_features must be in \[0, 4\]"):
        dfs_kernels.PartitionedLinear(4, 2, shared_features=5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        dfs_kernels.PartitionedLinear(4, 2, beta=-0.1)
    with pytest.raises(ValueError, match="backend"):
        dfs_kernels.PartitionedLinear(4, 2, backend="nope")
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        dfs_kernels.PartitionedLinear.from_linear(nn.Conv2d(4, 2, 1))
    with pytest.raises(ValueError, match="linear is an uninitialized lazy layer"):
        dfs_kernels.PartitionedLinear.from_linear(nn.LazyLinear(3))
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"input must have weight.shape\[1\] = 4 features"):
        functional.partitioned_linear(torch.randn(2, 5), w, shared_features=1)
    with pytest.raises(ValueError, match="weight must be a 2-D"):
        functional.partitioned_linear(torch.randn(2, 4), w[0], shared_features=1)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        functional.partitioned_linear(torch.randn(2, 4), w, torch.randn(4), shared_features=1)
    with pytest.raises(TypeError, match="weight must have input's dtype"):
        functional.partitioned_linear(torch.randn(2, 4), w.double(), shared_features=1)
    with pytest.raises(TypeError, match="input must have a floating dtype"):
        functional.partitioned_linear(torch.ones(2, 4, dtype=torch.long), w, shared_features=1)
    with pytest.raises(ValueError, match=r"shared_features must be in \[0, 4\]"):
        functional.partitioned_linear(torch.randn(2, 4), w, shared_features=-1)


# --- counting, compiling, exporting ------------------------------------------------------------------


@pytest.mark.parametrize("backend", [name for name in ("aten",) if name in BACKENDS])
def test_flops_count_the_saving(backend):
    module = dfs_kernels.PartitionedLinear(16, 8, shared_features=4, bias=False, backend=backend)
    x = torch.randn(10, 16, requires_grad=True)
    dfs_kernels.register_flop_formulas()
    with FlopCounterMode(display=False) as partitioned:
        module(x).sum().backward()
    with FlopCounterMode(display=False) as plain:
        F.linear(x, module.weight).sum().backward()
    matmul = 2 * 10 * 16 * 8
    assert plain.get_total_flops() == 3 * matmul  # forward, input gradient, weight gradient
    assert partitioned.get_total_flops() == 2 * matmul + matmul * 4 // 16


@requires_aten
def test_compile_fullgraph_matches_eager():
    model = nn.Sequential(dfs_kernels.PartitionedLinear(12, 16, beta=0.5, backend="aten"), nn.GELU(),
                          dfs_kernels.PartitionedLinear(16, 4, beta=0.25, backend="aten"))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 12)
    compare_backward(lambda x: compiled(x), lambda x: model(x), [x.requires_grad_()], names=["x"])


@requires_aten
def test_export_lowers_a_token_model_to_aten():
    class TokenExit(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = dfs_kernels.PartitionedLinear(8, 6, beta=0.5)

        def forward(self, tokens):
            return functional.exit_avg_pool(self.proj(tokens), 3, dim=-1)

    model, tokens = TokenExit().eval(), torch.randn(2, 5, 8)
    program = torch.export.export(model, (tokens,)).run_decompositions(dfs_kernels.export_decompositions())
    assert not any(str(node.target).startswith("dfs_kernels.") for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(tokens), model.proj.to_linear()(tokens).mean(dim=1))


# --- CUDA: every GPU backend, half precision included -----------------------------------------------

CUDA_BACKENDS = ["aten", "cudnn", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("cp", [0, 1, 95, 96, 48])
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_against_reference(backend, cp, dtype):
    reason = dfs_kernels.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)
    leaves = [torch.randn(4, 33, 96, device="cuda", dtype=dtype).requires_grad_(),
              torch.randn(80, 96, device="cuda", dtype=dtype).requires_grad_(),
              torch.randn(80, device="cuda", dtype=dtype).requires_grad_()]
    compare_backward(
        lambda x, w, b: functional.partitioned_linear(x, w, b, shared_features=cp, backend=backend),
        lambda x, w, b: reference.partitioned_linear(x, w, b, cp),
        leaves, dtype=dtype, names=["input", "weight", "bias"],
    )


@pytest.mark.parametrize("prefix", [p for p, name in (("", "aten"), ("triton_", "triton")) if name in BACKENDS])
def test_input_grad_op_refuses_bad_arguments(prefix):
    """Called directly, each backend's input-gradient op checks what the kernel would otherwise read out of
    bounds or get silently wrong, and names the argument."""
    if prefix:
        dfs_kernels.backends.implementation("triton", "cpu")
    op = getattr(torch.ops.dfs_kernels, f"{prefix}partitioned_linear_input_grad")
    grad_output, x, w = torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(4, 6)
    errors = (RuntimeError, ValueError)  # a TORCH_CHECK is a RuntimeError
    for cp in (-1, 7):
        with pytest.raises(errors, match=r"shared_features must be in \[0, in_features=6\]"):
            op(grad_output, x, w, cp)
    with pytest.raises(errors, match="grad_output must be input's leading sizes and out_features=4"):
        op(torch.randn(2, 3, 5), x, w, 3)
    with pytest.raises(errors, match="grad_output must be input's leading sizes"):
        op(torch.randn(3, 2, 4), x, w, 3)
    with pytest.raises(errors, match=r"input must be \[..., in_features=6\]"):
        op(grad_output, torch.randn(2, 3, 5), w, 3)
    with pytest.raises(errors, match="weight must be 2-D"):
        op(grad_output, x, w[None], 3)
