"""dfs_kernels: exact and fast Deep Feature Surgery for multi-exit networks.

Put exits on your own model with ``dfs_kernels.multi_exit(model, exits, num_classes=...)``, or by hand:
swap ``nn.Conv2d`` for ``dfs_kernels.PartitionedConv2d`` (or ``dfs_kernels.convert(model, exits=...)``) and
``nn.Linear`` for ``dfs_kernels.PartitionedLinear`` where a transformer reads a rerouted hidden state,
reference features at exits with ``ExitHead`` / ``FeatureReroute``, and train as usual. For
deployment, ``export_decompositions()`` lowers an exported program to plain ATen ops and
``unconvert(model)`` turns partitioned convolutions back into ``nn.Conv2d``.
"""

from . import _library
from . import export, functional, reference
from .backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    register_flop_formulas,
    resolve_backend,
    unavailable_reason,
)
from .export import export_decompositions
from .multi_exit import MultiExitModel, multi_exit
from .nn import ExitHead, FeatureReroute, PartitionedConv2d, PartitionedLinear, convert, unconvert

__version__ = "0.1.0"


def extension_loaded() -> bool:
    """Whether the compiled ops library (dfs_kernels/_C) is loaded; see ``dfs_kernels._library``."""
    return _library.LOADED


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "ExitHead",
    "FeatureReroute",
    "MultiExitModel",
    "PartitionedConv2d",
    "PartitionedLinear",
    "available_backends",
    "convert",
    "export",
    "export_decompositions",
    "extension_loaded",
    "functional",
    "multi_exit",
    "reference",
    "register_flop_formulas",
    "resolve_backend",
    "unavailable_reason",
    "unconvert",
]
