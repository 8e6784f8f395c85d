"""Multi-exit BERT-style encoder (post-LN layers) with DFS on the hidden axis, as the official DFS BERT.

Embeddings (word or feature projection, position, token type; LayerNorm; dropout), then post-LN layers:
``a = LN(h + dropout(W_o attn(h W_q, h W_k, h W_v)))``, ``h' = LN(a + dropout(W_2 GELU(W_1 a)))``. Before every
layer i >= 1 the hidden state is a split point: layer i reads ``[h+, sg(h-)]`` and exit i reads
``[sg(h+), h-]``; the final exit reads the last layer's output. Every exit is a pooler (first token,
Linear + tanh), dropout and a Linear classifier; the last one is the model's own classifier.

The split point feeds the Q/K/V projections and the residual directly, so in the ``"dfs"`` flavour Q/K/V
are ``PartitionedLinear`` layers reading h (their input gradient reaches only the first Cp features) and
the residual reads the rerouted view: no GEMM computes an input gradient that DFS discards
(docs/cost_model.md).

Inputs: token ids [N, T] (``vocab_size``), or, with ``input_features=F``, feature vectors [N, T, F] or
images [N, C, H, W] read as tokens: the rows of channel 0, average-pooled to ``sequence_length`` rows of
``F`` features when the image has another size. The digits task feeds the encoder its 32x32 images pooled back
to the digits' native 8x8: 8 tokens of 8 features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import MultiExitNetwork, TokenFlavourLayers, multi_head_attention


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a ``MultiExitEncoder``; the names and defaults follow ``transformers.BertConfig``.
    ``input_features`` switches from token ids to feature vectors; ``sequence_length`` is the length of
    ``example_input``'s sequences; ``pad_token_id`` (None: no padding token) is the word embedding's
    ``padding_idx``, a row initialized to zeros that training never updates, as in BERT."""

    vocab_size: int = 1000
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    input_features: int | None = None
    sequence_length: int = 64
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {self.num_hidden_layers}")
        if self.sequence_length > self.max_position_embeddings:
            raise ValueError(f"sequence_length ({self.sequence_length}) must be <= max_position_embeddings "
                             f"({self.max_position_embeddings})")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be None or in [0, vocab_size={self.vocab_size}), "
                             f"got {self.pad_token_id}")


