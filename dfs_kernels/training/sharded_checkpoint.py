"""Sharded checkpoints of FSDP runs (``torch.distributed.checkpoint``) and their conversion to a plain one.

An FSDP run saves the folder ``OUT/last.dcp``: the model and optimizer states, every process writing its
own shards (DCP's files, through ``get_state_dict``), and ``trainer.pt``, rank 0's rest of the checkpoint
(the fields of ``last.pt`` but "model" and "optimizer": scheduler, scaler, strategy, RNG states, epoch,
step, config, history). Every process writes into ``OUT/.last.dcp.tmp``, then rank 0 renames the previous
folder away and the new one into place, so a failing or interrupted save keeps the previous checkpoint
(``find_sharded`` also finds it under its temporary name if the process died between the two renames).

``consolidate(folder, path)`` writes the checkpoint a one-process run would have written (``last.pt``'s
format: full tensors, the optimizer state keyed by parameter index), which ``dfs-anytime``, a run without
FSDP and ``torch.load(weights_only=True)`` read; from a shell: ``python -m dfs_kernels.cli.consolidate``.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .checkpoint import REQUIRED_KEYS, load_checkpoint, save_checkpoint

TRAINER_FILE = "trainer.pt"
SHARDED_KEYS = ("model", "optimizer")
"""The fields DCP holds; ``trainer.pt`` holds the other ``REQUIRED_KEYS`` (and the optional fields)."""
TRAINER_KEYS = tuple(key for key in REQUIRED_KEYS if key not in SHARDED_KEYS)


def _temporary(folder: str, suffix: str) -> str:
    head, tail = os.path.split(os.path.abspath(folder))
    return os.path.join(head, f".{tail}.{suffix}")


def find_sharded(folder: str) -> str | None:
    """The sharded checkpoint saved as ``folder`` (or left under its previous name by a save interrupted
    between its renames); None when there is none."""
    for candidate in (folder, _temporary(folder, "old")):
        if os.path.isfile(os.path.join(candidate, TRAINER_FILE)):
            return candidate
    return None


def save_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer, rest: dict) -> None:
    """Saves ``model`` and ``optimizer`` (sharded, every process) and ``rest`` (rank 0's) as ``folder``;
    every process of the default group calls it."""
    temp, old = _temporary(folder, "tmp"), _temporary(folder, "old")
    main = dist.get_rank() == 0
    if main and os.path.exists(temp):  # left by an interrupted save
        shutil.rmtree(temp)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temp)
    if main:  # DCP's save returns on rank 0 once every process's shards and the metadata are written
        save_checkpoint(os.path.join(temp, TRAINER_FILE), rest)
        if os.path.exists(folder):
            os.replace(folder, old)
        os.replace(temp, folder)
        if os.path.exists(old):
            shutil.rmtree(old)
    dist.barrier()


def load_sharded(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Loads ``folder``'s shards into ``model`` and ``optimizer`` (every process; the rest of the
    checkpoint is ``load_checkpoint(folder/trainer.pt, required=TRAINER_KEYS)``). ValueError naming the
    folder when the shards do not fit the model or the optimizer."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:  # DCP's CheckpointException included
        raise ValueError(f"checkpoint {folder} does not match this run's model and optimizer: "
                         f"{type(error).__name__}: {error}") from error


def _indexed_optimizer_state(state: dict) -> dict:
    """An optimizer state keyed by parameter name (``get_state_dict``'s) keyed by index as
    ``Optimizer.state_dict()`` keys it: parameters numbered in the order of the param groups."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    index = {name: position for position, name in enumerate(names)}
    return {"state": {index[name]: values for name, values in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def consolidate(folder: str, path: str) -> None:
    """Writes the sharded checkpoint ``folder`` as one plain checkpoint file ``path`` (see the module
    docstring), atomically. Runs in one process without a process group. ValueError naming the folder
    when it holds no sharded checkpoint."""
    if find_sharded(folder) != folder:
        raise ValueError(f"{folder} holds no sharded checkpoint (no {TRAINER_FILE} in it)")
    rest = load_checkpoint(os.path.join(folder, TRAINER_FILE), required=TRAINER_KEYS)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as scratch:
        full = os.path.join(scratch, "full.pt")
        dcp_to_torch_save(folder, full)
        sharded = torch.load(full, map_location="cpu", weights_only=True)
    save_checkpoint(path, {**rest, "model": sharded["model"],
                           "optimizer": _indexed_optimizer_state(sharded["optimizer"])})


__all__ = ["TRAINER_FILE", "TRAINER_KEYS", "consolidate", "find_sharded", "load_sharded", "save_sharded"]
