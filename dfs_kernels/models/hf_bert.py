"""``from_hf_bert``: a Hugging Face ``BertForSequenceClassification`` as a DFS multi-exit encoder.

The encoder, its pooler and its classifier become ``MultiExitEncoder``'s layers and final exit (weights
copied); the exits before layers 1 .. L-1 are new, initialized as BERT initializes its layers. Only
``transformers``' configuration and weights are read, so any model it loads (or builds from a
``BertConfig``) can be converted.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .bert import EncoderConfig, MultiExitEncoder

# Hugging Face key -> MultiExitEncoder key (regular expressions, applied in order)
_KEY_MAP = (
    (r"^bert\.embeddings\.LayerNorm\.", "embeddings.norm."),
    (r"^bert\.embeddings\.", "embeddings."),
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.", r"layers.\1.\2."),
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention_output."),
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"^bert\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"^bert\.encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"^bert\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
)


def _translate(key: str, last_exit: int) -> str | None:
    if key.startswith("bert.pooler.dense."):
        return f"exits.{last_exit}.pooler." + key.rsplit(".", 1)[1]
    if key.startswith("classifier."):
        return f"exits.{last_exit}.classifier." + key.rsplit(".", 1)[1]
    for pattern, replacement in _KEY_MAP:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def from_hf_bert(hf_model: nn.Module, *, flavour: str = "dfs", beta: float = 0.5, backend: str = "auto",
                 sequence_length: int | None = None) -> MultiExitEncoder:
    """The multi-exit encoder of ``hf_model`` (a ``transformers.BertForSequenceClassification``).

    Args:
        hf_model: the model; its weights are copied, it is not modified.
        flavour, beta, backend: as for every model (``dfs_kernels.models``).
        sequence_length: length of ``example_input``'s sequences (default: min(128, max positions)).

    The final exit's logits equal ``hf_model``'s (eval mode). Raises ValueError for configurations the
    encoder does not implement (an activation other than GELU, relative position embeddings, a decoder).
    """
    config = hf_model.config
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise ValueError(f"hf_model.config.hidden_act must be 'gelu', got {config.hidden_act!r}")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("hf_model.config.position_embedding_type must be 'absolute', got "
                         f"{config.position_embedding_type!r}")
    if getattr(config, "is_decoder", False):
        raise ValueError("hf_model.config.is_decoder must be False: only encoders are converted")
    if getattr(hf_model, "bert", None) is None or getattr(hf_model, "classifier", None) is None:
        raise ValueError(f"hf_model must be a BertForSequenceClassification, got {type(hf_model).__name__}")
    encoder_config = EncoderConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, type_vocab_size=config.type_vocab_size,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        classifier_dropout=config.classifier_dropout, layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range, pad_token_id=getattr(config, "pad_token_id", None),
        sequence_length=sequence_length or min(128, config.max_position_embeddings))
    model = MultiExitEncoder(encoder_config, config.num_labels, flavour=flavour, beta=beta, backend=backend)
    last_exit = config.num_hidden_layers - 1
    state = {}
    buffers = {name for name, _ in hf_model.named_buffers()}  # position_ids (kept by older releases), not weights
    for key, value in hf_model.state_dict().items():
        target = None if key in buffers else _translate(key, last_exit)
        if target is not None:
            state[target] = value
    reference_parameter = next(hf_model.parameters())
    model.to(device=reference_parameter.device, dtype=reference_parameter.dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    new_exits = [name for name in missing if not name.startswith(f"exits.{last_exit}.") and name.startswith("exits.")]
    if unexpected or len(new_exits) != len(missing):
        raise ValueError("hf_model's weights do not match the encoder: missing "
                         f"{sorted(set(missing) - set(new_exits))}, unexpected {sorted(unexpected)}")
    return model.train(hf_model.training)


__all__ = ["from_hf_bert"]
