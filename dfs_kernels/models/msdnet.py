"""MSDNet (Huang et al., ICLR 2018) as configured by the DFS paper: bottleneck layers, prune "max",
reduction 0.5; 7 exits on CIFAR-100 and 5 on ImageNet. Layer and parameter names follow the
reference PyTorch implementation (gfkd/MSDNet-PyTorch), so its checkpoints load.

The network keeps a list of feature maps at ``num_scales`` resolutions. Each block is a run of
``MSDNLayer``s (dense layers that concatenate new features to every scale) with ``Transition`` layers
where the finest scale is pruned, and each block ends in a classifier reading the coarsest scale.
DFS: after every block but the last, the coarsest-scale tensor is a split point; the next block reads
``[x+, sg(x-)]`` and the classifier the exit view (every channel with ``exit_grad="all"``, the default
of the released DFS code, else ``[sg(x+), x-]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ._common import FlavourLayers, MultiExitNetwork


@dataclass(frozen=True)
class MSDNetConfig:
    """The reference implementation's arguments (nBlocks, base, step, nChannels, growthRate, grFactor,
    bnFactor, nScales, reduction) with stepmode "even", prune "max" and bottlenecks on."""

    num_blocks: int
    base: int
    step: int
    channels: int
    growth_rate: int
    growth_factors: tuple[int, ...]
    bottleneck_factors: tuple[int, ...]
    num_scales: int
    imagenet_stem: bool
    classifier_channels: int | None  # None: keep the input width
    input_size: tuple[int, int, int]
    reduction: float = 0.5


CIFAR100 = MSDNetConfig(7, 4, 2, 16, 16, (1, 2, 4), (1, 2, 4), 3, False, 128, (3, 32, 32))
IMAGENET = MSDNetConfig(5, 4, 4, 32, 16, (1, 2, 4, 4), (1, 2, 4, 4), 4, True, None, (3, 224, 224))


class ConvBasic(nn.Module):
    """conv (no bias) -> BN -> ReLU. [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel, stride, padding, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvBN(nn.Module):
    """Bottleneck 1x1 (to min(C_in, width_factor * C_out)) -> BN -> ReLU -> 3x3 conv (stride 2 when
    ``down``) -> BN -> ReLU. [N, C_in, H, W] -> [N, C_out, H', W']."""

    def __init__(self, in_channels: int, out_channels: int, down: bool, width_factor: int) -> None:
        super().__init__()
        inner = min(in_channels, width_factor * out_channels)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, inner, 1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, out_channels, 3, 2 if down else 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNormal(nn.Module):
    """Dense layer on the finest kept scale: [x, ConvBN(x)] -> [N, C_in + C_out, H, W]."""

    def __init__(self, in_channels: int, out_channels: int, width_factor: int) -> None:
        super().__init__()
        self.conv_normal = ConvBN(in_channels, out_channels, False, width_factor)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[0], self.conv_normal(x[0])], dim=1)


class ConvDownNormal(nn.Module):
    """Dense layer on a coarser scale: x = [finer, same]; [same, ConvBN_down(finer), ConvBN(same)],
    each new part C_out / 2 channels. -> [N, C_same + C_out, H, W] at the coarser resolution."""

    def __init__(self, finer_channels: int, same_channels: int, out_channels: int, finer_factor: int,
                 same_factor: int) -> None:
        super().__init__()
        self.conv_down = ConvBN(finer_channels, out_channels // 2, True, finer_factor)
        self.conv_normal = ConvBN(same_channels, out_channels // 2, False, same_factor)

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x[1], self.conv_down(x[0]), self.conv_normal(x[1])], dim=1)


