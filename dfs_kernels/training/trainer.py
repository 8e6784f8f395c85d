"""Training loop for multi-exit networks, on one process or many (``torchrun``): ``train(TrainConfig(...))``.

Per epoch: this rank's batches (``loader.rank_batches``: the global batch is split over the processes),
each through ``strategy.backward``, SGD (momentum 0.9) + MultiStepLR stepped per epoch, then per-exit
accuracy on the val (if any) and test splits, each rank evaluating a shard. Rank 0 writes
``OUT/metrics.json``, ``OUT/metrics.csv`` and, atomically, ``OUT/last.pt``: after each epoch, and every
``checkpoint_every`` steps within one.

Exact resume: ``resume=True`` continues from ``OUT/last.pt``, at an epoch end or mid-epoch. The
checkpoint holds model, optimizer, scheduler, scaler, strategy and RNG states, the step reached and the
partial loss sums; the order of the samples and their augmentation are functions of (seed, epoch,
index) (``loader``), so the steps after the resume see the batches an uninterrupted run sees and (with
deterministic kernels) end with the same weights. A process count change on resume is allowed: the
global batches do not depend on it.

Distributed: ``WORLD_SIZE > 1`` (torchrun) trains with DistributedDataParallel, NCCL on CUDA and Gloo on
CPU; ``batch_size`` is the global batch. BatchNorm statistics are those of the global batch
(``sync_bn``, default on), so W processes train the network one process would on the whole batch.
``fsdp=True`` shards the parameters, gradients and optimizer state over the processes instead
(``sharding.shard_model``: FSDP2 per block; one process is allowed) and checkpoints to the folder
``OUT/last.dcp`` (``sharded_checkpoint``; ``consolidate`` turns it into a ``last.pt``).
``activation_checkpointing=True`` recomputes each backbone block's forward in the backward
(``sharding.checkpoint_blocks``).

Milestones follow the CIFAR recipes (``docs/models.md``) for 300 epochs and are scaled to ``epochs``
otherwise; the augmentation follows the recipe too (``augment.recipe_augmentation``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import BackendUnavailableError, available_backends, unavailable_reason
from ..backends import check_backend_name
from ..models import TOKEN_MODELS, build_model, canonical_model_name, zoo
from ..multi_exit import MultiExitModel, final_logits
from . import STRATEGIES, build_strategy, distributed, sharding
from .augment import Augmentation, recipe_augmentation
from .block_dependent import MULTI_EXIT_REFUSAL
from .checkpoint import (REQUIRED_KEYS, check_writable, load_checkpoint, restore_model, rng_state,
                         save_checkpoint, set_rng_state)
from .data import DATASETS, IN_MEMORY_DATASETS, TOKEN_DATASETS, load_dataset
from .loader import make_source, rank_batches, shard_batches
from .sharded_checkpoint import TRAINER_FILE, TRAINER_KEYS, find_sharded, load_sharded, save_sharded

RECIPE_MILESTONES = {"vgg7": (270, 280, 295), "vgg16": (270, 280, 295)}
DEFAULT_MILESTONES = (250, 280, 295)
RECIPE_WEIGHT_DECAY = {"vgg7": 1e-4, "vgg16": 1e-4}
DEFAULT_WEIGHT_DECAY = 5e-4
RECIPE_EPOCHS = 300
RESUME_KEYS = ("model", "strategy", "dataset", "epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay",
               "milestones", "beta", "flavour", "seed", "synthetic_samples", "strategy_kwargs", "augmentation",
               "sync_bn", "exits", "model_kwargs", "fsdp_mixed_precision")
"""Config fields a resumed run must share with the checkpoint's."""
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = ("sgd", "adamw")
ADAMW_WEIGHT_DECAY = 0.05
FSDP_STRATEGIES = ("dsn", "dfs", "byot")
"""The strategies that train through the model's forward, as FSDP needs: BDL and GD take gradients of the
model's parameters with ``torch.autograd.grad``, which FSDP's sharded parameters do not receive."""


