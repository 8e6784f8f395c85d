"""Atomic training checkpoints loadable with ``torch.load(weights_only=True)``.

``save_checkpoint(path, state)`` writes a temporary file in the same directory and ``os.replace``s it
over ``path``, so a failing save leaves the previous checkpoint intact. ``load_checkpoint(path)``
raises ``ValueError`` naming the file when it is unreadable or lacks ``REQUIRED_KEYS``;
``restore_model`` does the same for a model state that does not match the model.
``rng_state()`` / ``set_rng_state()`` capture torch (CPU, CUDA), python ``random`` and numpy RNGs as
tensors and plain types.
"""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch
from torch import nn

REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step", "config")
"""What the trainer stores: epoch is the number of finished epochs, step the batches done in the next."""


def save_checkpoint(path: str, state: dict) -> None:
    """Atomically writes ``state`` to ``path`` (temp file in the same directory, fsync, ``os.replace``)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def load_checkpoint(path: str, map_location="cpu", required=REQUIRED_KEYS) -> dict:
    """The state saved at ``path`` (``weights_only=True``); ValueError naming the file when it is corrupt,
    not a dict, or misses one of ``required``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated / foreign / unsafe files
        raise ValueError(f"cannot load checkpoint {path}: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [key for key in required if key not in state]
    if missing:
        raise ValueError(f"checkpoint {path} misses keys {missing}")
    return state


def restore_model(model: nn.Module, state_dict: dict, path: str) -> None:
    """``model.load_state_dict(state_dict)`` (strict), as a ValueError naming ``path`` on mismatch."""
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {path} does not match the model: {error}") from error


def rng_state() -> dict:
    """The torch CPU, CUDA (all devices), python ``random`` and numpy global RNG states as tensors/plain types."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: dict) -> None:
    """Restores what ``rng_state()`` captured (CUDA states only when CUDA is available)."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
