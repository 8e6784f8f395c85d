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
from .blockwise import Blockwise, blockwise_view
from .msdnet import MSDNet, msdnet
from .resnet import MultiExitResNet18, resnet18
from .vgg import MultiExitVGG, vgg7_64, vgg16_64


def _msdnet_imagenet(**kwargs) -> MSDNet:
    return msdnet("imagenet", **kwargs)


MODELS = {
    "vgg7": vgg7_64,
    "vgg16": vgg16_64,
    "resnet18": resnet18,
    "msdnet": msdnet,
    "msdnet_imagenet": _msdnet_imagenet,
}
"""Registry of ``build_model`` names: "msdnet" is the CIFAR-100 MSDNet."""
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
    the factory's keyword arguments (``num_classes``, ``flavour``, ``beta``, ``backend``, ``exit_grad``;
    MSDNet also ``growth_rate``)."""
    return MODELS[canonical_model_name(name)](**kwargs)


__all__ = [
    "Blockwise",
    "EXIT_GRADS",
    "FLAVOURS",
    "MODELS",
    "MODEL_ALIASES",
    "MSDNet",
    "MultiExitNetwork",
    "MultiExitResNet18",
    "MultiExitVGG",
    "blockwise_view",
    "build_model",
    "canonical_model_name",
    "msdnet",
    "resnet18",
    "vgg16_64",
    "vgg7_64",
]
