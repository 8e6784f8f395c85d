"""Activation checkpointing around the blocks of multi-exit networks gives the gradients of the plain
backward, on every backend (Triton under its interpreter), eager and compiled."""

import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_WRAPPED_MODULE, CheckpointWrapper
from torch.utils.checkpoint import checkpoint

import dfs_kernels
from dfs_kernels.models import MultiExitViT, ViTConfig
from dfs_kernels.testing import assert_close
from dfs_kernels.training.sharding import backbone_blocks, checkpoint_blocks

BACKENDS = dfs_kernels.available_backends("cpu", include_interpreted=True)
SMALL_VIT = ViTConfig(image_size=8, patch_size=4, width=16, depth=3, heads=2, mlp_ratio=2.0, start_layer=1)


class SmallCNN(nn.Module):
    """Stages of a partitioned convolution whose input the previous stage's exit head references (DFS
    split points); a model the package does not know, so its blocks are its children that hold parameters."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stages = nn.ModuleList(nn.Sequential(
            dfs_kernels.PartitionedConv2d(8, 8, 3, padding=1, beta=0.5, backend=backend), nn.BatchNorm2d(8),
            nn.ReLU()) for _ in range(2))
        self.exits = nn.ModuleList(dfs_kernels.ExitHead(8, 3, beta=0.5, backend=backend) for _ in range(2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, logits = self.stem(x), []
        for stage, exit in zip(self.stages, self.exits):
            x = stage(x)
            logits.append(exit(x))
        return logits


def _model(kind: str, backend: str) -> nn.Module:
    if kind == "vit":
        return MultiExitViT(SMALL_VIT, 3, flavour="dfs", backend=backend)
    return SmallCNN(backend)


def _gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    sum(nn.functional.cross_entropy(logits, labels) for logits in model(images)).backward()
    return {_plain_name(name): parameter.grad for name, parameter in model.named_parameters()}


def _plain_name(name: str) -> str:
    """The parameter's name in the model without the compile and checkpoint wrappers."""
    return name.replace("_orig_mod.", "").replace(f"{_CHECKPOINT_WRAPPED_MODULE}.", "")


def _batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, 8, generator=generator), torch.randint(3, (4,), generator=generator)


def _assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, gradient in expected.items():
        assert gradient is not None, name
        assert_close(actual[name], gradient, name=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["cnn", "vit"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpoint_wrapper_around_the_blocks_keeps_the_gradients(backend, kind):
    plain = _model(kind, backend)
    wrapped = checkpoint_blocks(copy.deepcopy(plain))
    assert len(backbone_blocks(wrapped)) >= 2
    assert all(isinstance(block, CheckpointWrapper) for block in backbone_blocks(wrapped))
    assert wrapped.state_dict().keys() == plain.state_dict().keys()  # checkpoints move between the two
    images, labels = _batch()
    _assert_same_gradients(_gradients(wrapped, images, labels), _gradients(plain, images, labels))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_utils_checkpoint_of_a_dfs_stage_keeps_the_gradients(backend):
    model = SmallCNN(backend)
    images, labels = _batch()

    def loss(recompute: bool) -> dict:
        model.zero_grad(set_to_none=True)
        x = model.stem(images)
        stage = model.stages[0]
        y = checkpoint(stage, x, use_reentrant=False) if recompute else stage(x)
        (nn.functional.cross_entropy(model.exits[0](x), labels) + y.square().mean()).backward()
        return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}

    expected = loss(False)
    _assert_same_gradients(loss(True), expected)


@pytest.mark.slow
def test_compiled_model_with_checkpointed_blocks_keeps_the_gradients():
    plain = _model("vit", "aten")
    compiled = torch.compile(checkpoint_blocks(copy.deepcopy(plain)))
    images, labels = _batch()
    _assert_same_gradients(_gradients(compiled, images, labels), _gradients(plain, images, labels))