@dataclass
class TrainConfig:
    """Everything a run depends on (stored in the checkpoint and metrics.json).

    model: a registry name (``models.MODELS``) or a library model spec ``torchvision:NAME``, ``timm:NAME``,
        ``hf:NAME`` (``models.zoo``), which ``multi_exit`` puts exits on.
    exits: the module names whose outputs a spec model's exits read (required for a spec, refused otherwise).
    model_kwargs: keyword arguments of a spec model's constructor (Hugging Face: its configuration), e.g. a
        small configuration.
    batch_size: the global batch (split over the processes of a torchrun job).
    flavour: model flavour; None picks "dfs" for the dfs strategy and "dsn" otherwise.
    optimizer: "sgd" (momentum ``momentum``, the CNN recipes) or "adamw" (the transformers' optimizer).
    weight_decay: None takes the recipe's (1e-4 for VGG, 5e-4 otherwise; 0.05 with AdamW).
    milestones: None scales the recipe's to ``epochs``.
    augmentation: one of ``augment.AUGMENTATIONS``; None takes the recipe's for (dataset, model).
    checkpoint_every: also checkpoint every this many steps within an epoch (0: at epoch ends only).
    stop_after: stop (with a checkpoint) after this many finished epochs, as a preempted job would.
    deterministic: ``torch.use_deterministic_algorithms(True)`` for the run.
    sync_bn: BatchNorm over the global batch when several processes train.
    workers: DataLoader workers for folder datasets (ImageNet).
    synthetic_samples: train samples of the "synthetic" dataset (val and test get half).
    fsdp: shard with FSDP2 instead of DistributedDataParallel (strategies ``FSDP_STRATEGIES``).
    fsdp_mixed_precision: "bf16" computes in bfloat16 under FSDP (``sharding.MIXED_PRECISION``).
    activation_checkpointing: recompute the backbone blocks' activations in the backward.
    """

    model: str = "vgg7"
    strategy: str = "dsn"
    dataset: str = "digits"
    data_dir: str | None = None
    out: str = "runs/default"
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    milestones: list[int] | None = None
    beta: float = 0.5
    flavour: str | None = None
    backend: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    augmentation: str | None = None
    seed: int = 0
    device: str | None = None
    resume: bool = False
    checkpoint_every: int = 0
    stop_after: int | None = None
    deterministic: bool = False
    sync_bn: bool = True
    workers: int = 4
    progress: bool = True
    synthetic_samples: int = 64
    fsdp: bool = False
    fsdp_mixed_precision: str = "none"
    activation_checkpointing: bool = False
    strategy_kwargs: dict = field(default_factory=dict)
    exits: list[str] | None = None
    model_kwargs: dict = field(default_factory=dict)


def flavour_of(config: TrainConfig) -> str:
    """The model flavour ``config`` trains: its ``flavour``, else "dfs" for the dfs strategy and "dsn" otherwise."""
    return config.flavour or ("dfs" if config.strategy == "dfs" else "dsn")


