"""torch.compile and CUDA-graph capture of a model using every DFS op, for each GPU kernel backend
("triton", "cudnn"); skipped where the backend cannot run on CUDA."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional
from helpers import loss_and_grads

GPU_BACKENDS = ("triton", "cudnn")


def backend_or_skip(backend: str) -> None:
    reason = dfs_kernels.unavailable_reason(backend, "cuda")
    if reason is not None:
        pytest.skip(reason)


class TinyStage(torch.nn.Module):
    """conv -> DFS stage (partitioned conv + exit) -> reroute -> exit and partitioned conv, on one backend."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.backend = backend
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.Conv2d(16, 16, 3, padding=1)  # its parameters feed the stage
        self.reroute = dfs_kernels.FeatureReroute(16, beta=0.5, backend=backend)
        self.head = dfs_kernels.PartitionedConv2d(16, 8, 3, padding=1, groups=2, shared_channels=5, backend=backend)
        self.exit1 = torch.nn.Linear(16, 5)
        self.exit2 = dfs_kernels.ExitHead(16, 5, shared_channels=4, backend=backend)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y, pooled = functional.partitioned_conv2d_with_exit_pool(
            x, self.body.weight, self.body.bias, padding=1, shared_channels=8, backend=self.backend,
        )
        backbone, exit_view = self.reroute(torch.relu(y))
        return self.exit1(pooled), self.exit2(exit_view), self.head(backbone).square().mean(dim=(1, 2, 3))


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, channels_last):
    backend_or_skip(backend)
    torch._dynamo.reset()
    model = TinyStage(backend).cuda()
    x = torch.randn(4, 3, 12, 10, device="cuda")
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    eager_loss, eager_grads = loss_and_grads(model, x)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    loss, grads = loss_and_grads(model, x, forward=compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend, channels_last):
    """A training step's forward and backward captured in a CUDA graph: algorithm choice and
    autotuning happen in the warm-up, the capture records fixed kernels on the capturing stream, and a
    replay on new input gives eager's loss and gradients."""
    backend_or_skip(backend)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = TinyStage(backend).cuda().to(memory_format=fmt)
    static_x = torch.randn(4, 3, 12, 10, device="cuda").contiguous(memory_format=fmt)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            loss_and_grads(model, static_x)
    torch.cuda.current_stream().wait_stream(stream)
    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = sum(out.square().mean() for out in model(static_x))
        static_loss.backward()
    static_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    new_x = torch.randn_like(static_x)
    eager_loss, eager_grads = loss_and_grads(model, new_x)
    static_x.copy_(new_x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert static_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(static_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
