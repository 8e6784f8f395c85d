"""Backend registry: which implementations of the DFS ops exist, which are available for a device,
and what ``backend="auto"`` picks.

A backend is a namespace with four functions taking validated arguments:
``partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels)``,
``reroute(x, shared_channels)``, ``exit_reference(x, shared_channels)`` and
``exit_avg_pool(x, shared_channels)``.
"""

from __future__ import annotations

import logging
import types

import torch

from .. import _library, reference

logger = logging.getLogger("dfs_kernels")

BACKENDS = ("reference", "aten")
"""Every backend name the package knows, available or not."""

_AUTO_PREFERENCE = ("aten", "reference")


class BackendUnavailableError(ValueError):
    """An explicitly requested backend cannot run here (not built, or not for this device)."""


def _reference_backend() -> types.SimpleNamespace:
    def partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return reference.partitioned_conv2d(
            input, weight, bias, stride, padding, dilation, groups, shared_channels=shared_channels
        )

    return types.SimpleNamespace(
        partitioned_conv2d=partitioned_conv2d,
        reroute=reference.reroute,
        exit_reference=reference.exit_reference,
        exit_avg_pool=reference.exit_avg_pool,
    )


_IMPLEMENTATIONS: dict[str, object] = {}
_AUTO_CHOICES: dict[str, str] = {}  # device type -> backend name, decided once per process


def _implementation(name: str):
    if name not in _IMPLEMENTATIONS:
        if name == "reference":
            _IMPLEMENTATIONS[name] = _reference_backend()
        elif name == "aten":
            from . import aten

            _IMPLEMENTATIONS[name] = aten
        else:
            raise AssertionError(name)
    return _IMPLEMENTATIONS[name]


def unavailable_reason(name: str, device: torch.device | str = "cpu") -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    check_backend_name(name)
    device_type = torch.device(device).type
    if name == "reference":
        return None
    if name == "aten":
        if not _library.LOADED:
            return f"the compiled ops library is not loaded ({_library.load_error()})"
        if not _library.has_kernels_for(device_type):
            return (
                f"the compiled ops library has no {device_type} kernels"
                + (" (built without CUDA: rebuild where nvcc and a CUDA torch are present)" if device_type == "cuda" else "")
            )
        return None
    raise AssertionError(name)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (default CPU), in ``"auto"``'s order of preference."""
    return [name for name in _AUTO_PREFERENCE if unavailable_reason(name, device) is None]


def check_backend_name(backend: object) -> None:
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {list(BACKENDS)}, got {backend!r}")


def _auto_choice(device_type: str) -> str:
    if device_type not in _AUTO_CHOICES:
        choice = available_backends(device_type)[0]
        if not torch.compiler.is_compiling():
            logger.info("backend='auto' chose %r for %s tensors", choice, device_type)
        _AUTO_CHOICES[device_type] = choice
    return _AUTO_CHOICES[device_type]


def resolve_backend(backend: str = "auto", device: torch.device | str = "cpu") -> str:
    """The backend that a call with ``backend`` on ``device`` runs: ``"auto"`` resolved to a name, an
    explicit name checked. Raises ValueError for an unknown name and BackendUnavailableError (a
    ValueError) for a known backend that cannot run on ``device``; an explicit request never falls back.
    """
    check_backend_name(backend)
    device_type = torch.device(device).type
    if backend == "auto":
        return _auto_choice(device_type)
    reason = unavailable_reason(backend, device_type)
    if reason is not None:
        raise BackendUnavailableError(f"backend={backend!r} is not available on {device_type}: {reason}")
    return backend


def implementation(backend: str, device: torch.device | str):
    """The namespace of functions of the backend that ``backend`` resolves to on ``device``."""
    return _implementation(resolve_backend(backend, device))


if _library.LOADED:
    # Registers the autograd formulas and fakes of the compiled ops as soon as the library is loaded,
    # so that torch.ops.dfs_kernels.* called directly (or traced) behave like the backend's calls.
    from . import aten  # noqa: E402,F401
