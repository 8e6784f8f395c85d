"""Atomic training checkpoints loadable with ``torch.load(weights_only=True)``.

``save_checkpoint(path, state)`` writes a temporary file in the same directory and ``os.replace``s it
over ``path``, so a failing save leaves the previous checkpoint intact. ``load_checkpoint(path)``
raises ``ValueError`` naming the file and the field when it is unreadable, lacks ``REQUIRED_KEYS`` or
holds a field of the wrong type or value (``FIELD_TYPES``, and the RNG states field by field);
``restore_model`` does the same for a model state that does not match the model.
``rng_state()`` / ``set_rng_state()`` capture torch (CPU, CUDA), python ``random`` and numpy RNGs as
tensors and plain types. ``check_writable(folder)`` fails early where checkpoints could not be written.
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
FIELD_TYPES = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "strategy": dict, "rng": dict,
               "epoch": int, "step": int, "config": dict, "history": list, "loss_sums": (torch.Tensor, type(None))}
"""The type of each field a checkpoint may hold."""
PYTHON_RNG_WORDS = 625  # random.getstate(): 624 Mersenne Twister words and the position
NUMPY_RNG_WORDS = 624


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
    check_fields(state, path)
    return state


def _field_error(path: str, field: str, expected: str, value) -> ValueError:
    shown = f"{type(value).__name__} {value!r}" if not isinstance(value, torch.Tensor) else (
        f"tensor {value.dtype} {list(value.shape)}")
    return ValueError(f"checkpoint {path}: field {field!r} must be {expected}, got {shown[:200]}")


def _check(condition: bool, path: str, field: str, expected: str, value) -> None:
    if not condition:
        raise _field_error(path, field, expected, value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(state: dict, path: str) -> None:
    """ValueError naming ``path`` and the field for each present field of the wrong type (``FIELD_TYPES``),
    a negative epoch or step, a model state that is not tensors, or a malformed ``rng``."""
    for field, kind in FIELD_TYPES.items():
        if field not in state:
            continue
        value = state[field]
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        article = "an" if names[0] in "aeiou" else "a"
        _check(isinstance(value, kind) and not isinstance(value, bool), path, field, f"{article} {names}", value)
        if kind is int:
            _check(value >= 0, path, field, "a non-negative int", value)
    for name, tensor in state.get("model", {}).items():
        _check(isinstance(tensor, torch.Tensor), path, f"model.{name}", "a tensor", tensor)
    if "rng" in state:
        check_rng_state(state["rng"], path)


def check_rng_state(state: dict, path: str) -> None:
    """ValueError naming ``path`` and the field unless ``state`` has the structure ``rng_state()`` returns."""
    for key in ("torch", "cuda", "python", "numpy"):
        _check(key in state, path, f"rng.{key}", "present", None)
    torch_state = state["torch"]
    expected = torch.get_rng_state()
    _check(isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
           and torch_state.shape == expected.shape, path, "rng.torch",
           f"a uint8 tensor {list(expected.shape)} (torch.get_rng_state())", torch_state)
    cuda = state["cuda"]
    _check(isinstance(cuda, list) and all(isinstance(s, torch.Tensor) and s.dtype == torch.uint8 for s in cuda),
           path, "rng.cuda", "a list of uint8 tensors", cuda)
    python, numpy_state = state["python"], state["numpy"]
    _check(isinstance(python, dict) and {"version", "state", "gauss"} <= python.keys(), path, "rng.python",
           "a dict with version, state, gauss", python)
    _check(_is_int(python["version"]), path, "rng.python.version", "an int", python["version"])
    words = python["state"]
    _check(isinstance(words, torch.Tensor) and words.dtype == torch.int64 and words.shape == (PYTHON_RNG_WORDS,),
           path, "rng.python.state", f"an int64 tensor [{PYTHON_RNG_WORDS}]", words)
    _check(python["gauss"] is None or isinstance(python["gauss"], float), path, "rng.python.gauss",
           "None or a float", python["gauss"])
    _check(isinstance(numpy_state, dict) and {"kind", "keys", "pos", "has_gauss", "cached"} <= numpy_state.keys(),
           path, "rng.numpy", "a dict with kind, keys, pos, has_gauss, cached", numpy_state)
    _check(numpy_state["kind"] == "MT19937", path, "rng.numpy.kind", "'MT19937'", numpy_state["kind"])
    keys = numpy_state["keys"]
    _check(isinstance(keys, torch.Tensor) and keys.dtype == torch.int64 and keys.shape == (NUMPY_RNG_WORDS,),
           path, "rng.numpy.keys", f"an int64 tensor [{NUMPY_RNG_WORDS}]", keys)
    pos = numpy_state["pos"]
    _check(_is_int(pos) and 0 <= pos <= NUMPY_RNG_WORDS, path, "rng.numpy.pos", f"an int in [0, {NUMPY_RNG_WORDS}]",
           pos)
    _check(numpy_state["has_gauss"] in (0, 1), path, "rng.numpy.has_gauss", "0 or 1", numpy_state["has_gauss"])
    _check(isinstance(numpy_state["cached"], float), path, "rng.numpy.cached", "a float", numpy_state["cached"])


def check_writable(folder: str) -> None:
    """Creates ``folder`` if needed and writes (then removes) a file in it; ``PermissionError`` naming the
    folder when that fails, so a run learns before training that it could not save its checkpoints."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise PermissionError(f"cannot write checkpoints and metrics to {folder!r}: {error}") from error


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
    """Restores what ``rng_state()`` captured (CUDA states only when CUDA is available); check it first
    with ``check_rng_state``."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
