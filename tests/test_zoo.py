"""``multi_exit`` on the models users bring: Hugging Face, torchvision and timm networks in small random
configurations (nothing downloaded), each checked in float64 against the literal oracle
(``multi_exit_oracle``) on every parameter of model and heads.

Hugging Face ``transformers`` is pure Python and runs in every CI leg. PyPI's torchvision and timm load
only with a CUDA build of torch, so their cases run in the CI leg that installs one and skip elsewhere.
"""

from __future__ import annotations

import copy
import importlib.util
import re

import pytest
import torch

import dfs_kernels
from multi_exit_oracle import assert_matches_literal_dfs

transformers = pytest.importorskip("transformers")


def _torchvision_loads() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:  # PyPI's torchvision against a CPU-only torch fails here ("torchvision::nms does not exist")
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError):
        return False
    return True


TORCHVISION = _torchvision_loads()
TIMM = TORCHVISION and importlib.util.find_spec("timm") is not None
needs_torchvision = pytest.mark.skipif(not TORCHVISION, reason="torchvision does not load with this torch build")
needs_timm = pytest.mark.skipif(not TIMM, reason="timm (and a torchvision that loads) not installed")

TEXT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, vocab_size=50,
            max_position_embeddings=24)


def _hf(name: str):
    t = transformers
    if name == "bert":
        return t.BertModel(t.BertConfig(**TEXT)), ["encoder.layer.0", "encoder.layer.1"], _ids()
    if name == "roberta":
        return t.RobertaModel(t.RobertaConfig(**TEXT)), ["encoder.layer.0", "encoder.layer.1"], _ids()
    if name == "bert_classifier":
        return (t.BertForSequenceClassification(t.BertConfig(**TEXT, num_labels=3)),
                ["bert.encoder.layer.0", "bert.encoder.layer.1"], _ids())
    if name == "vit":
        config = t.ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37,
                             image_size=16, patch_size=4)
        model = t.ViTModel(config)  # its layers are "layers.k" or "encoder.layer.k", by transformers version
        layers = [n for n, _ in model.named_modules() if re.fullmatch(r"(encoder\.layer|layers)\.\d+", n)]
        return model, layers[:2], _pixels(16)
    if name == "resnet":
        config = t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], layer_type="basic")
        return t.ResNetModel(config), ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"], _pixels(32)
    if name == "convnext":
        config = t.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], image_size=32)
        return t.ConvNextModel(config), ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2"], _pixels(32)
    raise KeyError(name)


def _ids():
    return {"input_ids": torch.randint(0, TEXT["vocab_size"], (3, 9))}


def _pixels(size: int):
    return {"pixel_values": torch.randn(3, 3, size, size, dtype=torch.float64)}


def _torchvision(name: str):
    import torchvision.models as tv

    exits = {"resnet18": ["layer1", "layer2", "layer3"], "resnet50": ["layer1", "layer2", "layer3"],
             "mobilenet_v3_small": ["features.2", "features.4", "features.8"],
             "efficientnet_b0": ["features.2", "features.4", "features.6"],
             "convnext_tiny": ["features.1", "features.3", "features.5"],
             "vit_b_16": ["encoder.layers.encoder_layer_3", "encoder.layers.encoder_layer_7"]}[name]
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}
    return tv.get_model(name, weights=None, num_classes=7, **kwargs), exits, (torch.randn(2, 3, 32, 32,
                                                                                          dtype=torch.float64),)


def _timm(name: str):
    import timm

    exits = {"resnet18": ["layer1", "layer2", "layer3"], "vit_tiny_patch16_224": ["blocks.3", "blocks.7"],
             "convnext_atto": ["stages.0", "stages.1", "stages.2"]}[name]
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=7, **kwargs)
    return model, exits, (torch.randn(2, 3, 32, 32, dtype=torch.float64),)


def _call(example):
    return ((), example) if isinstance(example, dict) else (example, {})


def _check(model, exits, example, *, beta=0.5, exit_grad="partitioned"):
    model = model.double()
    original = copy.deepcopy(model)
    args, kwargs = _call(example)
    wrapped = dfs_kernels.multi_exit(model, exits, num_classes=5, beta=beta, exit_grad=exit_grad,
                                     example_input=example, backend="aten" if _aten() else "reference")
    assert_matches_literal_dfs(wrapped, original, args, kwargs)
    return wrapped


def _aten() -> bool:
    return "aten" in dfs_kernels.available_backends("cpu")


HF_MODELS = ["bert", "roberta", "bert_classifier", "vit", "resnet", "convnext"]


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_model_matches_the_literal_oracle(name):
    model, exits, example = _hf(name)
    _check(model, exits, example)


@pytest.mark.parametrize("exit_grad", ["partitioned", "all"])
def test_bert_partitions_the_qkv_projections_that_read_each_exit_point(exit_grad):
    model, exits, example = _hf("bert")
    wrapped = _check(model, exits, example, exit_grad=exit_grad)
    for k, names in enumerate(wrapped.partitioned):
        assert sorted(n.rsplit(".", 1)[1] for n in names) == ["key", "query", "value"], wrapped.describe()
        assert all(n.startswith(f"encoder.layer.{k + 1}.") for n in names)
    assert all(isinstance(wrapped.model.get_submodule(n), dfs_kernels.PartitionedLinear)
               for names in wrapped.partitioned for n in names)


def test_hugging_face_resnet_partitions_the_next_stage_convolutions():
    model, exits, example = _hf("resnet")
    wrapped = _check(model, exits, example)
    first_readers = sorted(wrapped.partitioned[0])
    assert first_readers == ["encoder.stages.1.layers.0.layer.0.convolution",
                             "encoder.stages.1.layers.0.shortcut.convolution"], wrapped.describe()


TORCHVISION_MODELS = ["resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"]


@needs_torchvision
@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_model_matches_the_literal_oracle(name):
    model, exits, example = _torchvision(name)
    wrapped = _check(model, exits, example)
    if name.startswith("resnet"):
        assert "layer2.0.conv1" in wrapped.partitioned[0] and "layer2.0.downsample.0" in wrapped.partitioned[0]


TIMM_MODELS = ["resnet18", "vit_tiny_patch16_224", "convnext_atto"]


@needs_timm
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_model_matches_the_literal_oracle(name):
    model, exits, example = _timm(name)
    _check(model, exits, example)