def check_config(config: TrainConfig) -> TrainConfig:
    """``config`` with the model's registry name, once every option has been checked against the others and
    against this machine, before any data or model is set up. ValueError for a bad or ignored option (such
    as ``backend`` or ``beta`` with a strategy whose flavour uses no DFS op), ``BackendUnavailableError``
    with what can run here for a backend that cannot; UserWarning for options that have no effect on this run
(dataset options the dataset ignores, ``sync_bn=False`` without several processes)."""
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {config.amp!r}")
    if config.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {config.checkpoint_every}")
    if config.strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose one of {sorted(STRATEGIES)}")
    if config.dataset not in DATASETS:
        raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {list(DATASETS)}")
    if zoo.is_spec(config.model):
        config = _check_spec_model(config)
        reads_tokens = zoo.reads_tokens(config.model)
    else:
        config = dataclasses.replace(config, model=canonical_model_name(config.model))
        if config.exits is not None or config.model_kwargs:
            raise ValueError(f"exits and model_kwargs apply to library models (torchvision:, timm:, hf:); the "
                             f"package's model {config.model!r} has its exits built in")
        reads_tokens = config.model in TOKEN_MODELS
    if (config.dataset in TOKEN_DATASETS) != reads_tokens:
        raise ValueError(f"dataset {config.dataset!r} and model {config.model!r} do not fit: token-id datasets "
                         f"{list(TOKEN_DATASETS)} go with the models that embed ids ({list(TOKEN_MODELS)} and "
                         "Hugging Face text models)")
    check_backend_name(config.backend)
    flavour = flavour_of(config)
    if flavour != "dfs" and config.backend != "auto":
        raise ValueError(f"backend {config.backend!r} has no effect: strategy {config.strategy!r} trains the "
                         f"{flavour!r} flavour, which runs no DFS op (only the 'dfs' flavour does: strategy 'dfs')")
    if flavour == "dsn" and config.beta != TrainConfig.beta:
        raise ValueError(f"beta {config.beta} has no effect: strategy {config.strategy!r} trains the 'dsn' "
                         "flavour, which shares no channels (strategy 'dfs' does)")
    if config.data_dir is not None and config.dataset in IN_MEMORY_DATASETS:
        warnings.warn(f"data_dir is ignored: dataset {config.dataset!r} is not read from files", stacklevel=2)
    if config.synthetic_samples != TrainConfig.synthetic_samples and not config.dataset.startswith("synthetic"):
        warnings.warn(f"synthetic_samples is ignored by dataset {config.dataset!r}", stacklevel=2)
    if config.workers != TrainConfig.workers and config.dataset != "imagenet":
        warnings.warn(f"workers is ignored: dataset {config.dataset!r} is batched in memory (only imagenet uses "
                      "loader workers)", stacklevel=2)
    _check_scaling(config)
    if not config.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        warnings.warn("sync_bn=False has no effect in a one-process run (no torchrun)", stacklevel=2)
    device = distributed.check_device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if flavour == "dfs" and config.backend != "auto":
        reason = unavailable_reason(config.backend, device)
        if reason is not None:
            runnable = ", ".join(repr(name) for name in ["auto", *available_backends(device)])
            raise BackendUnavailableError(f"backend {config.backend!r} cannot run on {device.type}: {reason}. "
                                          f"On this machine use one of {runnable}")
    return config


def _check_spec_model(config: TrainConfig) -> TrainConfig:
    """``config`` with ``exits`` as a list; ValueError naming the field for what a library model spec cannot
    take."""
    exits = config.exits
    if not exits or isinstance(exits, str) or not all(isinstance(name, str) and name for name in exits):
        raise ValueError(f"exits must list the module names whose outputs the exits of {config.model!r} read "
                         f"(e.g. ['layer1', 'layer2', 'layer3'] for torchvision:resnet18), got {exits!r}")
    if not isinstance(config.model_kwargs, dict):
        raise ValueError(f"model_kwargs must be a dict of keyword arguments, got {config.model_kwargs!r}")
    if config.strategy == "bdl":
        raise ValueError(MULTI_EXIT_REFUSAL)
    zoo.parse_spec(config.model)
    return dataclasses.replace(config, exits=list(exits))


def num_exits(model: torch.nn.Module) -> int:
    """The number of outputs of ``model``: its exits and, for a ``MultiExitModel``, the model's own."""
    return len(model.exits) + 1 if isinstance(model, MultiExitModel) else len(model.exit_modules())


def _check_scaling(config: TrainConfig) -> None:
    """ValueError for FSDP and activation-checkpointing options that cannot work together with the others."""
    if config.fsdp_mixed_precision not in sharding.MIXED_PRECISION:
        raise ValueError(f"fsdp_mixed_precision must be one of {list(sharding.MIXED_PRECISION)}, "
                         f"got {config.fsdp_mixed_precision!r}")
    if not config.fsdp:
        if config.fsdp_mixed_precision != "none":
            raise ValueError(f"fsdp_mixed_precision {config.fsdp_mixed_precision!r} needs fsdp (use --amp "
                             "without FSDP)")
    elif config.strategy not in FSDP_STRATEGIES:
        raise ValueError(f"fsdp supports the strategies {list(FSDP_STRATEGIES)}, not {config.strategy!r}: it "
                         "takes gradients of the model's parameters with torch.autograd.grad, which FSDP's "
                         "sharded parameters do not receive (train it without fsdp)")
    elif config.amp == "fp16":
        raise ValueError("amp 'fp16' is not supported with fsdp (its gradient scaler would skip steps per "
                         "process); use fsdp_mixed_precision 'bf16' or amp 'bf16'")
    elif config.compile:
        raise ValueError("compile is not supported with fsdp in this trainer; train one of them")
    if config.activation_checkpointing and not zoo.is_spec(config.model):
        with torch.device("meta"):  # the architecture only: no memory, no initialization
            sharding.check_checkpointable(build_model(config.model, num_classes=2, flavour="dsn"))


