"""The transformer models: one state_dict and equal outputs over the flavours, DFS gradients of the "dfs"
flavour equal to the literal "dfs_eager" ones (float64), the Hugging Face adapter, and short training runs."""

from __future__ import annotations

import pytest
import torch

from dfs_kernels import models
from dfs_kernels.models import EncoderConfig, MultiExitEncoder, MultiExitViT, ViTConfig, hf_bert
from dfs_kernels.models._common import ReferencePartitionedLinear
from dfs_kernels.models.bert import BERT_SMALL
from dfs_kernels import PartitionedLinear
from dfs_kernels.training import build_strategy
from dfs_kernels.training.data import load_digits
from dfs_kernels.training.trainer import TrainConfig, train

SMALL_VIT = ViTConfig(image_size=16, patch_size=4, width=16, depth=4, heads=2, mlp_ratio=2.0, start_layer=1)
SMALL_ENCODER = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                              intermediate_size=24, max_position_embeddings=16, sequence_length=8,
                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SMALL_ROW_ENCODER = EncoderConfig(**{**SMALL_ENCODER.__dict__, "input_features": 8})
VARIANTS = {
    "vit_block_input": lambda **kw: MultiExitViT(SMALL_VIT, 5, **kw),
    "vit_gemm_input": lambda **kw: MultiExitViT(SMALL_VIT, 5, placement="gemm_input", **kw),
    "vit_class_token": lambda **kw: MultiExitViT(ViTConfig(**{**SMALL_VIT.__dict__, "pooling": "class"}), 5, **kw),
    "encoder_tokens": lambda **kw: MultiExitEncoder(SMALL_ENCODER, 5, **kw),
    "encoder_rows": lambda **kw: MultiExitEncoder(SMALL_ROW_ENCODER, 5, **kw),
}


def _flavours(variant: str, beta: float = 0.5, dtype=torch.float32) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    built = {flavour: VARIANTS[variant](flavour=flavour, beta=beta) for flavour in models.FLAVOURS}
    state = built["dsn"].state_dict()
    for model in built.values():
        model.load_state_dict(state)  # strict: same parameter names in every flavour
        model.to(dtype)
    return built


def _input(model, dtype=torch.float32) -> torch.Tensor:
    x = model.example_input(3, torch.Generator().manual_seed(1))
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_flavours_share_the_state_dict_and_the_outputs(variant):
    built = _flavours(variant)
    x = _input(built["dsn"])
    expected = built["dsn"].eval()(x)
    assert len(expected) == len(built["dsn"].exit_modules())
    for flavour in ("dfs_eager", "dfs"):
        for actual, wanted in zip(built[flavour].eval()(x), expected):
            torch.testing.assert_close(actual, wanted)


