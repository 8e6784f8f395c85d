"""The compiled glue ops' values and errors, torch.compile(fullgraph=True) of a model using the
registered ops, and their FLOP formulas. (opcheck of every op: tests/test_opcheck.py.)"""

from __future__ import annotations


import pytest
import torch
from torch import nn

import dfs_kernels
from conftest import requires_aten
from helpers import loss_and_grads

pytestmark = requires_aten


def _ops():
    return torch.ops.dfs_kernels


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_channel_ops_values(channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    head = torch.randn(2, 7, 3, 5).contiguous(memory_format=fmt)
    tail = torch.randn(2, 7, 3, 5)
    merged = _ops().merge_channels(head, tail, 3)
    torch.testing.assert_close(merged, torch.cat([head[:, :3], tail[:, 3:]], 1), rtol=0, atol=0)
    assert merged.is_contiguous(memory_format=fmt)
    padded = _ops().pad_channels([head[:, :2], tail[:, 4:5]], 7)
    expected = torch.cat([head[:, :2], tail[:, 4:5], torch.zeros(2, 4, 3, 5)], 1)
    torch.testing.assert_close(padded, expected, rtol=0, atol=0)
    grad = _ops().exit_avg_pool_backward(torch.randn(2, 7), [2, 7, 3, 5], 3, channels_last)
    assert grad.is_contiguous(memory_format=fmt) and grad[:, :3].abs().max() == 0


def test_channel_ops_on_one_position():
    """[N, C, 1, 1], how tokens [N, T, D] reach the kernels: sources of any strides, zero segments."""
    head = torch.randn(4, 6, 1, 1)
    tail = torch.randn(6, 4).t()[:, :, None, None]  # channel stride 4, sample stride 1
    for split in (0, 1, 4, 6):
        merged = _ops().merge_channels(head, tail, split)
        torch.testing.assert_close(merged, torch.cat([head[:, :split], tail[:, split:]], 1), rtol=0, atol=0)
        torch.testing.assert_close(_ops().merge_channels(None, tail, split),
                                   torch.cat([torch.zeros(4, split, 1, 1), tail[:, split:]], 1), rtol=0, atol=0)
    padded = _ops().pad_channels([tail[:, :2], head[:, 3:4]], 6)
    torch.testing.assert_close(padded, torch.cat([tail[:, :2], head[:, 3:4], torch.zeros(4, 3, 1, 1)], 1),
                               rtol=0, atol=0)


def test_pad_channels_rejects_bad_arguments():
    with pytest.raises(RuntimeError, match="channels must be at least"):
        _ops().pad_channels([torch.randn(1, 4, 2, 2)], 3)
    with pytest.raises(RuntimeError, match=r"parts\[1\] must have the first source's N, H, W"):
        _ops().pad_channels([torch.randn(1, 4, 2, 2), torch.randn(1, 4, 3, 2)], 9)
    with pytest.raises(RuntimeError, match="no tensor arguments"):  # the dispatcher needs one to route
        _ops().merge_channels(None, None, 0)


class TinyMultiExit(nn.Module):
    """conv -> split point -> conv, with an exit on the split point and one at the end."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.reroute = dfs_kernels.FeatureReroute(8, beta=0.5, backend=backend)
        self.body = dfs_kernels.PartitionedConv2d(8, 6, 3, padding=1, bias=False, beta=0.5, backend=backend)
        self.exit1 = dfs_kernels.ExitHead(8, 5, beta=0.5, backend=backend)
        self.exit2 = dfs_kernels.ExitHead(6, 5, shared_channels=0, backend=backend)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        backbone, exit_view = self.reroute(x)
        return self.exit1(exit_view), self.exit2(torch.relu(self.body(backbone)))


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_compile_fullgraph_matches_eager(compile_backend, channels_last):
    torch._dynamo.reset()
    model = TinyMultiExit("aten")
    x = torch.randn(2, 3, 9, 7)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    eager_loss, eager_grads = loss_and_grads(model, x)
    compiled = torch.compile(model, backend=compile_backend, fullgraph=True)
    loss, grads = loss_and_grads(model, x, forward=compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_compiled_cpu_convolutions_run_channels_last_like_inductors():
    """Inductor runs a CPU graph's ATen convolutions channels-last; under torch.compile ours get the same
    layout (an NCHW model's partitioned conv then returns channels-last), with eager's values and gradients."""
    torch._dynamo.reset()
    conv = dfs_kernels.PartitionedConv2d(6, 4, 3, padding=1, beta=0.5, backend="aten")
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, conv(x))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    (expected,) = torch.autograd.grad(conv(x).square().sum(), x)
    torch.testing.assert_close(grad, expected)
    assert torch.equal(grad[:, 3:], torch.zeros_like(grad[:, 3:]))
    assert conv(x).is_contiguous()  # eager keeps the input's layout


def test_flop_counter_counts_the_compiled_ops():
    """FlopCounterMode sees the forward as a full convolution and the input gradient as Cp / Cin of one."""
    from torch.utils.flop_counter import FlopCounterMode

    dfs_kernels.register_flop_formulas()

    def count(run):
        with FlopCounterMode(display=False) as counter:
            run()
        return {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}

    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, requires_grad=True)  # groups 2
    dense = count(lambda: torch.nn.functional.conv2d(x, w, stride=2, groups=2).sum().backward())
    weight_only = count(lambda: torch.nn.functional.conv2d(x.detach(), w, stride=2, groups=2).sum().backward())
    ours = count(lambda: dfs_kernels.functional.partitioned_conv2d(
        x, w, stride=2, groups=2, shared_channels=3, backend="aten").sum().backward())
    forward = dense["aten.convolution"]
    assert ours["dfs_kernels.partitioned_conv2d"] == forward
    assert ours["dfs_kernels.partitioned_conv2d_input_grad"] == forward * 3 // 8
    assert ours["aten.convolution_backward"] == weight_only["aten.convolution_backward"]  # weight grad in full
    assert dense["aten.convolution_backward"] > weight_only["aten.convolution_backward"]