def scaled_milestones(model: str, epochs: int) -> list[int]:
    """The recipe's lr milestones for ``model``, scaled from 300 epochs to ``epochs`` (kept >= 1, distinct)."""
    recipe = RECIPE_MILESTONES.get(model, DEFAULT_MILESTONES)
    if epochs == RECIPE_EPOCHS:
        return list(recipe)
    return sorted({max(1, round(m * epochs / RECIPE_EPOCHS)) for m in recipe})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int, device, amp_dtype=None, channels_last: bool = False,
             job: distributed.Distributed = distributed.Distributed(), workers: int = 0,
             lockstep: bool = False) -> list[float]:
    """Per-exit top-1 accuracy (%) of ``model`` on ``dataset``, each rank of ``job`` taking a shard (eval
    mode; the caller restores train()). ``lockstep``: every rank runs as many forwards (a model whose
    forward is a collective, as FSDP's parameter gathering is; the extra ones repeat a sample and are not
    counted)."""
    model.eval()
    source = make_source(dataset, Augmentation("none", (0.0,), (1.0,)), seed=0, workers=workers)
    batches = shard_batches(len(source), batch_size, job.rank, job.world_size)
    counted = len(batches)
    if lockstep:  # rank 0's shard is the largest
        batches += [[0]] * (len(shard_batches(len(source), batch_size, 0, job.world_size)) - counted)
    correct = torch.zeros(num_exits(model), dtype=torch.long, device=device)
    for index, (images, labels) in enumerate(source.iterate(batches, 0, device)):
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits[-1] = final_logits(logits[-1])  # a library model's own output (e.g. a Hugging Face ModelOutput)
        if index < counted:
            correct += torch.stack([(z.argmax(1) == labels).sum() for z in logits])
    correct = job.sum(correct)
    return (100.0 * correct.double() / max(len(dataset), 1)).tolist()


def _write_metrics(out: str, config: TrainConfig, history: list[dict]) -> None:
    with open(os.path.join(out, "metrics.json.tmp"), "w") as handle:
        json.dump({"config": asdict(config), "epochs": history}, handle, indent=2)
    os.replace(os.path.join(out, "metrics.json.tmp"), os.path.join(out, "metrics.json"))
    if not history:
        return
    num_exits = len(history[0]["test_acc"])
    columns = ["epoch", "lr", "loss", "seconds"]
    columns += [f"train_loss_{k + 1}" for k in range(num_exits)]
    columns += [f"val_acc_{k + 1}" for k in range(num_exits)] if history[0]["val_acc"] else []
    columns += [f"test_acc_{k + 1}" for k in range(num_exits)]
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in history:
            writer.writerow([row["epoch"], row["lr"], row["loss"], row["seconds"], *row["train_loss"],
                             *row["val_acc"], *row["test_acc"]])


@dataclass
class _Run:
    """The live objects of a run; ``runner`` is what strategies call (DDP / compile wrappers around model)."""

    model: torch.nn.Module
    runner: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    strategy: object

    def state(self, config: TrainConfig, *, epoch: int, step: int, loss_sums, history: list[dict]) -> dict:
        """The checkpoint; without "model" and "optimizer" under FSDP, whose shards DCP saves."""
        state = {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "strategy": self.strategy.state_dict(), "rng": rng_state(), "epoch": epoch, "step": step,
                 "loss_sums": loss_sums, "config": asdict(config), "history": history}
        if not config.fsdp:
            state.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
        return state