class MSDNFirstLayer(nn.Module):
    """The stem: image [N, 3, H, W] -> one feature map per scale, scale s with channels * growth_factors[s]
    channels at 1/2^s the first scale's resolution (CIFAR: H; ImageNet: H / 4 after conv 7x7 s2 + max-pool)."""

    def __init__(self, in_channels: int, channels: int, config: MSDNetConfig) -> None:
        super().__init__()
        width = channels * config.growth_factors[0]
        if config.imagenet_stem:
            first = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, 2, 3),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            first = ConvBasic(in_channels, width)
        self.layers = nn.ModuleList([first])
        for scale in range(1, config.num_scales):
            next_width = channels * config.growth_factors[scale]
            self.layers.append(ConvBasic(width, next_width, stride=2))
            width = next_width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        scales = []
        for layer in self.layers:
            x = layer(x)
            scales.append(x)
        return scales


class MSDNLayer(nn.Module):
    """One dense layer across scales: ``in_scales`` maps -> ``out_scales`` maps (the finest is dropped
    when out_scales < in_scales), each scale s gaining growth_rate * growth_factors[s] channels."""

    def __init__(self, in_channels: int, growth_rate: int, config: MSDNetConfig, in_scales: int,
                 out_scales: int) -> None:
        super().__init__()
        self.discard = in_scales - out_scales
        self.out_scales = out_scales
        offset = config.num_scales - out_scales
        growth, bottleneck = config.growth_factors, config.bottleneck_factors
        self.layers = nn.ModuleList()
        if self.discard == 0:
            self.layers.append(
                ConvNormal(in_channels * growth[offset], growth_rate * growth[offset], bottleneck[offset])
            )
        first_down = offset if self.discard > 0 else offset + 1
        for scale in range(first_down, config.num_scales):
            self.layers.append(ConvDownNormal(
                in_channels * growth[scale - 1], in_channels * growth[scale], growth_rate * growth[scale],
                bottleneck[scale - 1], bottleneck[scale],
            ))

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.discard > 0:
            inputs = [[x[i - 1], x[i]] for i in range(1, self.out_scales + 1)]
        else:
            inputs = [[x[0]]] + [[x[i - 1], x[i]] for i in range(1, self.out_scales)]
        return [layer(pair) for layer, pair in zip(self.layers, inputs)]


