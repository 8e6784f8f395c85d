"""Deployment: a DFS model leaves as a plain network. ``torch.export`` + ``run_decompositions`` with
``dfs_kernels.export_decompositions()`` lowers every DFS op to ATen; the saved program runs where
dfs_kernels was never imported; ONNX export through that program matches PyTorch; ``unconvert`` is
the other way out for converted models."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfs_kernels
from conftest import requires_aten
from dfs_kernels import models
from dfs_kernels.testing import assert_close

# The Triton ops register when the backend is first used: do it now, where it can run, so that
# their decompositions are collected and tested too.
if "triton" in dfs_kernels.available_backends("cpu", include_interpreted=True):
    dfs_kernels.backends.implementation("triton", "cpu")

# Ops that only a backward runs (gradients, gradient assembly): a forward graph never holds them.
BACKWARD_ONLY = re.compile(r"(_grad|_backward|_channels)$")


def _dfs_ops(program: torch.export.ExportedProgram) -> set[str]:
    return {
        str(node.target) for node in program.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("dfs_kernels.")
    }


def _trained(model: nn.Module, *, step: bool = True) -> nn.Module:
    """``model`` in eval mode after a DFS training step, or (``step=False``, cheaper) a training-mode
    forward only: either way its batch-norm statistics are no longer the initial ones."""
    images, labels = torch.randn(4, *model.input_size), torch.randint(0, 10, (4,))
    if not step:
        with torch.no_grad():
            model(images)
        return model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sum(F.cross_entropy(logits, labels) for logits in model(images)).backward()
    optimizer.step()
    return model.eval()


def _lowered(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    program = torch.export.export(model, (x,))
    assert _dfs_ops(program), "the exported model should hold DFS ops before lowering"
    program = program.run_decompositions(dfs_kernels.export_decompositions())
    assert not _dfs_ops(program)
    return program


def test_every_forward_op_has_a_decomposition():
    registered = {
        name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("dfs_kernels::")
    }
    decomposed = {op.name().split("::")[1] for op in dfs_kernels.export.decompositions()}
    expected = {"partitioned_conv2d", "partitioned_conv2d_with_exit_pool", "exit_avg_pool", "partitioned_linear"}
    assert expected <= decomposed
    missing = {name for name in registered - decomposed if not BACKWARD_ONLY.search(name)}
    assert not missing, f"dfs_kernels ops with no export decomposition: {sorted(missing)}"


def _op_arguments(op: torch._ops.OpOverload, x: torch.Tensor, conv: nn.Conv2d) -> list:
    known = {
        "input": x, "weight": conv.weight, "bias": conv.bias, "stride": [2, 1], "padding": [1, 0],
        "dilation": [1, 2], "groups": 2, "shared_channels": 3, "allow_tf32": False, "x": x, "dim": 1,
    }
    arguments = []
    for argument in op._schema.arguments:
        assert argument.name in known, f"add an example value for argument {argument.name!r} of {op}"
        arguments.append(known[argument.name])
    return arguments


def _is_linear(op: torch._ops.OpOverload) -> bool:
    return op.name().endswith("partitioned_linear")


def _lowered_call(op, x, arguments) -> torch.export.ExportedProgram:
    class CallOp(nn.Module):
        def forward(self, x):
            return op(x, *arguments)

    program = torch.export.export(CallOp(), (x,)).run_decompositions(dfs_kernels.export_decompositions())
    assert not _dfs_ops(program)
    return program


LINEAR_OPS = [op for op in dfs_kernels.export.decompositions() if _is_linear(op)]


@pytest.mark.parametrize("op", sorted(LINEAR_OPS, key=str), ids=str)
def test_linear_decomposition_is_aten_linear(op):
    """partitioned_linear lowers to core ATen's GEMM (addmm or mm after a transpose) on tokens [N, T, D]."""
    linear = nn.Linear(6, 4)
    x = torch.randn(2, 5, 6)
    program = _lowered_call(op, x, [linear.weight, linear.bias, 3])
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert targets & {"aten.addmm.default", "aten.mm.default", "aten.matmul.default", "aten.bmm.default"}, targets
    assert_close(program.module()(x), F.linear(x, linear.weight, linear.bias), name=str(op))