def _build(config: TrainConfig, num_classes: int, device: torch.device, job: distributed.Distributed,
           example: torch.Tensor | None) -> _Run:
    """The run's objects; ``example`` is a batch of inputs, on which ``multi_exit`` finds a spec model's exit
    points (None for the package's models)."""
    if zoo.is_spec(config.model):
        model = zoo.build_multi_exit(config.model, config.exits, num_classes=num_classes,
                                     model_kwargs=config.model_kwargs, flavour=flavour_of(config), beta=config.beta,
                                     backend=config.backend, example_input=example)
    else:
        model = build_model(config.model, num_classes=num_classes, flavour=flavour_of(config), beta=config.beta,
                            backend=config.backend)
    if job.enabled and config.sync_bn:
        model = distributed.synchronize_batch_norm(model, device)
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if config.activation_checkpointing:
        sharding.checkpoint_blocks(model)
    if config.fsdp:  # before the optimizer, which must hold the sharded parameters
        sharding.shard_model(model, config.fsdp_mixed_precision)
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {config.optimizer!r}")
    recipe_decay = ADAMW_WEIGHT_DECAY if config.optimizer == "adamw" else RECIPE_WEIGHT_DECAY.get(
        config.model, DEFAULT_WEIGHT_DECAY)
    weight_decay = config.weight_decay if config.weight_decay is not None else recipe_decay
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                    weight_decay=weight_decay)
    milestones = config.milestones or scaled_milestones(config.model, config.epochs)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    strategy = build_strategy(config.strategy, **config.strategy_kwargs)
    return _Run(model, model, optimizer, scheduler, scaler, strategy)


def _kind(value) -> str:
    for kind, types in (("a number", (int, float)), ("a dict", dict), ("a list", (list, tuple)),
                        ("a tensor", torch.Tensor), ("a string", str)):
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _check_like(saved: dict, fresh: dict) -> None:
    """TypeError unless ``saved`` has the keys of ``fresh`` (a state_dict of this run) with values of the
    same kind: some ``load_state_dict``s store whatever they get and fail steps later."""
    if set(saved) != set(fresh):
        raise TypeError(f"keys {sorted(saved)}, expected {sorted(fresh)}")
    for key, value in fresh.items():
        if value is not None and saved[key] is not None and _kind(saved[key]) != _kind(value):
            raise TypeError(f"{key!r} is {_kind(saved[key])}, expected {_kind(value)}")


HISTORY_KEYS = ("epoch", "lr", "loss", "seconds", "train_loss", "val_acc", "test_acc")
"""The fields of an epoch's record (``train``'s return value, metrics.json and the checkpoint's history)."""


def _check_history(history: list, exits: int, path: str) -> None:
    """ValueError naming ``path`` and the field unless every record of ``history`` has ``HISTORY_KEYS`` and
    one train loss and test accuracy per exit: metrics.csv is written from them after the next epoch."""
    for index, record in enumerate(history):
        field = f"history.{index}"
        if not isinstance(record, dict) or not set(HISTORY_KEYS) <= record.keys():
            shown = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"checkpoint {path}: field {field!r} must be a dict with keys {list(HISTORY_KEYS)}, "
                             f"got {shown}")
        for key in ("train_loss", "test_acc"):
            values = record[key]
            if not isinstance(values, list) or len(values) != exits:
                shown = len(values) if isinstance(values, list) else type(values).__name__
                raise ValueError(f"checkpoint {path}: field '{field}.{key}' must be a list of {exits} numbers "
                                 f"(one per exit), got {shown}")


def _check_optimizer_state(optimizer: torch.optim.Optimizer, path: str) -> None:
    """ValueError naming ``path`` and the field for a per-parameter optimizer tensor (momentum buffer, Adam
    moments) whose shape is not its parameter's: ``load_state_dict`` takes it, the first step would fail."""
    index = 0
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            for key, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise ValueError(f"checkpoint {path}: field 'optimizer.state.{index}.{key}' must have the shape "
                                     f"{list(parameter.shape)} of parameter {index}, got {list(value.shape)}")
            index += 1


