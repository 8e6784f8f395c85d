"""Data-parallel training across processes started by ``torchrun``.

``setup(device)`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and, for more than one
process, initializes the default process group: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``),
Gloo on CPU. Without torchrun it returns a one-process ``Distributed`` and touches nothing (unless asked
for a one-process group, as FSDP needs).

Batch norm: with several processes each one sees 1/W of the batch, so plain BatchNorm would normalize
with per-process statistics and train a different network than one process on the whole batch.
``synchronize_batch_norm`` replaces every ``BatchNorm2d`` with one that normalizes with the statistics
of the global batch: ``nn.SyncBatchNorm`` on CUDA (fused kernels), and on CPU, which ``nn.SyncBatchNorm``
refuses, ``AllReduceBatchNorm2d``, written with the functional (differentiable) all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import _functional_collectives as funcol


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank in [0, world_size); local_rank picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes checkpoints, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes (a copy; ``tensor`` itself with one process)."""
        if not self.enabled:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the processes (``tensor`` itself with one process)."""
        return self.sum(tensor) / self.world_size if self.enabled else tensor


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; ValueError saying why when it is a CUDA device this process cannot use."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
               else "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)")
        raise ValueError(f"device {str(device)!r} requested, but {why}; use device 'cpu'")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} requested, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def setup(device: str | None, *, always_group: bool = False) -> tuple[Distributed, torch.device]:
    """The job's ``Distributed`` and this process's device (``device`` None: CUDA when available, else CPU).
    ``always_group``: a default process group even for one process (FSDP shards over one), whose store
    lives in this process."""
    if device is not None:
        check_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if use_cuda and world_size > 1:  # one GPU per process
        chosen = torch.device("cuda", local_rank)
        torch.cuda.set_device(chosen)
    else:
        chosen = torch.device(device or ("cuda" if use_cuda else "cpu"))
    backend = "nccl" if use_cuda else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    elif always_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Distributed(rank, world_size, local_rank), chosen


def teardown() -> None:
    """Ends the process group that ``setup`` started (nothing without one), once every process has got
    here: a process that tears its group down while another still talks to it can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over all processes; its backward sums the gradients over the processes too."""
    return funcol.wait_tensor(funcol.all_reduce(tensor, "sum", dist.group.WORLD))


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training-mode statistics are those of the batch of all processes (mean and
    biased variance in two all-reduces, the running variance unbiased over the global count); gradients
    flow through the all-reduces, so every process gets the gradient of the global batch. Eval mode
    and one-process jobs are plain ``BatchNorm2d``. Same parameters, buffers and state_dict keys."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # half inputs: float32 statistics
        local_count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device, dtype=x.dtype)
        sums = _all_reduce_sum(torch.cat([x.sum(dim=(0, 2, 3)), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = x - mean.view(1, -1, 1, 1)
        variance = _all_reduce_sum(centred.square().sum(dim=(0, 2, 3))) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), count)
        scale = torch.rsqrt(variance + self.eps)
        out = centred * scale.view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = variance * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def _replace_batch_norm(module: nn.Module, device: torch.device) -> nn.Module:
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                               child.track_running_stats, device=device)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            _replace_batch_norm(child, device)
    return module


def synchronize_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with every ``BatchNorm2d`` normalizing over the global batch (see the module docstring)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _replace_batch_norm(model, device)


__all__ = ["AllReduceBatchNorm2d", "Distributed", "check_device", "setup", "synchronize_batch_norm", "teardown"]