@pytest.mark.parametrize("op", sorted(set(dfs_kernels.export.decompositions()) - set(LINEAR_OPS), key=str), ids=str)
def test_decomposition_is_the_forward_in_aten(op):
    """Each op, called alone (no kernel of it runs: export traces with fake tensors), lowers to ATen
    ops whose values are conv2d's and the pixel mean's (x itself for the split points). This covers the CUDA-only ops on CPU."""
    conv = nn.Conv2d(6, 4, 3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    x = torch.randn(2, 6, 9, 8)
    program = _lowered_call(op, x, _op_arguments(op, x, conv)[1:])
    outputs = program.module()(x)
    expected = {
        "conv": F.conv2d(x, conv.weight, conv.bias, (2, 1), (1, 0), (1, 2), 2),
        "pool": x.mean(dim=(2, 3)),
    }
    if op.name().endswith(("reroute", "exit_reference")):  # views of x
        for output in outputs if isinstance(outputs, tuple) else (outputs,):
            assert_close(output, x, name=str(op))
    elif op.name().endswith("exit_avg_pool"):
        assert_close(outputs, expected["pool"], name=str(op))
    elif op.name().endswith("with_exit_pool"):
        assert_close(outputs[0], expected["conv"], name=str(op))
        assert_close(outputs[1], expected["pool"], name=str(op))
    else:
        assert_close(outputs, expected["conv"], name=str(op))


_RUN_WITHOUT_DFS_KERNELS = textwrap.dedent("""
    import sys
    import torch

    program = torch.export.load(sys.argv[1])
    outputs = program.module()(torch.load(sys.argv[2]))
    assert "dfs_kernels" not in sys.modules, "loading the program imported dfs_kernels"
    assert not any(name.startswith("dfs_kernels::") for name in torch._C._dispatch_get_all_op_names())
    torch.save(outputs, sys.argv[3])
""")


@requires_aten
@pytest.mark.parametrize("factory", [models.vgg7_64, models.resnet18], ids=["vgg7_64", "resnet18"])
def test_exported_program_runs_where_dfs_kernels_was_never_imported(factory, tmp_path):
    """VGG7-64 holds the fused stage and exit pools; ResNet-18 partitioned convs and FeatureReroute."""
    torch.manual_seed(0)
    model = _trained(factory(num_classes=10, flavour="dfs"), step=False)
    x = torch.randn(3, *model.input_size)
    program = _lowered(model, x)
    torch.export.save(program, tmp_path / "model.pt2")
    torch.save(x, tmp_path / "x.pt")
    subprocess.run(
        [sys.executable, "-c", _RUN_WITHOUT_DFS_KERNELS, str(tmp_path / "model.pt2"), str(tmp_path / "x.pt"),
         str(tmp_path / "outputs.pt")],
        check=True, cwd=tmp_path, timeout=300,
    )
    outputs = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected = model(x)
    assert len(outputs) == len(expected)
    for index, (output, reference) in enumerate(zip(outputs, expected)):
        assert_close(output, reference, name=f"exit {index}")


@requires_aten
@pytest.mark.parametrize("factory", [models.vgg7_64, models.resnet18], ids=["vgg7_64", "resnet18"])
def test_onnx_export_matches_pytorch(factory, tmp_path):
    """VGG7-64 (fused stage, exit pools) and ResNet-18 (the README's deployment example: partitioned convs,
    FeatureReroute), each after a DFS training step."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _trained(factory(num_classes=10, flavour="dfs"))
    x = torch.randn(3, *model.input_size)
    torch.onnx.export(_lowered(model, x), (x,), tmp_path / "model.onnx", dynamo=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert len(outputs) == len(expected)
    for index, (output, reference) in enumerate(zip(outputs, expected)):
        # Another runtime's convolutions sum in another order: float32 rounding, scaled to the logits
        # (measured: 2e-7 for VGG7-64, 5e-7 for ResNet-18, logits of magnitude 0.5 and 1.5).
        torch.testing.assert_close(torch.from_numpy(output), reference, rtol=1e-4, atol=1e-4, msg=f"exit {index}")


@requires_aten
def test_unconvert_then_export_holds_no_dfs_op():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 4, 1))
    dfs_kernels.convert(model, every_conv=True)
    x = torch.randn(2, 3, 8, 8)
    assert _dfs_ops(torch.export.export(model, (x,)))
    expected = model(x)
    dfs_kernels.unconvert(model)
    program = torch.export.export(model, (x,))
    assert not _dfs_ops(program)
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=0)
