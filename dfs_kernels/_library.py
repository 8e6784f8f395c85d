"""Loads the compiled library of dfs_kernels ops (``dfs_kernels/_C``), defensively.

The package must import and keep working where the library was not built (or cannot load): the
``"reference"`` backend needs nothing compiled. In that case one warning says why, and the
``"aten"`` backend, whose glue kernels live in the library, reports itself unavailable.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

NAMESPACE = "dfs_kernels"
_PACKAGE_DIR = Path(__file__).resolve().parent


def _candidates() -> list[Path]:
    explicit = os.environ.get("DFS_KERNELS_LIBRARY")
    if explicit:
        return [Path(explicit)]
    return sorted(_PACKAGE_DIR.glob("_C*.so"))


def _load() -> tuple[bool, str]:
    if os.environ.get("DFS_KERNELS_DISABLE_EXTENSION", "") not in ("", "0"):
        return False, "disabled by DFS_KERNELS_DISABLE_EXTENSION"
    candidates = _candidates()
    if not candidates:
        return False, f"no compiled library (_C*.so) in {_PACKAGE_DIR}"
    errors = []
    for path in candidates:
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as error:  # wrong torch ABI, missing symbols, unreadable file
            errors.append(f"{path.name}: {error}")
            continue
        return True, str(path)
    return False, "; ".join(errors)


LOADED, _DETAIL = _load()
if not LOADED:
    warnings.warn(
        "dfs_kernels: the compiled ops library is not available "
        f"({_DETAIL}); only the 'reference' backend will be used. Build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def library_path() -> str | None:
    """Path of the loaded compiled library, or None when it is not loaded."""
    return _DETAIL if LOADED else None


def load_error() -> str | None:
    """Why the compiled library is not loaded, or None when it is."""
    return None if LOADED else _DETAIL


def _kernel_device_types() -> frozenset[str]:
    if not LOADED:
        return frozenset()
    return frozenset(
        device_type
        for device_type, dispatch_key in (("cpu", "CPU"), ("cuda", "CUDA"))
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::pad_channels", dispatch_key)
    )


# Read once: registrations do not change after load, and a plain set lookup stays traceable by
# torch.compile.
KERNEL_DEVICE_TYPES = _kernel_device_types()


def has_kernels_for(device_type: str) -> bool:
    """Whether the compiled library registered its glue kernels for ``device_type`` ("cpu", "cuda")."""
    return device_type in KERNEL_DEVICE_TYPES


def has_autograd_kernel(qualname: str) -> bool:
    """Whether the compiled library registered op ``qualname``'s autograd in C++ (csrc/autograd/): then
    no Python formula is registered for it (dfs_kernels/ops/). The Triton ops (``triton_``) are defined in
    Python by ``torch.library.triton_op``, whose own Autograd kernel only waits for a Python formula."""
    return (LOADED and not qualname.startswith(f"{NAMESPACE}::triton_")
            and torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Autograd"))


# The "cudnn" backend's ops have CUDA kernels only in a CUDA build where cuDNN was found (CMakeLists.txt).
CUDNN_BACKEND_BUILT = LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
    f"{NAMESPACE}::cudnn_partitioned_conv2d_input_grad", "CUDA"
)
