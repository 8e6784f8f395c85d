"""Derivatives beyond the first backward, on every backend against ``dfs_kernels.reference``:
double backward (``create_graph=True``) equal to the reference's and ``gradgradcheck`` in float64,
forward-mode AD (``jvp``, ``jacfwd``, dual tensors), ``torch.func.grad`` / ``jacrev`` and per-sample
gradients (``vmap(grad)``), an input gradient that is a tensor at every Cp, never None, and the
registered backward ops' own derivatives (``gradcheck`` / ``gradgradcheck`` of each, called directly)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

from torch.utils import _pytree

import dfs_kernels
from dfs_kernels import backends, functional, reference
from dfs_kernels.testing import assert_close
from helpers import opcheck_cases

BACKENDS = dfs_kernels.available_backends("cpu", include_interpreted=True)
CP, C = 2, 5
CONV_ARGS = dict(stride=(2, 1), padding=1, dilation=1, groups=1)


def _op(name: str, backend: str):
    """(function of the leaves, leaves) for op ``name``; ``backend="reference"`` gives the oracle."""
    x = torch.randn(2, C, 5, 4, dtype=torch.float64)
    w = torch.randn(3, C, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    fc = torch.randn(4, C, dtype=torch.float64)
    oracle = backend == "reference"
    if name == "partitioned_conv2d":
        if oracle:
            return (lambda x, w, b: reference.partitioned_conv2d(x, w, b, **CONV_ARGS, shared_channels=CP)), (x, w, b)
        return (lambda x, w, b: functional.partitioned_conv2d(x, w, b, **CONV_ARGS, shared_channels=CP,
                                                              backend=backend)), (x, w, b)
    if name == "stage":
        args = dict(padding=1, shared_channels=CP)
        if oracle:
            return (lambda x, w, b: reference.partitioned_conv2d_with_exit_pool(x, w, b, **args)), (x, w, b)
        return (lambda x, w, b: functional.partitioned_conv2d_with_exit_pool(x, w, b, **args, backend=backend)), (x, w, b)
    if name == "exit_head":
        if oracle:
            return (lambda x, fc: reference.exit_head(x, fc, None, CP)), (x, fc)
        head = dfs_kernels.ExitHead(C, 4, shared_channels=CP, bias=False, backend=backend).double()
        return (lambda x, fc: torch.func.functional_call(head, {"fc.weight": fc}, (x,))), (x, fc)
    if name == "partitioned_linear":
        leaves = (torch.randn(2, 3, C, dtype=torch.float64), torch.randn(4, C, dtype=torch.float64),
                  torch.randn(4, dtype=torch.float64))
        if oracle:
            return (lambda x, w, b: reference.partitioned_linear(x, w, b, CP)), leaves
        return (lambda x, w, b: functional.partitioned_linear(x, w, b, shared_features=CP, backend=backend)), leaves
    source = reference if oracle else functional
    if name.endswith(TOKENS):  # the channels on the last axis of tokens [N, T, C]
        fn = getattr(source, name.removesuffix(TOKENS))
        tokens = torch.randn(2, 3, C, dtype=torch.float64)
        if oracle:
            return (lambda x: fn(x, CP, -1)), (tokens,)
        return (lambda x: fn(x, CP, dim=-1, backend=backend)), (tokens,)
    extra = {} if oracle else {"backend": backend}
    fn = getattr(source, name)
    return (lambda x: fn(x, CP, **extra)), (x,)


TOKENS = "_tokens"
OPS = ["partitioned_conv2d", "stage", "reroute", "exit_reference", "exit_avg_pool", "exit_head", "partitioned_linear",
       "reroute_tokens", "exit_reference_tokens", "exit_avg_pool_tokens"]


def _channel_axis(name: str) -> int:
    return -1 if name.endswith(TOKENS) or name == "partitioned_linear" else 1


def _outputs(fn, leaves):
    out = fn(*leaves)
    return out if isinstance(out, tuple) else (out,)


def _second_order(fn, leaves, seed=0):
    """Outputs, first gradients (recorded) and the gradients of <first gradients, v> for fixed random
    cotangents: a Hessian-vector product of a quadratic loss."""
    generator = torch.Generator().manual_seed(seed)
    leaves = [leaf.detach().clone().requires_grad_() for leaf in leaves]
    outputs = _outputs(fn, leaves)
    loss = sum((out.square() * torch.rand(out.shape, generator=generator, dtype=out.dtype)).sum() for out in outputs)
    first = torch.autograd.grad(loss, leaves, create_graph=True)
    probe = sum((g * torch.randn(g.shape, generator=generator, dtype=g.dtype)).sum() for g in first)
    second = torch.autograd.grad(probe, leaves, allow_unused=True)
    return outputs, first, second


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_equals_reference(backend, name):
    fn, leaves = _op(name, backend)
    expected_fn, _ = _op(name, "reference")
    actual = _second_order(fn, leaves)
    expected = _second_order(expected_fn, leaves)
    for kind, a_list, e_list in zip(("output", "grad", "grad of grad"), actual, expected):
        for i, (a, e) in enumerate(zip(a_list, e_list)):
            assert_close(a, e, name=f"{name} {kind} {i}", like=leaves[min(i, len(leaves) - 1)])
    assert any(g is not None and g.abs().max() > 0 for g in actual[2])  # not a silent zero


def _checkable_functions(name: str, backend: str):
    """[(fn, inputs)] whose derivatives gradcheck can compare with finite differences. A stop-gradient
    is not a derivative (finite differences see through it), so the shared and referenced channels
    are split, and each function takes as inputs only the channels whose gradient DFS lets through
    to its outputs, the others being constants (the stop-gradients themselves are covered by the
    comparison with the reference)."""
    fn, leaves = _op(name, backend)
    x, *params = leaves
    axis = _channel_axis(name)
    shared, referenced = (part.clone() for part in x.split([CP, C - CP], dim=axis))
    with_shared = lambda s, *params: fn(torch.cat([s, referenced], axis), *params)  # noqa: E731
    with_referenced = lambda r, *params: fn(torch.cat([shared, r], axis), *params)  # noqa: E731
    if name in ("partitioned_conv2d", "partitioned_linear"):
        return [(with_shared, (shared, *params))]
    if name == "stage":
        return [(lambda s, *params: with_shared(s, *params)[0], (shared, *params)),
                (lambda r, *params: with_referenced(r, *params)[1], (referenced, *params))]
    if name.startswith("reroute"):
        return [(lambda s: with_shared(s)[0], (shared,)), (lambda r: with_referenced(r)[1], (referenced,))]
    return [(with_referenced, (referenced, *params))]


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend, name):
    # Under the Triton interpreter each forward costs about a second: compare random projections of
    # the Jacobians (fast mode) rather than every column.
    fast = backend == "triton"
    for fn, inputs in _checkable_functions(name, backend):
        inputs = tuple(t.detach().clone().requires_grad_() for t in inputs)
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


# --- forward mode and torch.func --------------------------------------------------------------------


def _loss(fn):
    return lambda *leaves: sum(out.square().sum() for out in _outputs(fn, leaves))


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_and_dual_tensors_equal_reference(backend, name):
    fn, leaves = _op(name, backend)
    expected_fn, _ = _op(name, "reference")
    tangents = tuple(torch.randn_like(leaf) for leaf in leaves)
    out, tangent_out = torch.func.jvp(fn, leaves, tangents)
    expected_out, expected_tangent = torch.func.jvp(expected_fn, leaves, tangents)
    for a, e in zip(_as_tuple(tangent_out), _as_tuple(expected_tangent)):
        assert_close(a, e, name=f"{name} jvp tangent")
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(leaf, tangent) for leaf, tangent in zip(leaves, tangents)]
        for a, e in zip(_outputs(fn, duals), _as_tuple(expected_tangent)):
            assert_close(forward_ad.unpack_dual(a).tangent, e, name=f"{name} dual tangent")


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_jacrev_jacfwd_equal_reference(backend, name):
    fn, leaves = _op(name, backend)
    expected_fn, _ = _op(name, "reference")
    argnums = tuple(range(len(leaves)))
    for transform in (torch.func.grad,):
        actual, expected = transform(_loss(fn), argnums)(*leaves), transform(_loss(expected_fn), argnums)(*leaves)
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, name=f"{name} func.grad {i}")
    first = lambda *leaves: _outputs(fn, leaves)[0].sum(dim=0)  # noqa: E731  (a small Jacobian)
    expected_first = lambda *leaves: _outputs(expected_fn, leaves)[0].sum(dim=0)  # noqa: E731
    for transform in (torch.func.jacrev, torch.func.jacfwd):
        actual, expected = transform(first, argnums=0)(*leaves), transform(expected_first, argnums=0)(*leaves)
        assert_close(actual, expected, name=f"{name} {transform.__name__}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_with_vmap(backend):
    """vmap(grad(...)) over the batch, as differentially private training computes per-sample
    gradients: equal to one backward per sample on the reference. A partitioned convolution, an
    exit head and a partitioned linear layer (on the last axis of x, as on tokens)."""
    conv = dfs_kernels.PartitionedConv2d(C, 4, 3, padding=1, shared_channels=CP, backend=backend).double()
    head = dfs_kernels.ExitHead(C, 3, shared_channels=CP, bias=True, backend=backend).double()
    linear = dfs_kernels.PartitionedLinear(4, 3, shared_features=CP, backend=backend).double()
    modules = torch.nn.ModuleDict({"conv": conv, "head": head, "linear": linear})
    params = {k: v.detach() for k, v in modules.named_parameters()}

    def loss(params, x):
        x = x.unsqueeze(0)
        outputs = [torch.func.functional_call(module, _sub(params, name), (x,)) for name, module in modules.items()]
        return sum(out.square().mean() for out in outputs)

    x = torch.randn(3, C, 5, 4, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        sample = x[i:i + 1]
        value = (reference.partitioned_conv2d(sample, leaves["conv.weight"], leaves["conv.bias"], padding=1,
                                              shared_channels=CP).square().mean()
                 + reference.exit_head(sample, leaves["head.fc.weight"], leaves["head.fc.bias"], CP).square().mean()
                 + reference.partitioned_linear(sample, leaves["linear.weight"], leaves["linear.bias"],
                                                CP).square().mean())
        expected = torch.autograd.grad(value, list(leaves.values()))
        for (key, actual), e in zip(per_sample.items(), expected):
            assert_close(actual[i], e, name=f"sample {i} {key}")


def _sub(params: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix + "."): v for k, v in params.items() if k.startswith(prefix + ".")}


# --- the input gradient is a tensor at every Cp ------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_gradient_is_a_tensor_at_every_cp(backend):
    """Every backend, the oracle included, gives x a gradient tensor at Cp = 0 and C, zero where DFS
    says so: ``torch.autograd.grad(y, x)`` never raises "not used in the graph"."""
    x = torch.randn(2, C, 5, 4, requires_grad=True)
    w = torch.randn(3, C, 3, 3)
    w_linear = torch.randn(3, 4)  # on the last axis of x, of size 4
    for cp in (0, C):
        checks = {
            "partitioned_conv2d": lambda: functional.partitioned_conv2d(x, w, padding=1, shared_channels=cp,
                                                                        backend=backend),
            "stage conv": lambda: functional.partitioned_conv2d_with_exit_pool(x, w, padding=1, shared_channels=cp,
                                                                               backend=backend)[0],
            "exit_reference": lambda: functional.exit_reference(x, cp, backend=backend),
            "exit_avg_pool": lambda: functional.exit_avg_pool(x, cp, backend=backend),
            "reroute backbone": lambda: functional.reroute(x, cp, backend=backend)[0],
            "reroute exit": lambda: functional.reroute(x, cp, backend=backend)[1],
            "partitioned_linear": lambda: functional.partitioned_linear(x, w_linear, shared_features=min(cp, 4),
                                                                        backend=backend),
            "token exit_avg_pool": lambda: functional.exit_avg_pool(x, min(cp, 4), dim=-1, backend=backend),
        }
        expected_runs = {
            "partitioned_conv2d": lambda: reference.partitioned_conv2d(x, w, padding=1, shared_channels=cp),
            "stage conv": lambda: reference.partitioned_conv2d(x, w, padding=1, shared_channels=cp),
            "exit_reference": lambda: reference.exit_reference(x, cp),
            "exit_avg_pool": lambda: reference.exit_avg_pool(x, cp),
            "reroute backbone": lambda: reference.reroute(x, cp)[0],
            "reroute exit": lambda: reference.reroute(x, cp)[1],
            "partitioned_linear": lambda: reference.partitioned_linear(x, w_linear, None, min(cp, 4)),
            "token exit_avg_pool": lambda: reference.exit_avg_pool(x, min(cp, 4), -1),
        }
        for name, run in checks.items():
            (grad,) = torch.autograd.grad(run().square().sum(), x)  # raises if x got no gradient at all
            (expected,) = torch.autograd.grad(expected_runs[name]().square().sum(), x)
            assert_close(grad, expected, name=f"{name} at Cp={cp}")
            if cp == 0 and name in ("partitioned_conv2d", "stage conv", "reroute backbone", "partitioned_linear"):
                assert not grad.any(), f"{name} at Cp=0: every channel is referenced, the gradient must be zero"


# --- the registered backward ops, differentiated directly ---------------------------------------------

# The ops a first backward calls; their own autograd formulas serve a backward that differentiates
# them (the recorded backward of the forward ops uses _composite instead, tested above).
BACKWARD_OPS = ("partitioned_conv2d_input_grad", "partitioned_linear_input_grad", "exit_avg_pool_backward",
                "merge_channels", "pad_channels")
# Argument positions read for their shape and layout only: constants, not inputs of the check.
SHAPE_ONLY = {"partitioned_conv2d_input_grad": {1}, "partitioned_linear_input_grad": {1}}
OP_BACKENDS = [name for name in ("aten", "triton") if dfs_kernels.unavailable_reason(name, "cpu") is None]


def _family(op_name: str) -> str:
    return op_name.removeprefix("triton_")


BACKWARD_OP_CASES = [
    pytest.param(backend, index, id=f"{name}-{index}")
    for backend in OP_BACKENDS
    for index, (name, _) in enumerate(opcheck_cases(backend))
    if _family(name) in BACKWARD_OPS
]


@pytest.mark.parametrize("backend, index", BACKWARD_OP_CASES)
def test_backward_ops_gradcheck_and_gradgradcheck(backend, index):
    """Each ``opcheck`` case of a backward op, in float64, every floating tensor argument an input
    (but those read for their shape): gradcheck and gradgradcheck of the registered op itself."""
    backends.implementation(backend, "cpu")  # registers the backend's ops
    name, args = opcheck_cases(backend, dtype=torch.float64)[index]
    constants = SHAPE_ONLY.get(_family(name), set())
    args = [arg.detach() if i in constants else arg for i, arg in enumerate(args)]
    leaves, spec = _pytree.tree_flatten(args)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and not
                 any(leaf is args[c] for c in constants)]
    inputs = tuple(leaves[i].detach().clone().requires_grad_() for i in positions)
    op = getattr(torch.ops.dfs_kernels, name)

    def fn(*tensors):
        call = list(leaves)
        for i, tensor in zip(positions, tensors):
            call[i] = tensor
        return op(*_pytree.tree_unflatten(call, spec))

    fast = backend == "triton"  # the interpreter: random projections of the Jacobians
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.skipif("triton" not in OP_BACKENDS, reason="the triton backend does not run here")
def test_triton_weight_gradient_op_names_what_to_differentiate():
    backends.implementation("triton", "cpu")
    name, args = next(case for case in opcheck_cases("triton", dtype=torch.float64)
                      if case[0] == "triton_conv2d_weight_grad")
    grad_output = args[0].detach().clone().requires_grad_()
    grad_weight, _ = getattr(torch.ops.dfs_kernels, name)(grad_output, *args[1:])
    with pytest.raises(NotImplementedError, match="triton_conv2d_weight_grad has no derivative.*"
                                                  "differentiate dfs_kernels::triton_partitioned_conv2d"):
        grad_weight.sum().backward()