def _resume(run: _Run, config: TrainConfig, path: str, device: torch.device,
            steps_per_epoch: int) -> tuple[int, int, object, list]:
    """Loads ``path`` (``last.pt``, or the ``last.dcp`` folder under FSDP) into ``run``; returns (epoch, step,
    partial loss sums, history) to continue from. ValueError naming the file and the field for a
    checkpoint that does not fit this run."""
    folder = path if config.fsdp else None
    if folder is not None:
        path = os.path.join(folder, TRAINER_FILE)
    state = load_checkpoint(path, map_location=device, required=TRAINER_KEYS if folder else REQUIRED_KEYS)
    # checkpoints from before the optimizer, exits, model_kwargs and FSDP options
    saved = {"optimizer": "sgd", "exits": None, "model_kwargs": {}, "fsdp_mixed_precision": "none", **state["config"]}
    changed = [key for key in RESUME_KEYS if saved.get(key) != getattr(config, key)]
    if changed:
        raise ValueError(f"checkpoint {path} was written by a different run: {changed} differ "
                         f"({[saved.get(key) for key in changed]} there); use another --out")
    epoch, step, history = state["epoch"], state["step"], list(state.get("history", []))
    if epoch > config.epochs:
        raise ValueError(f"checkpoint {path}: field 'epoch' is {epoch}, past the run's {config.epochs} epochs")
    if step >= steps_per_epoch:
        raise ValueError(f"checkpoint {path}: field 'step' is {step}, past the end of an epoch of "
                         f"{steps_per_epoch} steps")
    if len(history) != epoch:
        raise ValueError(f"checkpoint {path}: field 'history' has {len(history)} epochs, field 'epoch' says {epoch}")
    exits = num_exits(run.model)
    _check_history(history, exits, path)
    loss_sums = state.get("loss_sums")
    if step > 0 and (loss_sums is None or loss_sums.shape != (exits,)):
        raise ValueError(f"checkpoint {path}: field 'loss_sums' must be a tensor [{exits}] (one sum per exit) "
                         f"mid-epoch, got {None if loss_sums is None else list(loss_sums.shape)}")
    targets = [("scheduler", run.scheduler), ("scaler", run.scaler), ("strategy", run.strategy)]
    if folder is not None:
        load_sharded(folder, run.model, run.optimizer)
    else:
        restore_model(run.model, state["model"], path)
        targets.insert(0, ("optimizer", run.optimizer))
    for field, target in targets:
        try:
            _check_like(state.get(field, {}), target.state_dict())
            target.load_state_dict(state.get(field, {}))
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as error:
            raise ValueError(f"checkpoint {path}: field {field!r} does not match this run: "
                             f"{type(error).__name__}: {error}") from error
    if folder is None:  # DCP checks the shards' shapes
        _check_optimizer_state(run.optimizer, path)
    try:
        set_rng_state(state["rng"])
    except (ValueError, RuntimeError, TypeError, OverflowError) as error:
        raise ValueError(f"checkpoint {path}: field 'rng' cannot be restored: {error}") from error
    return epoch, step, loss_sums, history


def _checkpoint_to_resume(config: TrainConfig, path: str) -> str | None:
    """The checkpoint a resumed run continues from (``path``, or where an interrupted sharded save left it);
    None when there is none. ValueError when the run folder holds only a checkpoint of the other kind."""
    found = find_sharded(path) if config.fsdp else (path if os.path.exists(path) else None)
    other = os.path.join(config.out, "last.pt" if config.fsdp else "last.dcp")
    if found is None and os.path.exists(other):
        raise ValueError(f"cannot resume from {other}: it was written {'without' if config.fsdp else 'with'} fsdp "
                         f"and this run {'uses' if config.fsdp else 'does not use'} it"
                         + (" (dfs_kernels.cli.consolidate turns it into a last.pt)" if not config.fsdp else ""))
    return found


def train(config: TrainConfig, on_epoch=None, on_step=None) -> dict:
    """Runs (or resumes) ``config``. ``on_epoch(record)`` is called on rank 0 after each epoch,
    ``on_step(epoch, step)`` on every rank after each step (and its checkpoint, if one is due). Returns
    ``{"config": ..., "epochs": [per-epoch records]}``, as written to metrics.json. A record holds
    epoch, lr, loss, seconds, train_loss (per exit, mean over batches), val_acc and test_acc (per exit, %)."""
    config = check_config(config)
    started_group = not torch.distributed.is_initialized()
    job, device = distributed.setup(config.device, always_group=config.fsdp)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(config.deterministic or was_deterministic)
    try:
        return _train(config, job, device, on_epoch, on_step)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        if started_group:
            distributed.teardown()


