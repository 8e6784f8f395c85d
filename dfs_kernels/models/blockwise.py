"""The multi-exit models cut at their exits, so they can be run one block at a time.

``blockwise_view(model)`` returns a ``Blockwise``: block k maps the state at exit k-1 to the state at
exit k, and head k turns that state into exit k's logits. Running the blocks in order with a head on
every output reproduces ``model(x)``. Training strategies use it to give each block its own graph
(block-dependent losses), inference to stop a sample at an early exit and run the later blocks on
the remaining samples only (``dfs_kernels.inference``).

Cuts: VGG, one block per conv layer; ResNet-18, the stem and stage 1, then one block per stage;
MSDNet, its own blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .msdnet import MSDNet
from .resnet import MultiExitResNet18
from .vgg import MultiExitVGG

State = tuple[torch.Tensor, ...]
"""A block boundary: the tensor(s) block k hands to block k+1 and exit k (MSDNet: one per scale), each
with the batch as its first dimension."""


@dataclass
class Blockwise:
    """A multi-exit network cut at its exits: ``blocks[k](state) -> state`` (block 0 reads the images
    as a one-tensor state) and ``heads[k](state) -> [N, num_classes]`` for exit k, with the
    trainable parameters each one owns. Running the blocks in order and a head on each output
    reproduces the model's forward. ``feature_heads[k](state) -> (logits, feature)`` gives exit k's
    distillation feature too, for models that have them (ResNet-18; None otherwise)."""

    blocks: list[Callable[[State], State]]
    heads: list[Callable[[State], torch.Tensor]]
    block_parameters: list[list[nn.Parameter]]
    head_parameters: list[list[nn.Parameter]]
    feature_heads: list[Callable[[State], tuple[torch.Tensor, torch.Tensor]]] | None = None


def _trainable(*modules: nn.Module) -> list[nn.Parameter]:
    return [parameter for module in modules for parameter in module.parameters() if parameter.requires_grad]


def _vgg_blockwise(model: MultiExitVGG) -> Blockwise:
    # Block k = conv layer k; its conv reads the previous boundary as the model's non-fused forward
    # does (the fused "dfs" forward computes the same values in one op).
    blocks = [lambda state, layer=layer: (layer(state[0]),) for layer in model.layers]
    heads = [lambda state, exit=exit: exit(state[0]) for exit in model.exits]
    return Blockwise(blocks, heads, [_trainable(layer) for layer in model.layers],
                     [_trainable(exit) for exit in model.exits])


def _resnet_blockwise(model: MultiExitResNet18) -> Blockwise:
    # Exit k sits after stage k; the stem belongs to the first block. The DFS flavours fold the
    # backbone side of each split into the next stage's convs, so a boundary is the stage output
    # itself and only the heads apply the exit view.
    def stem_and_stage(state: State) -> State:
        return (model.stages[0](torch.relu(model.bn1(model.conv1(state[0])))),)

    def exit_input(state: State, index: int) -> torch.Tensor:
        return model.exit_views[index](state[0]) if index < len(model.exit_views) else state[0]

    indices = range(len(model.stages))
    blocks = [stem_and_stage] + [lambda state, stage=stage: (stage(state[0]),) for stage in model.stages[1:]]
    block_parameters = [_trainable(model.conv1, model.bn1, model.stages[0])]
    block_parameters += [_trainable(stage) for stage in model.stages[1:]]
    return Blockwise(
        blocks,
        [lambda state, i=i: model.exits[i](exit_input(state, i)) for i in indices],
        block_parameters,
        [_trainable(model.exits[i]) for i in indices],
        feature_heads=[lambda state, i=i: model.exits[i](exit_input(state, i), True) for i in indices],
    )


def _msdnet_blockwise(model: MSDNet) -> Blockwise:
    # The DFS split after block k belongs to the boundary: the next block reads its backbone side,
    # exit k its exit side (the split has no parameters, so running it twice changes nothing).
    last = len(model.blocks) - 1

    def block(state: State, index: int) -> State:
        scales = list(state)
        if index > 0:
            scales[-1] = model.splits[index - 1](scales[-1])[0]
        return tuple(model.blocks[index](scales[0] if index == 0 else scales))

    def head(state: State, index: int) -> torch.Tensor:
        exit_input = state[-1] if index == last else model.splits[index](state[-1])[1]
        return model.classifier[index](exit_input)

    indices = range(len(model.blocks))
    return Blockwise([lambda state, i=i: block(state, i) for i in indices],
                     [lambda state, i=i: head(state, i) for i in indices],
                     [_trainable(model.blocks[i]) for i in indices],
                     [_trainable(model.classifier[i]) for i in indices])


def blockwise_view(model: nn.Module) -> Blockwise:
    """The ``Blockwise`` cut of a supported model (MultiExitVGG, MultiExitResNet18, MSDNet)."""
    if isinstance(model, MultiExitVGG):
        return _vgg_blockwise(model)
    if isinstance(model, MultiExitResNet18):
        return _resnet_blockwise(model)
    if isinstance(model, MSDNet):
        return _msdnet_blockwise(model)
    raise TypeError(f"blockwise_view supports MultiExitVGG, MultiExitResNet18 and MSDNet, not {type(model).__name__}")
