"""Single-process training loop for multi-exit networks: ``train(TrainConfig(...)) -> metrics``.

Per epoch: one pass over the (shuffled, augmented) train split through ``strategy.backward``, SGD
(momentum 0.9) + MultiStepLR stepped per epoch, then per-exit accuracy on the val (if any) and test
splits. Writes ``OUT/metrics.json``, ``OUT/metrics.csv`` and, atomically, ``OUT/last.pt`` after each
epoch. ``resume=True`` continues from ``OUT/last.pt`` exactly: the shuffling/augmentation generator,
the global RNGs, model, optimizer, scheduler and scaler states are all checkpointed, so (with
deterministic kernels) the final weights equal those of an uninterrupted run.

Milestones follow the CIFAR recipes (``MODELS.md``) for 300 epochs and are scaled to ``epochs``
otherwise. Distributed training (WORLD_SIZE > 1) is not implemented.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models import build_model
from . import build_strategy
from .checkpoint import load_checkpoint, restore_model, rng_state, save_checkpoint, set_rng_state
from .data import augment, load_dataset

RECIPE_MILESTONES = {"vgg7": (270, 280, 295), "vgg16": (270, 280, 295)}
DEFAULT_MILESTONES = (250, 280, 295)
RECIPE_WEIGHT_DECAY = {"vgg7": 1e-4, "vgg16": 1e-4}
DEFAULT_WEIGHT_DECAY = 5e-4
RECIPE_EPOCHS = 300
RESUME_KEYS = ("model", "strategy", "dataset", "epochs", "batch_size", "lr", "momentum", "weight_decay",
               "milestones", "beta", "flavour", "seed", "synthetic_samples", "strategy_kwargs")
"""Config fields a resumed run must share with the checkpoint's."""
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """Everything a run depends on (stored in the checkpoint and metrics.json).

    flavour: model flavour; None picks "dfs" for the dfs strategy and "dsn" otherwise.
    weight_decay: None takes the recipe's (1e-4 for VGG, 5e-4 otherwise).
    milestones: None scales the recipe's to ``epochs``.
    stop_after: stop (with a checkpoint) after this many finished epochs, as a preempted job would.
    deterministic: ``torch.use_deterministic_algorithms(True)``.
    synthetic_samples: train samples of the "synthetic" dataset (val and test get half).
    """

    model: str = "vgg7"
    strategy: str = "dsn"
    dataset: str = "digits"
    data_dir: str | None = None
    out: str = "runs/default"
    epochs: int = 300
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    milestones: list[int] | None = None
    beta: float = 0.5
    flavour: str | None = None
    backend: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    device: str | None = None
    resume: bool = False
    stop_after: int | None = None
    deterministic: bool = False
    progress: bool = True
    synthetic_samples: int = 64
    strategy_kwargs: dict = field(default_factory=dict)


def scaled_milestones(model: str, epochs: int) -> list[int]:
    """The recipe's lr milestones for ``model``, scaled from 300 epochs to ``epochs`` (kept >= 1, distinct)."""
    recipe = RECIPE_MILESTONES.get(model, DEFAULT_MILESTONES)
    if epochs == RECIPE_EPOCHS:
        return list(recipe)
    return sorted({max(1, round(m * epochs / RECIPE_EPOCHS)) for m in recipe})


def _check_single_process() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError("distributed (WORLD_SIZE > 1) training is not implemented; run one process")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(model, dataset, *, batch_size: int, device, amp_dtype, channels_last: bool) -> list[float]:
    """Per-exit top-1 accuracy (%) of ``model`` on ``dataset`` (eval mode; the caller restores train())."""
    images_all, labels_all = dataset.tensors
    model.eval()
    correct = None
    for start in range(0, len(labels_all), batch_size):
        images = images_all[start:start + batch_size].to(device, non_blocking=True)
        labels = labels_all[start:start + batch_size].to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        hits = torch.stack([(z.argmax(1) == labels).sum() for z in logits])
        correct = hits if correct is None else correct + hits
    return (100.0 * correct.double() / max(len(labels_all), 1)).tolist()


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


