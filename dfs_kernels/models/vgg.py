"""Multi-exit VGG of the DFS paper: VGG7-64 (CIFAR-100, 6 exits) and VGG16-64 (ImageNet, 13 exits).

Each layer is conv 3x3 (padding 1) -> ReLU -> BatchNorm -> (MaxPool 2x2 after a stage's last conv),
and an exit (global average pool -> Linear without bias) reads every layer's output. That output is
a split point: the next conv is partitioned on its input channels (it reads ``[x+, sg(x-)]``) and the
exit reads ``[sg(x+), x-]``; the last exit reads the last layer's output with full gradient. The first
conv sees the image: it is an ordinary conv with bias. Since max-pooling acts per channel, the exit
reads the pooled output, the same tensor the next conv reads.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import FlavourLayers, MultiExitNetwork

VGG7_64 = ((64, 64), (128, 128), (256, 256))
VGG16_64 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGGLayer(nn.Module):
    """conv -> ReLU -> BN (-> MaxPool 2x2). [N, C_in, H, W] -> [N, C_out, H, W] (H/2, W/2 when pooled)."""

    def __init__(self, conv: nn.Conv2d, pool: bool) -> None:
        super().__init__()
        self.conv = conv
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm2d(conv.out_channels)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.conv(x))

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """Everything after the convolution: ReLU -> BN (-> MaxPool)."""
        return self.pool(self.bn(self.relu(y)))


class MultiExitVGG(MultiExitNetwork):
    """VGG with an exit after every conv layer.

    Args:
        stages: output channels of each conv, grouped by stage (a max-pool ends each stage).
        num_classes: classes of every exit.
        input_size: (C, H, W) of the images, recorded for benchmarks and summaries.
        flavour, beta, backend, exit_grad: see ``FlavourLayers``.

    ``forward(x)``: x [N, 3, H, W] -> list of one [N, num_classes] per conv layer, shallow to deep.
    ``return_features=True`` returns ``(logits, None)``: VGG has no distillation features.
    """

    def __init__(self, stages, num_classes: int, input_size: tuple[int, int, int], *, flavour: str = "dfs",
                 beta: float = 0.5, backend: str = "auto", exit_grad: str = "partitioned") -> None:
        super().__init__()
        self.input_size = input_size
        dfs = FlavourLayers(flavour, beta, backend, exit_grad)
        widths = [width for stage in stages for width in stage]
        stage_ends = {sum(len(stage) for stage in stages[: i + 1]) - 1 for i in range(len(stages))}
        layers = []
        in_channels = input_size[0]
        for index, width in enumerate(widths):
            if index == 0:
                conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=True)
            else:
                conv = dfs.conv(in_channels, width, 3, padding=1)
            layers.append(VGGLayer(conv, pool=index in stage_ends))
            in_channels = width
        self.layers = nn.ModuleList(layers)
        self.exits = nn.ModuleList(
            dfs.pooled_exit(width, num_classes, final=index == len(widths) - 1) for index, width in enumerate(widths)
        )
        # In the "dfs" flavour each split point is one fused stage: the next conv and the exit read x
        # together and write one input gradient (PartitionedConv2d.forward_with_exit_pool).
        self.fused_stages = flavour == "dfs" and exit_grad == "partitioned"

    def forward(self, x: torch.Tensor, return_features: bool = False):
        logits = []
        x = self.layers[0](x)
        for layer, exit in zip(self.layers[1:], self.exits[:-1]):
            if self.fused_stages:
                y, pooled = layer.conv.forward_with_exit_pool(x)
                logits.append(exit.fc(pooled))
            else:
                logits.append(exit(x))
                y = layer.conv(x)
            x = layer.finish(y)
        logits.append(self.exits[-1](x))
        return (logits, None) if return_features else logits

    def exit_modules(self) -> list[nn.Module]:
        return list(self.exits)


def vgg7_64(num_classes: int = 100, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
            exit_grad: str = "partitioned") -> MultiExitVGG:
    """VGG7-64 for 32x32 CIFAR images: 6 conv layers (64, 64 | 128, 128 | 256, 256), 6 exits."""
    return MultiExitVGG(VGG7_64, num_classes, (3, 32, 32), flavour=flavour, beta=beta, backend=backend,
                        exit_grad=exit_grad)


def vgg16_64(num_classes: int = 1000, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
             exit_grad: str = "partitioned") -> MultiExitVGG:
    """VGG16-64 for 224x224 ImageNet images: 13 conv layers in stages (2, 2, 3, 3, 3), 13 exits. Any
    input size divisible by 32 works (the exits pool globally)."""
    return MultiExitVGG(VGG16_64, num_classes, (3, 224, 224), flavour=flavour, beta=beta, backend=backend,
                        exit_grad=exit_grad)