class Embeddings(nn.Module):
    """Word (or feature-projection) + position + token-type embeddings -> LayerNorm -> dropout: [N, T, D]."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        if config.input_features is None:
            self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        else:
            self.feature_projection = nn.Linear(config.input_features, config.hidden_size)
            self.row_grid = (config.sequence_length, config.input_features)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, inputs: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "word_embeddings"):
            tokens = self.word_embeddings(inputs)
        else:
            if inputs.dim() == 4:  # images: the rows of the first channel are the tokens
                inputs = inputs[:, 0]
                if inputs.shape[-2:] != self.row_grid:  # average-pooled to sequence_length x input_features
                    inputs = F.adaptive_avg_pool2d(inputs.unsqueeze(1), self.row_grid).squeeze(1)
            tokens = self.feature_projection(inputs)
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(tokens.shape[:2], dtype=torch.long, device=tokens.device)
        tokens = tokens + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(tokens))


class EncoderLayer(nn.Module):
    """Post-LN layer. ``forward(h, gemm_input)``: the residual reads ``h`` and Q/K/V read ``gemm_input``
    (the same values; DFS gives them different gradients). [N, T, D] -> [N, T, D]."""

    def __init__(self, config: EncoderConfig, flavour_layers: TokenFlavourLayers | None) -> None:
        super().__init__()
        width = config.hidden_size
        projection = flavour_layers.partitioned_linear if flavour_layers is not None else nn.Linear
        self.heads = config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob
        self.query, self.key, self.value = (projection(width, width) for _ in range(3))
        self.attention_output = nn.Linear(width, width)
        self.attention_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(width, config.intermediate_size)
        self.act = nn.GELU()
        self.output = nn.Linear(config.intermediate_size, width)
        self.output_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, gemm_input: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        context = multi_head_attention(self.query(gemm_input), self.key(gemm_input), self.value(gemm_input),
                                       self.heads, mask=mask,
                                       dropout=self.attention_dropout if self.training else 0.0)
        attended = self.attention_norm(h + self.dropout(self.attention_output(context)))
        return self.output_norm(attended + self.dropout(self.output(self.act(self.intermediate(attended)))))


class PoolerExit(nn.Module):
    """Exit: pooler (first token, Linear + tanh) -> dropout -> classifier. [N, T, D] -> [N, num_classes]."""

    def __init__(self, width: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pooler = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(torch.tanh(self.pooler(h[:, 0]))))


class MultiExitEncoder(MultiExitNetwork):
    """BERT-style encoder with an exit before every layer i >= 1 and the final classifier.

    Args:
        config: the architecture (``EncoderConfig``).
        num_classes: classes of every exit.
        flavour, beta, backend: see ``FlavourLayers``; Cp = round(beta * hidden_size).

    ``forward(x, attention_mask=None, token_type_ids=None)``: x as in the module docstring;
    ``attention_mask`` [N, T] is 1 for tokens to attend to, 0 for padding. Returns a list of
    ``num_hidden_layers`` [N, num_classes] logits, shallow to deep; ``return_features=True`` returns
    ``(logits, None)``.
    """

    def __init__(self, config: EncoderConfig, num_classes: int, *, flavour: str = "dfs", beta: float = 0.5,
                 backend: str = "auto") -> None:
        super().__init__()
        self.config = config
        # input_size: what example_input draws (image rows: the digits/CIFAR image shape)
        self.input_size = ((config.sequence_length,) if config.input_features is None
                           else (3, config.sequence_length, config.input_features))
        dfs = TokenFlavourLayers(flavour, beta, backend, "partitioned")
        width = config.hidden_size
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config, dfs if index > 0 else None)
                                    for index in range(config.num_hidden_layers))
        self.splits = nn.ModuleList(dfs.token_split(width, full_exit_gradient=False)
                                    for _ in range(config.num_hidden_layers - 1))
        dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
        self.exits = nn.ModuleList(PoolerExit(width, num_classes, dropout) for _ in range(config.num_hidden_layers))
        # In the "dfs" flavour Q/K/V are partitioned layers reading h itself; the other flavours read the
        # backbone view (DSN: h; dfs_eager: [h+, sg(h-)]).
        self.partitioned_projections = flavour == "dfs"
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialization: normal(0, initializer_range) weights, zero biases and padding embedding,
        unit LayerNorms."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
            if getattr(module, "padding_idx", None) is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, return_features: bool = False, *, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None):
        h = self.embeddings(x, token_type_ids)
        mask = None
        if attention_mask is not None:  # additive [N, 1, 1, T]: padding gets the dtype's lowest value
            keep = attention_mask[:, None, None, :].to(h.dtype)
            mask = (1.0 - keep) * torch.finfo(h.dtype).min
        logits = []
        h = self.layers[0](h, h, mask)
        for layer, split, exit in zip(self.layers[1:], self.splits, self.exits):
            backbone, exit_view = split(h)
            logits.append(exit(exit_view))
            h = layer(backbone, h if self.partitioned_projections else backbone, mask)
        logits.append(self.exits[-1](h))
        return (logits, None) if return_features else logits

    def exit_modules(self) -> list[nn.Module]:
        return list(self.exits)

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.input_features is not None:
            return super().example_input(batch_size, generator)
        return torch.randint(self.config.vocab_size, (batch_size, self.config.sequence_length), generator=generator)


BERT_TINY = EncoderConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
BERT_TINY_DIGITS = EncoderConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                                 input_features=8, sequence_length=8)
BERT_SMALL = EncoderConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072,
                           max_position_embeddings=512, sequence_length=128)


def bert_tiny(num_classes: int = 2, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
              ) -> MultiExitEncoder:
    """A small BERT-style encoder on token ids: vocabulary 1000, 64 tokens, hidden 128, 4 layers of 4 heads,
    intermediate 512; 4 exits."""
    return MultiExitEncoder(BERT_TINY, num_classes, flavour=flavour, beta=beta, backend=backend)


def bert_tiny_digits(num_classes: int = 10, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
                     ) -> MultiExitEncoder:
    """An encoder for images at 8x8 (digits; larger images are average-pooled to 8x8): 8 row tokens of 8
    features, hidden 64, 4 layers of 4 heads, intermediate 256; 4 exits."""
    return MultiExitEncoder(BERT_TINY_DIGITS, num_classes, flavour=flavour, beta=beta, backend=backend)


def bert_small(num_classes: int = 2, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
               ) -> MultiExitEncoder:
    """An encoder on token ids at BERT-base width, where the GEMMs dominate the step: vocabulary 1000,
    128 tokens (512 positions), hidden 768, 4 layers of 12 heads, intermediate 3072; 4 exits."""
    return MultiExitEncoder(BERT_SMALL, num_classes, flavour=flavour, beta=beta, backend=backend)