def train(config: TrainConfig, on_epoch=None) -> dict:
    """Runs (or resumes) ``config``; ``on_epoch(record)`` is called after each epoch. Returns
    ``{"config": ..., "epochs": [per-epoch records]}``, as written to metrics.json. A record holds
    epoch, lr, loss, seconds, train_loss (per exit, mean over batches), val_acc and test_acc (per exit, %)."""
    _check_single_process()
    if config.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {config.amp!r}")
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    os.makedirs(config.out, exist_ok=True)
    checkpoint_path = os.path.join(config.out, "last.pt")
    _seed_everything(config.seed)

    splits = load_dataset(config.dataset, config.data_dir, seed=config.seed,
                          synthetic_samples=config.synthetic_samples)
    flavour = config.flavour or ("dfs" if config.strategy == "dfs" else "dsn")
    model = build_model(config.model, num_classes=splits.num_classes, flavour=flavour, beta=config.beta,
                        backend=config.backend).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    strategy = build_strategy(config.strategy, **config.strategy_kwargs)
    weight_decay = config.weight_decay if config.weight_decay is not None else RECIPE_WEIGHT_DECAY.get(
        config.model, DEFAULT_WEIGHT_DECAY)
    milestones = config.milestones or scaled_milestones(config.model, config.epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    amp_dtype = AMP_DTYPES[config.amp]
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    generator = torch.Generator().manual_seed(config.seed)  # shuffling + augmentation
    history: list[dict] = []
    start_epoch = 0

    if config.resume and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path, map_location=device)
        restore_model(model, state["model"], checkpoint_path)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            generator.set_state(state["generator"])
        except (KeyError, ValueError, RuntimeError) as error:
            raise ValueError(f"checkpoint {checkpoint_path} does not match this run: {error}") from error
        saved = state["config"]
        changed = [key for key in RESUME_KEYS if saved.get(key) != getattr(config, key)]
        if changed:
            raise ValueError(f"checkpoint {checkpoint_path} was written by a different run: {changed} differ "
                             f"({[saved.get(key) for key in changed]} there); use another --out")
        set_rng_state(state["rng"])
        if state["step"] != 0:
            raise ValueError(f"checkpoint {checkpoint_path} was saved mid-epoch; only epoch ends are resumable")
        start_epoch = state["epoch"]
        history = list(state.get("history", []))

    runner = torch.compile(model) if config.compile else model
    images_all, labels_all = splits.train.tensors
    num_train = len(labels_all)
    last_epoch = config.epochs if config.stop_after is None else min(config.epochs, config.stop_after)
    for epoch in range(start_epoch, last_epoch):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(num_train, generator=generator)
        batches = [order[i:i + config.batch_size] for i in range(0, num_train, config.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs > 1 sample
            batches.pop()
        loss_sums = None
        progress = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not config.progress,
                        leave=False)
        for index in progress:
            images = augment(images_all[index], splits.augmentation, generator).to(device, non_blocking=True)
            labels = labels_all[index].to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                result = strategy.backward(runner, images, labels,
                                           scaler=scaler if scaler.is_enabled() else None)
            scaler.step(optimizer)
            scaler.update()
            terms = torch.stack(result.exit_losses).float()
            loss_sums = terms if loss_sums is None else loss_sums + terms
            if config.progress:
                progress.set_postfix(loss=f"{result.loss.item():.3f}")
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        eval_args = dict(batch_size=max(config.batch_size, 256), device=device, amp_dtype=amp_dtype,
                         channels_last=config.channels_last)
        val_acc = evaluate(runner, splits.val, **eval_args) if len(splits.val) else []
        test_acc = evaluate(runner, splits.test, **eval_args)
        train_loss = (loss_sums / len(batches)).tolist()
        record = {"epoch": epoch + 1, "lr": lr, "loss": sum(train_loss), "seconds": time.perf_counter() - started,
                  "train_loss": train_loss, "val_acc": val_acc, "test_acc": test_acc}
        history.append(record)
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
            "generator": generator.get_state(), "epoch": epoch + 1, "step": 0, "config": asdict(config),
            "history": history,
        })
        _write_metrics(config.out, config, history)
        if on_epoch is not None:
            on_epoch(record)
    _write_metrics(config.out, config, history)
    return {"config": asdict(config), "epochs": history}
