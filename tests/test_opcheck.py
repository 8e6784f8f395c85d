"""Every registered dfs_kernels op through ``torch.library.opcheck`` (schema, fake implementation,
autograd registration and, where the kernels compile, the AOT-dispatch checks), on every backend
that can run here; that no op lacks a case; and that each op family has one schema on every backend,
which is what lets one fake and one autograd formula serve them all (``dfs_kernels.ops``)."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import backends
from helpers import OP_PREFIXES, opcheck_cases

# Under the Triton interpreter the AOT-dispatch checks would trace the kernels with fake tensors,
# which the interpreter cannot run: schema, autograd registration and fakes are checked there.
INTERPRETER_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")
# The compiled split points return views of x, which torch.compile cannot functionalize in a custom op:
# traced code runs the Python Functions instead (dfs_kernels/ops/_op_set.py), so the AOT-dispatch checks
# do not apply to these two.
EAGER_ONLY_OPS = ("reroute", "exit_reference")


def _targets():
    """(backend, device) pairs whose ops run here; CUDA cases are built inside the test."""
    targets = [(name, "cpu") for name in ("aten", "triton")
               if dfs_kernels.unavailable_reason(name, "cpu") is None]
    if torch.cuda.is_available():
        targets += [(name, "cuda") for name in ("aten", "cudnn", "triton")
                    if dfs_kernels.unavailable_reason(name, "cuda") is None]
    return targets


CASES = [
    pytest.param(backend, device, index, id=f"{device}-{name}-{index}")
    for backend, device in _targets()
    for index, (name, _) in enumerate(opcheck_cases(backend))
]


@pytest.mark.parametrize("backend, device, index", CASES)
def test_opcheck(backend, device, index):
    backends.implementation(backend, device)  # imports (and so registers) the backend's ops
    name, args = opcheck_cases(backend, device)[index]
    interpreted = backend == "triton" and device == "cpu"
    checks = {"test_utils": INTERPRETER_CHECKS} if interpreted or name in EAGER_ONLY_OPS else {}
    torch.library.opcheck(getattr(torch.ops.dfs_kernels, name).default, args, **checks)


def _registered_op_names() -> set[str]:
    return {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("dfs_kernels::")}


@pytest.mark.skipif(not dfs_kernels.extension_loaded(), reason="the compiled ops library is not loaded")
def test_every_registered_op_has_an_opcheck_case():
    if dfs_kernels.unavailable_reason("triton", "cpu") is None or torch.cuda.is_available():
        backends.implementation("triton", "cuda" if torch.cuda.is_available() else "cpu")
    covered = {name for backend in OP_PREFIXES for name, _ in opcheck_cases(backend)}
    registered = _registered_op_names()
    if "triton_partitioned_conv2d" not in registered:  # triton not importable here
        covered = {name for name in covered if not name.startswith("triton_")}
    assert registered == covered, f"without a case: {registered - covered}; not registered: {covered - registered}"


def _signature(prefix: str, name: str) -> tuple:
    schema = getattr(torch.ops.dfs_kernels, prefix + name).default._schema
    return ([(a.name, str(a.type), a.default_value) for a in schema.arguments],
            [str(r.type) for r in schema.returns])


@pytest.mark.skipif(not dfs_kernels.extension_loaded(), reason="the compiled ops library is not loaded")
@pytest.mark.parametrize("name", ["partitioned_conv2d", "partitioned_conv2d_with_exit_pool",
                                  "partitioned_conv2d_input_grad", "exit_avg_pool", "exit_avg_pool_backward",
                                  "merge_channels", "partitioned_linear", "partitioned_linear_input_grad"])
def test_each_op_family_has_one_schema_on_every_backend(name):
    registered = _registered_op_names()
    prefixes = {prefix for conv_prefix, glue_prefix in OP_PREFIXES.values()
                for prefix in ((conv_prefix,) if name.startswith("partitioned") else (glue_prefix,))
                if prefix is not None and prefix + name in registered}
    assert "" in prefixes
    signatures = {prefix: _signature(prefix, name) for prefix in prefixes}
    assert all(signature == signatures[""] for signature in signatures.values()), signatures
