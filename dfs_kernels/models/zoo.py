"""Models from torchvision, timm and Hugging Face transformers by name, with exits put on by ``multi_exit``.

A model spec is ``LIBRARY:NAME``; the weights are random and nothing is downloaded:

- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, num_classes=K, **kwargs)``
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=K, **kwargs)``
- ``hf:NAME``: ``NAME`` is a Hugging Face model type ("bert", "resnet", "vit", ...): the configuration
  ``AutoConfig.for_model(NAME, num_labels=K, **kwargs)``, then its image-classification model when
  transformers has one, else its sequence-classification model (``from_config``).

``kwargs`` (``TrainConfig.model_kwargs``, ``dfs-train --model-kwargs``) override the library's defaults:
the defaults are the full-size models (``hf:resnet`` is ResNet-50, ``hf:bert`` BERT-base), and a small
configuration is a few keys (``{"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}``). Convolutional
networks take images of any size; vision transformers need theirs (torchvision ``image_size``, timm
``img_size``, Hugging Face ``image_size``; the digits data are 3 x 32 x 32). Hugging Face models whose
input is ``input_ids`` read token ids, every other model images.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Sequence

import torch
from torch import nn

from ..multi_exit import MultiExitModel, multi_exit

LIBRARIES = {"torchvision": "torchvision", "timm": "timm", "hf": "transformers"}
"""Spec prefix -> the pip package that provides the models."""


def is_spec(model: str) -> bool:
    """Whether ``model`` names a library model (``LIBRARY:NAME``) rather than one of the package's."""
    return ":" in model


def parse_spec(spec: str) -> tuple[str, str]:
    """``(library prefix, model name)`` of ``spec``; ValueError naming the prefixes for a malformed one."""
    prefix, _, name = spec.partition(":")
    if prefix not in LIBRARIES or not name:
        raise ValueError(f"model spec must be LIBRARY:NAME with LIBRARY one of {list(LIBRARIES)}, got {spec!r}")
    return prefix, name


def _import(prefix: str, spec: str):
    package = LIBRARIES[prefix]
    try:
        return importlib.import_module(package)
    except ModuleNotFoundError as error:
        raise ImportError(f"model {spec!r} needs {package}: pip install {package}") from error
    # PyPI's torchvision with a CPU-only torch: RuntimeError "operator torchvision::nms does not exist"
    except (RuntimeError, ImportError) as error:
        raise ImportError(f"model {spec!r} needs {package}, which is installed but does not load with this torch "
                          f"({torch.__version__}): {error}. Install the {package} build made for this torch "
                          "(PyPI's torchvision wheels need PyPI's CUDA build of torch)") from error


def _unknown(spec: str, name: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    return ValueError(f"unknown model {spec!r}" + (f"; closest names: {close}" if close else ""))


def _hf_classes(transformers, name: str, spec: str):
    """The Auto class that builds model type ``name``'s classifier: image classification where transformers
    has one, else sequence classification. ValueError for an unknown type or one with neither."""
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if name not in CONFIG_MAPPING_NAMES:
        raise _unknown(spec, name, CONFIG_MAPPING_NAMES)
    if name in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return transformers.AutoModelForImageClassification
    if name in modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        return transformers.AutoModelForSequenceClassification
    raise ValueError(f"model {spec!r}: transformers has no image or sequence classification model for {name!r}")


def reads_tokens(spec: str) -> bool:
    """Whether the model of ``spec`` reads token ids [N, T] (Hugging Face text models) rather than images."""
    prefix, name = parse_spec(spec)
    if prefix != "hf":
        return False
    transformers = _import(prefix, spec)
    return _hf_classes(transformers, name, spec) is transformers.AutoModelForSequenceClassification


def build_backbone(spec: str, *, num_classes: int, **kwargs) -> nn.Module:
    """The classifier ``spec`` names with ``num_classes`` outputs and random weights (see the module
    docstring). ValueError for a malformed spec or an unknown name (with the closest names), ImportError
    naming the pip package for a library that is missing or does not load."""
    prefix, name = parse_spec(spec)
    library = _import(prefix, spec)
    if prefix == "torchvision":
        if name not in library.models.list_models():
            raise _unknown(spec, name, library.models.list_models())
        return library.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if prefix == "timm":
        if not library.is_model(name):
            raise _unknown(spec, name, library.list_models())
        return library.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    auto_class = _hf_classes(library, name, spec)
    config = library.AutoConfig.for_model(name, num_labels=num_classes, **kwargs)
    return auto_class.from_config(config)


def build_multi_exit(spec: str, exits: Sequence[str], *, num_classes: int, model_kwargs: dict | None = None,
                     **multi_exit_kwargs) -> MultiExitModel:
    """``multi_exit(build_backbone(spec, ...), exits, num_classes=num_classes, ...)``: the heads of the exits
    are the default ``PooledExitHead``s; ``multi_exit_kwargs`` are ``multi_exit``'s (beta, flavour, backend,
    example_input...)."""
    backbone = build_backbone(spec, num_classes=num_classes, **(model_kwargs or {}))
    return multi_exit(backbone, list(exits), num_classes=num_classes, **multi_exit_kwargs)


__all__ = ["LIBRARIES", "build_backbone", "build_multi_exit", "is_spec", "parse_spec", "reads_tokens"]
