"""Microbenchmark: the backward of one convolution as nn.Conv2d (DSN) and as a partitioned
convolution on each available backend (DFS, beta=0.5), side by side in one run.

    python -m pytest bench/bench_conv_backward.py --benchmark-only --benchmark-group-by=param:shape

Shapes are the VGG7-64 convolutions at batch 64 (CIFAR, 32x32). The backward computes the input
gradient and the weight gradient; DFS skips the input gradient of the referenced half.
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
