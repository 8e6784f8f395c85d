"""Multi-exit networks of the DFS paper in three flavours built from one parameter set.

``flavour="dsn"`` is the plain multi-exit network, ``"dfs_eager"`` Deep Feature Surgery written with
``dfs_kernels.reference``, ``"dfs"`` DFS through the package's ops (``backend=``). One state_dict
loads into every flavour and the forward outputs are equal (in training mode under the same RNG seed:
MSDNet's classifiers drop out); only the backward differs. ResNet-18 and MSDNet initialize as the
reference code does (see their classes), VGG with PyTorch's defaults. Every model
returns its exits' logits as a list ordered shallow to deep; ``model(x, return_features=True)``
returns ``(logits, features)``, where features are the distillation features of ResNet-18 (the
adaptation outputs of exits 1-3 and the pooled final feature) and None for VGG and MSDNet, which have
no adaptation layers.

``blockwise_view(model)`` cuts a model at its exits, to run it one block at a time.
``python -m dfs_kernels.models.summary --model NAME`` prints per-exit parameters and FLOPs.
"""

from __future__ import annotations

from ._common import EXIT_GRADS, FLAVOURS, MultiExitNetwork
from .bert import EncoderConfig, MultiExitEncoder, bert_small, bert_tiny, bert_tiny_digits
from .blockwise import Blockwise, blockwise_view
from .hf_bert import from_hf_bert
from .msdnet import MSDNet, msdnet
from .resnet import MultiExitResNet18, resnet18
from .vgg import MultiExitVGG, vgg7_64, vgg16_64
from .vit import MultiExitViT, ViTConfig, vit_tiny, vit_tiny_digits


def _msdnet_imagenet(**kwargs) -> MSDNet:
    return msdnet("imagenet", **kwargs)


def _vit_tiny_gemm_input(**kwargs) -> MultiExitViT:
    return vit_tiny(placement="gemm_input", **kwargs)


def _vit_tiny_digits_gemm_input(**kwargs) -> MultiExitViT:
    return vit_tiny_digits(placement="gemm_input", **kwargs)


MODELS = {
    "vgg7": vgg7_64,
    "vgg16": vgg16_64,
    "resnet18": resnet18,
    "msdnet": msdnet,
    "msdnet_imagenet": _msdnet_imagenet,
    "vit_tiny": vit_tiny,
    "vit_tiny_gemm_input": _vit_tiny_gemm_input,
    "vit_tiny_digits": vit_tiny_digits,
    "vit_tiny_digits_gemm_input": _vit_tiny_digits_gemm_input,
    "bert_tiny": bert_tiny,
    "bert_tiny_digits": bert_tiny_digits,
    "bert_small": bert_small,
}
"""Registry of ``build_model`` names: "msdnet" is the CIFAR-100 MSDNet; "vit_tiny" is the official DFS
placement and "vit_tiny_gemm_input" the GEMM-input one, "vit_tiny_digits" (and its "_gemm_input") the same
with patch 8 for quick digits runs; "bert_tiny" reads token ids and "bert_tiny_digits" images as 8 row tokens
of 8 features; "bert_small" reads token ids at BERT-base width (hidden 768, intermediate 3072), where the
GEMMs dominate the step."""
TOKEN_MODELS = ("bert_tiny", "bert_small")
"""Registry names of the models that read token ids [N, T] (the others read images)."""
MODEL_ALIASES = {"vgg7_64": "vgg7", "vgg16_64": "vgg16"}
"""Factory names accepted for the registry name they build."""


def canonical_model_name(name: str) -> str:
    """The registry name of ``name`` (a ``MODELS`` key or a factory name of ``MODEL_ALIASES``); ValueError
    listing the choices otherwise."""
    name = MODEL_ALIASES.get(name, name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)} (or {sorted(MODEL_ALIASES)})")
    return name


def build_model(name: str, **kwargs) -> MultiExitNetwork:
    """The model registered as ``name`` (see ``MODELS``; factory names such as "vgg7_64" work too), built with
    the factory's keyword arguments (``num_classes``, ``flavour``, ``beta``, ``backend``; the CNNs also
    ``exit_grad``, MSDNet ``growth_rate``, the ViT ``placement`` and ``pooling``)."""
    return MODELS[canonical_model_name(name)](**kwargs)


__all__ = [
    "Blockwise",
    "EncoderConfig",
    "EXIT_GRADS",
    "FLAVOURS",
    "MODELS",
    "MODEL_ALIASES",
    "TOKEN_MODELS",
    "MSDNet",
    "MultiExitEncoder",
    "MultiExitNetwork",
    "MultiExitResNet18",
    "MultiExitVGG",
    "MultiExitViT",
    "ViTConfig",
    "bert_small",
    "bert_tiny",
    "bert_tiny_digits",
    "blockwise_view",
    "build_model",
    "canonical_model_name",
    "from_hf_bert",
    "msdnet",
    "resnet18",
    "vgg16_64",
    "vgg7_64",
    "vit_tiny",
    "vit_tiny_digits",
]
