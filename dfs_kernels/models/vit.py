"""Multi-exit Vision Transformer (pre-LN blocks) with DFS on the hidden axis of its tokens.

The image is cut into ``patch_size`` patches, embedded by a strided conv (``patch_embed``), prefixed by a
class token when ``pooling="class"``, and given learned position embeddings. Block k is
``h + attn(norm1(h))`` then ``h + mlp(norm2(h))``. Exits read the outputs of blocks ``start_layer`` ..
``depth - 2`` (0-based); the final exit reads the last block. Every exit is LayerNorm -> token pooling (the
mean of the patch tokens, or the class token) -> Linear, with keys ``exits.k.norm`` and ``exits.k.fc``.

Where DFS splits (``placement``):

- ``"block_input"`` (the official DFS ViT): the block after an exit reads ``[h+, sg(h-)]`` and the exit reads
  h with full gradient; the last block's output is not split. The block's LayerNorms mix all features, so
  this placement saves no GEMM work (``D = 0`` in docs/cost_model.md).
- ``"gemm_input"`` (a variant of this package): the blocks after an exit read h with full gradient, and their
  GEMMs that read a LayerNorm output (``attn.qkv`` and ``mlp.fc1``) are partitioned: their input gradient
  reaches only the first Cp features. The exits read h with full gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import MultiExitNetwork, TokenFlavourLayers, multi_head_attention

PLACEMENTS = ("block_input", "gemm_input")
POOLINGS = ("mean", "class")


@dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ``MultiExitViT``: ``image_size`` must be divisible by ``patch_size`` and ``width``
    by ``heads``; exits follow blocks ``start_layer`` .. ``depth - 1`` (0-based)."""

    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    width: int = 64
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    start_layer: int = 2
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0 <= self.start_layer < self.depth:
            raise ValueError(f"start_layer must be in [0, depth={self.depth}), got {self.start_layer}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection and an output ``proj``. [N, T, D] -> [N, T, D]."""

    def __init__(self, qkv: nn.Linear, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = qkv
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = self.qkv(x).chunk(3, dim=-1)
        return self.proj(multi_head_attention(query, key, value, self.heads))


class MLP(nn.Module):
    """fc1 -> GELU -> fc2. [N, T, D] -> [N, T, D]."""

    def __init__(self, fc1: nn.Linear, width: int) -> None:
        super().__init__()
        self.fc1 = fc1
        self.act = nn.GELU()
        self.fc2 = nn.Linear(fc1.out_features, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: ``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``. [N, T, D] -> [N, T, D]."""

    def __init__(self, config: ViTConfig, qkv: nn.Linear, fc1: nn.Linear) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = Attention(qkv, config.width, config.heads)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = MLP(fc1, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPoolExit(nn.Module):
    """Exit head: LayerNorm -> pooling (mean of the tokens after ``prefix_tokens``, or the class token) -> fc."""

    def __init__(self, width: int, num_classes: int, pooling: str, prefix_tokens: int) -> None:
        super().__init__()
        self.pooling, self.prefix_tokens = pooling, prefix_tokens
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        pooled = x[:, 0] if self.pooling == "class" else x[:, self.prefix_tokens:].mean(dim=1)
        return self.fc(pooled)


class MultiExitViT(MultiExitNetwork):
    """ViT with exits from ``config.start_layer`` on.

    Args:
        config: the architecture (``ViTConfig``).
        num_classes: classes of every exit.
        flavour, beta, backend: see ``FlavourLayers``; Cp = round(beta * width).
        placement: "block_input" (official DFS) or "gemm_input" (see the module docstring).

    ``forward(x)``: images [N, C, H, W] -> list of [N, num_classes], shallow to deep;
    ``return_features=True`` returns ``(logits, None)``.
    """

    def __init__(self, config: ViTConfig, num_classes: int, *, flavour: str = "dfs", beta: float = 0.5,
                 backend: str = "auto", placement: str = "block_input") -> None:
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.config, self.placement = config, placement
        self.input_size = (config.in_channels, config.image_size, config.image_size)
        dfs = TokenFlavourLayers(flavour, beta, backend, "all")
        width, hidden = config.width, int(config.width * config.mlp_ratio)
        prefix_tokens = 1 if config.pooling == "class" else 0
        patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = nn.Conv2d(config.in_channels, width, config.patch_size, stride=config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if prefix_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, prefix_tokens + patches, width) * 0.02)

        self.exit_after = list(range(config.start_layer, config.depth))
        # Blocks that read a split point (the ones after an early exit) are where DFS acts.
        after_split = set(index + 1 for index in self.exit_after[:-1])
        blocks = []
        for index in range(config.depth):
            partitioned = placement == "gemm_input" and index in after_split
            linear = dfs.partitioned_linear if partitioned else nn.Linear
            blocks.append(Block(config, linear(width, 3 * width), linear(width, hidden)))
        self.blocks = nn.ModuleList(blocks)
        self.splits = nn.ModuleList(
            dfs.token_split(width, full_exit_gradient=True) if placement == "block_input" else nn.Identity()
            for _ in self.exit_after[:-1]
        )
        self.exits = nn.ModuleList(TokenPoolExit(width, num_classes, config.pooling, prefix_tokens)
                                   for _ in self.exit_after)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens (class token first when pooling it) plus position embeddings: [N, T, width]."""
        tokens = self.patch_embed(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos_embed

    def forward(self, x: torch.Tensor, return_features: bool = False):
        h = self.embed(x)
        logits = []
        exits = iter(self.exits)
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index in self.exit_after:
                logits.append(next(exits)(h))
                if index < self.config.depth - 1:
                    h = self._backbone_side(index, h)
        return (logits, None) if return_features else logits

    def _backbone_side(self, block_index: int, h: torch.Tensor) -> torch.Tensor:
        split = self.splits[block_index - self.config.start_layer]
        return h if isinstance(split, nn.Identity) else split(h)[0]

    def exit_modules(self) -> list[nn.Module]:
        return list(self.exits)


VIT_TINY = ViTConfig(image_size=32, patch_size=4, width=64, depth=6, heads=4, mlp_ratio=4.0, start_layer=2)


def vit_tiny(num_classes: int = 10, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
             placement: str = "block_input", pooling: str = "mean", patch_size: int = 4) -> MultiExitViT:
    """A small ViT for 32x32 images (digits, CIFAR): patch 4 (64 tokens), width 64, depth 6, 4 heads, MLP x4;
    exits after blocks 2-5 (4 exits)."""
    config = ViTConfig(**{**VIT_TINY.__dict__, "pooling": pooling, "patch_size": patch_size})
    return MultiExitViT(config, num_classes, flavour=flavour, beta=beta, backend=backend, placement=placement)


def vit_tiny_digits(num_classes: int = 10, **kwargs) -> MultiExitViT:
    """``vit_tiny`` with patch 8 (16 tokens), for quick runs on the digits' 32x32 images (upsampled from 8x8)."""
    return vit_tiny(num_classes, patch_size=8, **kwargs)