def _train(config: TrainConfig, job: distributed.Distributed, device: torch.device, on_epoch, on_step) -> dict:
    checkpoint_path = os.path.join(config.out, "last.dcp" if config.fsdp else "last.pt")
    if job.is_main:
        check_writable(config.out)  # before any work: a run must not learn this at its first checkpoint
    _seed_everything(config.seed)
    splits = load_dataset(config.dataset, config.data_dir, seed=config.seed,
                          synthetic_samples=config.synthetic_samples)
    augmentation = Augmentation(config.augmentation or recipe_augmentation(config.dataset, config.model),
                                splits.mean, splits.std)
    source = make_source(splits.train, augmentation, seed=config.seed, workers=config.workers)
    example = next(iter(source.iterate([[0, 1]], 0, torch.device("cpu"))))[0] if zoo.is_spec(config.model) else None
    run = _build(config, splits.num_classes, device, job, example)
    start_epoch, start_step, resumed_sums, history = 0, 0, None, []
    resume_from = _checkpoint_to_resume(config, checkpoint_path) if config.resume else None
    if resume_from is not None:
        steps_per_epoch = len(rank_batches(len(source), config.batch_size, epoch=0, seed=config.seed,
                                           rank=job.rank, world_size=job.world_size))
        start_epoch, start_step, resumed_sums, history = _resume(run, config, resume_from, device,
                                                                 steps_per_epoch)
    if job.enabled and not config.fsdp:
        run.runner = DistributedDataParallel(run.model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        run.runner = torch.compile(run.runner)
    amp_dtype = AMP_DTYPES[config.amp]

    def checkpoint(epoch: int, step: int, loss_sums) -> None:
        state = run.state(config, epoch=epoch, step=step, loss_sums=loss_sums, history=history)
        if config.fsdp:  # every process writes its shards
            save_sharded(checkpoint_path, run.model, run.optimizer, state)
        elif job.is_main:
            save_checkpoint(checkpoint_path, state)

    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        run.model.train()
        batches = rank_batches(len(source), config.batch_size, epoch=epoch, seed=config.seed, rank=job.rank,
                               world_size=job.world_size)
        first = start_step if epoch == start_epoch else 0
        loss_sums = resumed_sums if epoch == start_epoch else None
        progress = tqdm(total=len(batches), initial=first, desc=f"epoch {epoch + 1}/{config.epochs}",
                        disable=not (config.progress and job.is_main), leave=False)
        for step, (images, labels) in enumerate(source.iterate(batches[first:], epoch, device), start=first):
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            run.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                result = run.strategy.backward(run.runner, images, labels,
                                               scaler=run.scaler if run.scaler.is_enabled() else None)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            terms = torch.stack(result.exit_losses).float()
            loss_sums = terms if loss_sums is None else loss_sums + terms
            progress.update(1)
            if config.progress and job.is_main:
                progress.set_postfix(loss=f"{result.loss.item():.3f}")
            done = step + 1
            if config.checkpoint_every and done % config.checkpoint_every == 0 and done < len(batches):
                checkpoint(epoch, done, job.mean(loss_sums))
            if on_step is not None:
                on_step(epoch, done)
        progress.close()
        lr = run.optimizer.param_groups[0]["lr"]
        run.scheduler.step()
        eval_args = dict(batch_size=max(config.batch_size // job.world_size, 256), device=device,
                         amp_dtype=amp_dtype, channels_last=config.channels_last, job=job, workers=config.workers,
                         lockstep=config.fsdp)
        # the bare model: in eval mode no layer talks to other ranks, and DDP's per-forward buffer
        # broadcast would deadlock ranks whose shards have different batch counts (FSDP's forward gathers
        # parameters: its ranks run in lockstep)
        val_acc = evaluate(run.model, splits.val, **eval_args) if len(splits.val) else []
        test_acc = evaluate(run.model, splits.test, **eval_args)
        train_loss = (job.mean(loss_sums) / len(batches)).tolist()
        record = {"epoch": epoch + 1, "lr": lr, "loss": sum(train_loss), "seconds": time.perf_counter() - started,
                  "train_loss": train_loss, "val_acc": val_acc, "test_acc": test_acc}
        history.append(record)
        checkpoint(epoch + 1, 0, None)
        if job.is_main:
            _write_metrics(config.out, config, history)
            if on_epoch is not None:
                on_epoch(record)
    if job.is_main:
        _write_metrics(config.out, config, history)
    return {"config": asdict(config), "epochs": history}