@pytest.mark.parametrize("name", models.TOKEN_MODELS)
def test_token_presets_share_the_state_dict_and_the_outputs(name):
    """The registered token-id encoders (bert_small at BERT-base width too) build in every flavour from one
    state_dict, partition Q/K/V of the layers after the first, and give equal outputs (one short sequence,
    to keep the 768-wide preset fast)."""
    torch.manual_seed(0)
    built = {flavour: models.build_model(name, flavour=flavour) for flavour in models.FLAVOURS}
    state = built["dsn"].state_dict()
    for model in built.values():
        model.load_state_dict(state)  # strict: same parameter names in every flavour
        model.eval()
    config = built["dsn"].config
    assert built["dsn"].example_input(2).shape == (2, config.sequence_length)
    partitioned = sorted(layer for layer, module in built["dfs"].named_modules()
                         if isinstance(module, PartitionedLinear))
    assert partitioned == [f"layers.{i}.{p}" for i in range(1, config.num_hidden_layers)
                           for p in ("key", "query", "value")]
    assert all(module.shared_features == config.hidden_size // 2 for module in built["dfs"].modules()
               if isinstance(module, PartitionedLinear))
    x = torch.randint(config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = built["dsn"](x)
        assert len(expected) == config.num_hidden_layers and expected[0].shape == (1, 2)
        for flavour in ("dfs_eager", "dfs"):
            for actual, wanted in zip(built[flavour](x), expected):
                torch.testing.assert_close(actual, wanted)


def test_bert_small_is_bert_base_wide():
    """A preset where the GEMMs dominate the step (bench/train_step.py measures DFS's saving on it)."""
    assert "bert_small" in models.TOKEN_MODELS  # the trainer feeds it token ids
    config = BERT_SMALL
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (768, 12, 3072)
    assert (config.num_hidden_layers, config.sequence_length, config.vocab_size) == (4, 128, 1000)


def _gradients(model, x, weights):
    model.train()
    x = x.clone().requires_grad_(x.is_floating_point())
    loss = sum((logits * weight).sum() for logits, weight in zip(model(x), weights))
    loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    if x.requires_grad:
        grads["input"] = x.grad
    return grads


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
def test_dfs_gradients_equal_the_literal_formulation(variant, beta):
    built = _flavours(variant, beta, torch.float64)
    x = _input(built["dsn"], torch.float64)
    weights = [torch.randn_like(logits) for logits in built["dsn"](x)]
    grads = {flavour: _gradients(model, x, weights) for flavour, model in built.items()}
    for name, expected in grads["dfs_eager"].items():
        torch.testing.assert_close(grads["dfs"][name], expected, rtol=1e-10, atol=1e-12, msg=name)
    changed = [name for name in grads["dsn"] if not torch.allclose(grads["dsn"][name], grads["dfs"][name])]
    if beta < 1.0:
        assert changed  # DFS changes the gradients
    elif variant.startswith("vit"):  # every feature shared and exits reading h: the ViT is DSN again
        assert not changed


def test_placements_partition_where_documented():
    official = MultiExitViT(SMALL_VIT, 5, flavour="dfs")
    assert not any(isinstance(module, PartitionedLinear) for module in official.modules())
    variant = MultiExitViT(SMALL_VIT, 5, flavour="dfs_eager", placement="gemm_input")
    # exits after blocks 1, 2, 3: blocks 2 and 3 read split points, their qkv and fc1 are partitioned
    partitioned = sorted(name for name, module in variant.named_modules()
                         if isinstance(module, ReferencePartitionedLinear))
    assert partitioned == ["blocks.2.attn.qkv", "blocks.2.mlp.fc1", "blocks.3.attn.qkv", "blocks.3.mlp.fc1"]
    encoder = MultiExitEncoder(SMALL_ENCODER, 5, flavour="dfs")
    partitioned = sorted(name for name, module in encoder.named_modules() if isinstance(module, PartitionedLinear))
    assert partitioned == [f"layers.{i}.{p}" for i in (1, 2) for p in ("key", "query", "value")]
    with pytest.raises(ValueError, match="placement"):
        MultiExitViT(SMALL_VIT, 5, placement="everywhere")
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match=r"pad_token_id must be None or in \[0, vocab_size=50\)"):
        EncoderConfig(**{**SMALL_ENCODER.__dict__, "pad_token_id": 50})
    padded = MultiExitEncoder(EncoderConfig(**{**SMALL_ENCODER.__dict__, "pad_token_id": 3}), 5)
    assert not padded.embeddings.word_embeddings.weight[3].any()  # BERT's init: the padding row is zeros


