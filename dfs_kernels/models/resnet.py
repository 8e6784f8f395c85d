"""ResNet-18 with 4 exits for 32x32 CIFAR images, with the self-distillation exit heads (attention +
SepConv) of the DFS paper's code.

The outputs of stages 1-3 are split points. Exit k reads ``[sg(x+), x-]``; the next stage reads
``[x+, sg(x-)]`` through the two convolutions that consume the stage output, its first block's
``conv1`` and its 1x1 ``shortcut`` conv, so in the DFS flavours those two are partitioned on their
input channels. This is the ``reroute`` of docs/semantics.md with the backbone side folded into the convs:
the referenced channels' input gradient of those convs is never computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import FlavourLayers, MultiExitNetwork

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2
FEATURE_CHANNELS = 512


def _plain_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut (1x1 conv + BN when the shape changes),
    then ReLU. [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]. ``input_conv`` builds the
    convolutions that read the block's input (``conv1`` and the shortcut conv)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, input_conv=_plain_conv) -> None:
        super().__init__()
        self.conv1 = input_conv(in_channels, out_channels, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _plain_conv(out_channels, out_channels, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                input_conv(in_channels, out_channels, 1, stride, 0), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SepConv(nn.Sequential):
    """Depthwise 3x3 (stride) -> 1x1 -> BN -> ReLU -> depthwise 3x3 -> 1x1 (to C_out) -> BN -> ReLU,
    no biases. [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, 1, 1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class AttentionExit(nn.Module):
    """Early exit on a stage output e [N, C, H, W]: attention a = Sigmoid(Upsample x2(ReLU(BN(SepConv(e))))),
    then SepConvs doubling channels and halving H, W from a * e until 512 channels, AvgPool 4x4 and
    Linear(512, classes). ``adaptation`` (Linear(512, 512)) maps the pooled feature to the
    distillation feature. forward(e) -> logits [N, classes] (and the feature [N, 512])."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            SepConv(channels, channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Sigmoid(),
        )
        reducers = []
        while channels < FEATURE_CHANNELS:
            reducers.append(SepConv(channels, 2 * channels))
            channels *= 2
        self.features = nn.Sequential(*reducers, nn.AvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)
        self.adaptation = nn.Linear(FEATURE_CHANNELS, FEATURE_CHANNELS)

    def forward(self, e: torch.Tensor, return_feature: bool = False):
        pooled = self.features(self.attention(e) * e)
        logits = self.fc(pooled)
        return (logits, self.adaptation(pooled)) if return_feature else logits


class FinalExit(nn.Module):
    """AvgPool 4x4 -> Linear(512, classes) on the last stage [N, 512, 4, 4]; its feature is the pooled [N, 512]."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(FEATURE_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor, return_feature: bool = False):
        pooled = self.pool(x)
        logits = self.fc(pooled)
        return (logits, pooled) if return_feature else logits


@torch.no_grad()
def _reference_init(module: nn.Module) -> None:
    """The DFS code's ResNet initialization; Linear layers keep PyTorch's default."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MultiExitResNet18(MultiExitNetwork):
    """ResNet-18 (stem conv3x3 -> BN -> ReLU, no max-pool; BasicBlocks [2, 2, 2, 2]) with 4 exits.

    ``forward(x)``: x [N, 3, 32, 32] -> 4 logits [N, num_classes], shallow to deep.
    ``return_features=True`` returns ``(logits, features)``: the adaptation outputs of exits 1-3 and
    the pooled final feature, each [N, 512], for feature distillation (the adaptation layers run in
    training only). Initialized as the reference code: every conv (exits included)
    ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``, BatchNorm weight 1 and bias 0, Linear
    layers PyTorch's default.
    """

    def __init__(self, num_classes: int = 100, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
                 exit_grad: str = "partitioned") -> None:
        super().__init__()
        self.input_size = (3, 32, 32)
        dfs = FlavourLayers(flavour, beta, backend, exit_grad)
        self.conv1 = _plain_conv(3, STAGE_WIDTHS[0], 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0])
        stages = []
        in_channels = STAGE_WIDTHS[0]
        for index, (width, stride) in enumerate(zip(STAGE_WIDTHS, STAGE_STRIDES)):
            reads_split = index > 0  # stages 2-4 read the split point at the previous stage's output
            blocks = [BasicBlock(in_channels, width, stride, input_conv=dfs.conv if reads_split else _plain_conv)]
            blocks += [BasicBlock(width, width, 1) for _ in range(BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = width
        self.stages = nn.ModuleList(stages)
        self.exit_views = nn.ModuleList(dfs.exit_view(width) for width in STAGE_WIDTHS[:-1])
        self.exits = nn.ModuleList(
            [AttentionExit(width, num_classes) for width in STAGE_WIDTHS[:-1]] + [FinalExit(num_classes)]
        )
        self.apply(_reference_init)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        x = torch.relu(self.bn1(self.conv1(x)))
        outputs = []
        for index, (stage, exit) in enumerate(zip(self.stages, self.exits)):
            x = stage(x)
            exit_input = self.exit_views[index](x) if index < len(self.exit_views) else x
            outputs.append(exit(exit_input, return_features))
        if not return_features:
            return outputs
        logits, features = zip(*outputs)
        return list(logits), list(features)

    def exit_modules(self) -> list[nn.Module]:
        return list(self.exits)


def resnet18(num_classes: int = 100, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
             exit_grad: str = "partitioned") -> MultiExitResNet18:
    """ResNet-18 with 4 exits for 32x32 CIFAR images (see ``MultiExitResNet18``)."""
    return MultiExitResNet18(num_classes, flavour=flavour, beta=beta, backend=backend, exit_grad=exit_grad)
