"""Which samples each process trains on, step by step, and how they reach the device.

Order: ``rank_batches`` shuffles with ``torch.utils.data.DistributedSampler`` (permutation seeded by
seed + epoch, sample i of it to rank i mod W) and cuts each rank's share into batches of
``batch_size / W``. Step s of every rank together is then exactly batch s of a one-process run with
``batch_size``: DDP over W processes trains on the same global batches as one process.

Randomness: every random choice about a sample (its augmentation) is a function of (seed, epoch,
sample index) only, so a run resumed at any step, or split over any number of processes, draws what
an uninterrupted one-process run draws.

Sources: ``TensorSource`` (in-memory datasets: gather, then augment the batch on the device) and
``FolderSource`` (map-style datasets that transform each sample themselves, e.g. torchvision's
ImageFolder, through a ``DataLoader`` whose workers reseed per sample).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from .augment import Augmentation

Batch = tuple[torch.Tensor, torch.Tensor]
MIN_BATCH = 2
"""BatchNorm needs more than one sample: a smaller last batch is dropped."""


def sample_seed(seed: int, epoch: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, index)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rank_batches(num_samples: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> list[list[int]]:
    """This rank's batches of dataset indices for ``epoch`` (the global ``batch_size`` must divide by
    ``world_size``); every rank gets the same number of batches."""
    if batch_size % world_size:
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of processes ({world_size})")
    sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    per_rank = batch_size // world_size
    batches = [indices[start:start + per_rank] for start in range(0, len(indices), per_rank)]
    if len(batches) > 1 and len(batches[-1]) * world_size < MIN_BATCH:
        batches.pop()
    return batches


class TensorSource:
    """Batches of an in-memory ``TensorDataset`` (images [N, C, H, W], labels [N]), augmented on the device
    with parameters drawn once per epoch for the whole dataset."""

    def __init__(self, dataset: TensorDataset, augmentation: Augmentation, seed: int) -> None:
        self.images, self.labels = dataset.tensors
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def iterate(self, batches: list[list[int]], epoch: int, device: torch.device) -> Iterator[Batch]:
        params = self.augmentation.sample(len(self), torch.Generator().manual_seed(sample_seed(self.seed, epoch)))
        for batch in batches:
            index = torch.as_tensor(batch)
            images = self.images[index].to(device, non_blocking=True)
            yield (self.augmentation(images, {name: value[index] for name, value in params.items()}),
                   self.labels[index].to(device, non_blocking=True))


class _SeededSamples(Dataset):
    """``dataset[index]`` computed under torch's RNG seeded by (seed, epoch, index), restored afterwards."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            return self.dataset[index]


class FolderSource:
    """Batches of a map-style dataset whose items are (image tensor, label) already transformed, loaded by
    ``workers`` DataLoader processes."""

    def __init__(self, dataset: Dataset, seed: int, workers: int) -> None:
        self.dataset, self.seed, self.workers = dataset, seed, workers

    def __len__(self) -> int:
        return len(self.dataset)

    def iterate(self, batches: list[list[int]], epoch: int, device: torch.device) -> Iterator[Batch]:
        # a private generator: creating the iterator would otherwise draw from torch's global RNG
        loader = DataLoader(_SeededSamples(self.dataset, self.seed, epoch), batch_sampler=batches,
                            num_workers=self.workers, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch)))
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def make_source(dataset: Dataset, augmentation: Augmentation, *, seed: int, workers: int):
    """``TensorSource`` for a ``TensorDataset``, ``FolderSource`` for any other map-style dataset."""
    if isinstance(dataset, TensorDataset):
        return TensorSource(dataset, augmentation, seed)
    return FolderSource(dataset, seed, workers)


def shard_batches(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    """Evaluation: rank r's samples r, r + W, ... in batches of ``batch_size`` (no shuffling, no padding)."""
    mine = list(range(rank, num_samples, world_size))
    return [mine[start:start + batch_size] for start in range(0, len(mine), batch_size)]
