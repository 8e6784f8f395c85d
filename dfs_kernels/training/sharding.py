"""Per-block FSDP2 sharding and activation checkpointing of a multi-exit network.

Both act on a model's *blocks*: the modules its forward calls one after another, each holding a
share of the parameters and producing a share of the activations.

- ``shard_model(model, mixed_precision)`` calls ``torch.distributed.fsdp.fully_shard`` on every block and
  head, then on the model (which takes the parameters left: stems, embeddings, BatchNorms of VGG).
  Each one's parameters are gathered just before its forward and freed after it (and again for the
  backward), so a process holds one block's full parameters at a time. ``mixed_precision="bf16"``
  computes in bfloat16 and reduces gradients in float32 (``MixedPrecisionPolicy``); the optimizer keeps
  float32 (or float64) sharded parameters; BatchNorms are groups of their own that compute in float32
  (``BATCH_NORM_PRECISION``).
- ``checkpoint_blocks(model)`` wraps every backbone block in ``checkpoint_wrapper`` (non-reentrant
  ``torch.utils.checkpoint``): the block keeps its input and recomputes its forward in the backward.
  state_dict keys are unchanged (the wrapper removes its own prefix), so checkpoints move between runs
  with and without it.

Blocks: ResNet-18, its stages; MSDNet, its blocks; the ViT, its transformer blocks; the encoder, its
layers; heads are the exits. VGG's "dfs" forward runs each convolution fused with the exit that reads
the same split point (``PartitionedConv2d.forward_with_exit_pool``), so its blocks are the convolutions
(that method registered with FSDP) and its heads stay with the model; a convolution's input is kept
for its backward anyway, so checkpointing VGG saves nothing and is refused. Any other module: its
children that hold parameters (the items of a ``ModuleList`` / ``ModuleDict``, which have no forward).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                         checkpoint_wrapper)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..models import MSDNet, MultiExitEncoder, MultiExitResNet18, MultiExitVGG, MultiExitViT

MIXED_PRECISION = {"none": MixedPrecisionPolicy(),
                   "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
"""``shard_model``'s mixed-precision choices: "bf16" gathers parameters and computes in bfloat16 and
reduce-scatters gradients in float32."""
BATCH_NORM_PRECISION = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                            output_dtype=torch.bfloat16)
"""BatchNorms under the bfloat16 policy: float32 parameters and inputs, as their running statistics are,
and bfloat16 outputs, as the layers after them compute."""


def _children_with_parameters(model: nn.Module) -> list[nn.Module]:
    children = []
    for child in model.children():
        if isinstance(child, nn.ModuleDict):  # containers have no forward: their items are the blocks
            children += child.values()
        elif isinstance(child, nn.ModuleList):
            children += child
        else:
            children.append(child)
    return [child for child in children if any(True for _ in child.parameters())]


def backbone_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone blocks of ``model`` in forward order (see the module docstring)."""
    if isinstance(model, MultiExitVGG):
        return [layer.conv for layer in model.layers]
    if isinstance(model, MultiExitResNet18):
        return list(model.stages)
    if isinstance(model, (MSDNet, MultiExitViT)):
        return list(model.blocks)
    if isinstance(model, MultiExitEncoder):
        return list(model.layers)
    return _children_with_parameters(model)


def _heads(model: nn.Module) -> list[nn.Module]:
    # VGG's fused stages call their exit's fc, not the exit: the heads stay in the model's group
    known = (MultiExitResNet18, MSDNet, MultiExitViT, MultiExitEncoder)
    return list(model.exit_modules()) if isinstance(model, known) else []


def shard_model(model: nn.Module, mixed_precision: str = "none") -> nn.Module:
    """``model`` (in place) with ``fully_shard`` on each block and head, then on the model; needs the
    default process group (one process is fine). ValueError for an unknown ``mixed_precision``."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
    policy = MIXED_PRECISION[mixed_precision]
    if policy.param_dtype is not None:  # BatchNorm keeps float32 statistics: its own group, in float32
        for norm in [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]:
            fully_shard(norm, mp_policy=BATCH_NORM_PRECISION)
    for module in backbone_blocks(model) + _heads(model):
        fully_shard(module, mp_policy=policy)
        if hasattr(module, "forward_with_exit_pool"):
            register_fsdp_forward_method(module, "forward_with_exit_pool")
    fully_shard(model, mp_policy=policy)
    return model


def check_checkpointable(model: nn.Module) -> None:
    """ValueError for a model whose blocks ``checkpoint_blocks`` cannot usefully checkpoint (VGG)."""
    if isinstance(model, MultiExitVGG):
        raise ValueError("activation checkpointing has nothing to save on VGG: its blocks are single "
                         "convolutions, whose inputs their backward keeps anyway; use it with resnet18, "
                         "msdnet, vit_* or bert_*")


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """``model`` (in place) with each backbone block wrapped in a non-reentrant ``checkpoint_wrapper``."""
    check_checkpointable(model)
    blocks = {id(block) for block in backbone_blocks(model)}
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda module: id(module) in blocks)
    return model


__all__ = ["MIXED_PRECISION", "backbone_blocks", "check_checkpointable", "checkpoint_blocks", "shard_model"]
