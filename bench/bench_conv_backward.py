"""Microbenchmark: the backward of one convolution as nn.Conv2d (DSN) and as a partitioned
convolution on each available backend (DFS, beta=0.5), side by side in one run.

    python -m pytest bench/bench_conv_backward.py --benchmark-only --benchmark-group-by=param:shape

Shapes are the VGG7-64 convolutions at batch 64 (CIFAR, 32x32). The backward computes the input
gradient and the weight gradient; DFS skips the input gradient of the referenced half.
``test_input_grad_glue`` measures the cost of placing the shared channels' input gradient into the
full-size gradient (ATen cannot have oneDNN write into the channel slice).
"""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional

SHAPES = {  # name: (batch, in_channels, out_channels, size)
    "64x32x32": (64, 64, 64, 32),
    "128x16x16": (64, 128, 128, 16),
    "256x8x8": (64, 256, 256, 8),
}
VARIANTS = ["nn.Conv2d"] + [f"dfs-{name}" for name in dfs_kernels.available_backends("cpu")]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_conv_backward(benchmark, shape, variant):
    torch.manual_seed(0)
    batch, cin, cout, size = SHAPES[shape]
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    weight = torch.randn(cout, cin, 3, 3, requires_grad=True)
    if variant == "nn.Conv2d":
        out = torch.nn.functional.conv2d(x, weight, padding=1)
    else:
        backend = variant.removeprefix("dfs-")
        out = functional.partitioned_conv2d(x, weight, padding=1, shared_channels=cin // 2, backend=backend)
    grad = torch.randn_like(out)

    def backward():
        return torch.autograd.grad(out, (x, weight), grad, retain_graph=True)

    benchmark.extra_info["device"] = "cpu"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(backward, rounds=15, warmup_rounds=3)


GLUE_VARIANTS = ["oneDNN [N, Cp] only", "partitioned_conv2d_input_grad [N, C]"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("variant", GLUE_VARIANTS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_input_grad_glue(benchmark, shape, variant, layout):
    """What placing the shared channels' gradient into the full-size one costs: oneDNN's input gradient
    of the Cp shared channels alone (a fresh [N, Cp, H, W] tensor: ATen's convolution_backward has no
    out= and cannot write into a strided channel slice) against the "aten" op, which adds the one-pass
    copy into [N, C, H, W] with the referenced channels zeroed (pad_channels)."""
    torch.manual_seed(0)
    batch, cin, cout, size = SHAPES[shape]
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=memory_format)
    weight = torch.randn(cout, cin, 3, 3)
    grad = torch.randn(batch, cout, size, size).contiguous(memory_format=memory_format)
    cp = cin // 2
    if variant == GLUE_VARIANTS[0]:
        shared_shape = torch.empty(batch, cp, size, size).contiguous(memory_format=memory_format)
        shared_weight = weight[:, :cp].contiguous()

        def input_grad():
            return torch.ops.aten.convolution_backward(grad, shared_shape, shared_weight, None, [1, 1], [1, 1],
                                                       [1, 1], False, [0, 0], 1, [True, False, False])
    else:
        def input_grad():
            return torch.ops.dfs_kernels.partitioned_conv2d_input_grad(grad, x, weight, [1, 1], [1, 1], [1, 1], 1, cp)

    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.pedantic(input_grad, rounds=15, warmup_rounds=3)