def test_from_hf_bert_matches_the_hugging_face_logits():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=37, max_position_embeddings=40, num_labels=3)
    torch.manual_seed(0)
    hf_model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(99, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    token_types = torch.zeros(2, 12, dtype=torch.long)
    token_types[:, 6:] = 1
    with torch.no_grad():
        expected = hf_model(input_ids=ids, attention_mask=mask, token_type_ids=token_types).logits
        for flavour in models.FLAVOURS:
            model = models.from_hf_bert(hf_model, flavour=flavour, beta=0.5).eval()
            logits = model(ids, attention_mask=mask, token_type_ids=token_types)
            assert len(logits) == 3 and logits[0].shape == (2, 3)
            torch.testing.assert_close(logits[-1], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="hidden_act"):
        models.from_hf_bert(transformers.BertForSequenceClassification(
            transformers.BertConfig(**{**config.to_dict(), "hidden_act": "relu"})))


def test_from_hf_bert_trains_like_the_hugging_face_model():
    """Fine-tuning the converted DSN model on its final exit gives Hugging Face's gradients for every copied
    weight: the padding token's embedding row included, which BERT never updates (``padding_idx``)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=31, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=20, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=1)
    torch.manual_seed(0)
    hf_model = transformers.BertForSequenceClassification(config).double().train()
    model = models.from_hf_bert(hf_model, flavour="dsn").train()
    assert model.embeddings.word_embeddings.padding_idx == 1
    ids = torch.randint(31, (3, 10))
    ids[:, -3:] = ids[:, 4] = config.pad_token_id  # one attended: its row would get a gradient without padding_idx
    mask = torch.ones_like(ids)
    mask[:, -3:] = 0
    weights = torch.randn(3, 3, dtype=torch.float64)
    (hf_model(input_ids=ids, attention_mask=mask).logits * weights).sum().backward()
    (model(ids, attention_mask=mask)[-1] * weights).sum().backward()
    hf_grads = {name: parameter.grad for name, parameter in hf_model.named_parameters()}
    ours = dict(model.named_parameters())
    compared = 0
    for name, parameter in hf_model.named_parameters():
        target = hf_bert._translate(name, config.num_hidden_layers - 1)
        torch.testing.assert_close(ours[target].grad, hf_grads[name], rtol=1e-9, atol=1e-12, msg=name)
        compared += 1
    assert compared == len(hf_grads)
    assert torch.count_nonzero(ours["embeddings.word_embeddings.weight"].grad[1]) == 0


def test_from_hf_bert_skips_the_hugging_face_buffers():
    """Older ``transformers`` releases keep ``position_ids`` in the state_dict: a buffer, not a weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=8, max_position_embeddings=12)
    hf_model = transformers.BertForSequenceClassification(config).eval()
    for name in ("position_ids", "token_type_ids"):
        buffer = getattr(hf_model.bert.embeddings, name)
        hf_model.bert.embeddings.register_buffer(name, buffer, persistent=True)
    assert "bert.embeddings.position_ids" in hf_model.state_dict()
    ids = torch.randint(20, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(models.from_hf_bert(hf_model).eval()(ids)[-1], hf_model(input_ids=ids).logits)


DIGITS_MODELS = {  # small enough for a test: 32x32 digits as 16 patches, or as 8 row tokens of 8 features
    "vit": lambda: MultiExitViT(ViTConfig(patch_size=8, width=32, depth=3, heads=2, start_layer=1), 10),
    "encoder": lambda: MultiExitEncoder(EncoderConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                      intermediate_size=64, input_features=8, sequence_length=8), 10),
}


@pytest.fixture(scope="module")
def digits_batch():
    images, labels = load_digits(0).train.tensors
    return images[:256], labels[:256]


@pytest.mark.parametrize("name", sorted(DIGITS_MODELS))
def test_dfs_training_on_digits_lowers_the_loss(name, digits_batch):
    torch.manual_seed(0)
    images, labels = digits_batch
    model = DIGITS_MODELS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    strategy = build_strategy("dfs")
    epoch_losses = []
    for epoch in range(8):
        losses = []
        for start in range(0, 256, 32):
            optimizer.zero_grad(set_to_none=True)
            result = strategy.backward(model, images[start:start + 32], labels[start:start + 32])
            optimizer.step()
            losses.append(result.loss.item())
        epoch_losses.append(sum(losses) / len(losses))
    assert epoch_losses[-1] < 0.8 * epoch_losses[0], epoch_losses


def test_trainer_runs_the_encoder_with_adamw(tmp_path):
    config = TrainConfig(model="bert_tiny_digits", strategy="dfs", dataset="synthetic", synthetic_samples=32,
                         batch_size=16, epochs=1, lr=1e-3, optimizer="adamw", out=str(tmp_path), device="cpu",
                         progress=False)
    record = train(config)
    assert len(record["epochs"][0]["test_acc"]) == 4
    with pytest.raises(ValueError, match="optimizer"):
        train(TrainConfig(**{**config.__dict__, "optimizer": "lamb", "out": str(tmp_path / "other")}))


def test_trainer_learns_synthetic_token_ids_and_refuses_mismatched_data(tmp_path):
    """The encoder that embeds token ids trains on the synthetic token dataset (its classes favour bands
    of the vocabulary, so the loss must fall), and a dataset of the other kind is refused up front."""
    config = TrainConfig(model="bert_tiny", strategy="dfs", dataset="synthetic_tokens", synthetic_samples=96,
                         batch_size=16, epochs=3, lr=2e-3, optimizer="adamw", out=str(tmp_path), device="cpu",
                         progress=False)
    record = train(config)
    losses = [epoch["loss"] for epoch in record["epochs"]]
    assert losses[-1] < 0.95 * losses[0], losses
    for model, dataset in (("bert_tiny", "synthetic"), ("vgg7", "synthetic_tokens")):
        with pytest.raises(ValueError, match="do not fit"):
            train(TrainConfig(**{**config.__dict__, "model": model, "dataset": dataset,
                                 "out": str(tmp_path / model)}))
