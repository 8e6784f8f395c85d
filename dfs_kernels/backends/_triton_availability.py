"""Whether the ``"triton"`` backend can run on a device, found without importing triton: on CUDA
when triton is installed; on CPU only under the Triton interpreter (``TRITON_INTERPRET=1`` before
the backend is first used), which is for tests and debugging and never a real choice."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ._errors import BackendUnavailableError

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None  # without importing it
_TRITON_STATE: dict[str, tuple[str | None, bool]] = {}  # device type -> (unavailable reason, interpreted)
_TRUE_STRINGS = ("1", "true", "on", "yes")


def _interpreter_requested() -> bool:
    """Whether the Triton kernels run (or, not yet imported, would run) under the interpreter: fixed
    when dfs_kernels.backends.triton is first imported, as @triton.jit reads TRITON_INTERPRET then."""
    module = sys.modules.get(f"{__package__}.triton")
    if module is not None:
        return bool(module.INTERPRET)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_STRINGS


def triton_state(device_type: str) -> tuple[str | None, bool]:
    # Precomputed for CPU and CUDA (below), so that torch.compile traces a dict lookup.
    if device_type not in _TRITON_STATE:
        _TRITON_STATE[device_type] = _compute_triton_state(device_type)
    return _TRITON_STATE[device_type]


def _compute_triton_state(device_type: str) -> tuple[str | None, bool]:
    """(why the backend cannot run on ``device_type`` or None, whether it runs interpreted), without
    importing triton: a broken install shows when the backend is first used."""
    if not _TRITON_INSTALLED:
        return "triton is not installed (pip install 'dfs_kernels[triton]')", False
    interpreted = _interpreter_requested()
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available", interpreted
        return None, interpreted
    if device_type == "cpu":
        if not interpreted:
            return (
                "Triton kernels run on CPU only under the Triton interpreter (set TRITON_INTERPRET=1 before the "
                "backend is first used; for tests and debugging, it is very slow)"
            ), False
        return None, True
    return f"there are no Triton kernels for {device_type} tensors", interpreted


def import_triton_backend():
    try:
        from . import triton as triton_backend
    except Exception as error:  # a broken or incompatible triton install
        raise BackendUnavailableError(
            f"backend='triton': importing its kernels failed ({type(error).__name__}: {error})"
        ) from error
    # From now on the kernels' mode is fixed: refresh what availability was inferred from the environment.
    for device_type in list(_TRITON_STATE):
        _TRITON_STATE[device_type] = _compute_triton_state(device_type)
    return triton_backend


_TRITON_STATE.update({device_type: _compute_triton_state(device_type) for device_type in ("cpu", "cuda")})


def triton_interpreted(device_type: str) -> bool:
    return triton_state(device_type)[1]