class ParallelModule(nn.Module):
    """Applies module i to scale i. list of tensors -> list of tensors."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, x: list[torch.Tensor]) -> list[torch.Tensor]:
        return [module(scale) for module, scale in zip(self.m, x)]


class ClassifierModule(nn.Module):
    """Two conv 3x3 stride 2 -> BN -> ReLU, AvgPool 2x2, Dropout(0.5), Linear, as the DFS code's MSDNet
    classifier. coarsest scale [N, C, H, W] -> [N, classes].

    Keys: ``m.*`` (convs, BNs) and ``linear.1.weight`` / ``linear.1.bias`` (``linear`` is
    ``Sequential(Dropout, Linear)``). State dicts with ``linear.weight`` / ``linear.bias`` (classifiers
    without the dropout, as gfkd/MSDNet-PyTorch writes them) load too.
    """

    DROPOUT = 0.5

    def __init__(self, in_channels: int, inner_channels: int | None, num_classes: int) -> None:
        super().__init__()
        inner = inner_channels or in_channels
        self.m = nn.Sequential(
            ConvBasic(in_channels, inner, stride=2),
            ConvBasic(inner, inner, stride=2),
            nn.AvgPool2d(2),
        )
        self.linear = nn.Sequential(nn.Dropout(self.DROPOUT), nn.Linear(inner, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.m(x).flatten(1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in ("weight", "bias"):
            if f"{prefix}linear.{name}" in state_dict:
                state_dict[f"{prefix}linear.1.{name}"] = state_dict.pop(f"{prefix}linear.{name}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MSDNet(MultiExitNetwork):
    """MSDNet with one classifier per block.

    ``forward(x)``: x [N, 3, H, W] -> ``config.num_blocks`` logits [N, num_classes], shallow to deep.
    ``return_features=True`` returns ``(logits, None)``: MSDNet has no distillation features.
    Initialization: PyTorch's defaults, which is what the reference code's MSDNet trains from. Its
    ``_init_weights`` (conv N(0, 2 / (kH * kW * out_channels)), BatchNorm 1 / 0, Linear bias 0) is called
    only on the direct children of each block's ``nn.Sequential`` (``MSDNFirstLayer``, ``MSDNLayer``, the
    transitions' ``ParallelModule``) and on the ``ClassifierModule``s, none of which is a Conv2d, BatchNorm2d
    or Linear, so it changes no parameter. The classifiers' dropout makes training-mode outputs random:
    compare flavours in eval mode or from one RNG seed.
    """

    def __init__(self, config: MSDNetConfig, num_classes: int, *, flavour: str = "dfs", beta: float = 0.5,
                 backend: str = "auto", exit_grad: str = "all") -> None:
        super().__init__()
        self.input_size = config.input_size
        dfs = FlavourLayers(flavour, beta, backend, exit_grad)
        steps = [config.base] + [config.step] * (config.num_blocks - 1)
        total_layers = sum(steps)
        interval = math.ceil(total_layers / config.num_scales)
        self.blocks, self.classifier = nn.ModuleList(), nn.ModuleList()
        channels, layer_index, coarsest_widths = config.channels, 0, []
        for step in steps:
            layers = [MSDNFirstLayer(config.input_size[0], channels, config)] if layer_index == 0 else []
            for _ in range(step):
                layer_index += 1
                # prune "max": drop the finest scale every `interval` layers
                in_scales = config.num_scales - max(0, layer_index - 2) // interval
                out_scales = config.num_scales - (layer_index - 1) // interval
                layers.append(MSDNLayer(channels, config.growth_rate, config, in_scales, out_scales))
                channels += config.growth_rate
                if in_scales > out_scales and config.reduction > 0:
                    reduced = math.floor(config.reduction * channels)
                    offset = config.num_scales - out_scales
                    factors = config.growth_factors[offset:]
                    layers.append(ParallelModule([  # transition: 1x1 conv-BN-ReLU per kept scale
                        ConvBasic(channels * factor, reduced * factor, kernel=1, padding=0) for factor in factors
                    ]))
                    channels = reduced
            self.blocks.append(nn.Sequential(*layers))
            coarsest_widths.append(channels * config.growth_factors[-1])
            self.classifier.append(ClassifierModule(coarsest_widths[-1], config.classifier_channels, num_classes))
        self.splits = nn.ModuleList(dfs.split(width) for width in coarsest_widths[:-1])

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = []
        for index, (block, classifier) in enumerate(zip(self.blocks, self.classifier)):
            x = block(x)
            exit_input = x[-1]
            if index < len(self.splits):
                backbone, exit_input = self.splits[index](x[-1])
                x = x[:-1] + [backbone]
            logits.append(classifier(exit_input))
        return (logits, None) if return_features else logits

    def exit_modules(self) -> list[nn.Module]:
        return list(self.classifier)


def msdnet(dataset: str = "cifar100", num_classes: int | None = None, *, growth_rate: int | None = None,
           flavour: str = "dfs", beta: float = 0.5, backend: str = "auto", exit_grad: str = "all") -> MSDNet:
    """MSDNet for ``dataset`` "cifar100" (7 exits, 32x32) or "imagenet" (5 exits, 224x224).
    ``num_classes`` defaults to 100 / 1000; ``growth_rate`` to 16 (the BDL paper's CIFAR runs used 6)."""
    configs = {"cifar100": (CIFAR100, 100), "imagenet": (IMAGENET, 1000)}
    if dataset not in configs:
        raise ValueError(f"dataset must be one of {sorted(configs)}, got {dataset!r}")
    config, default_classes = configs[dataset]
    if growth_rate is not None:
        config = replace(config, growth_rate=growth_rate)
    return MSDNet(config, num_classes or default_classes, flavour=flavour, beta=beta, backend=backend,
                  exit_grad=exit_grad)
