"""Image classification datasets for the trainer.

``load_dataset(name, data_dir=None, seed=0) -> Splits`` gives ``train``, ``val`` and ``test`` datasets
of (normalized float32 image [3, H, W], int64 label). All but ImageNet live in memory as
``TensorDataset``s of images [N, 3, 32, 32] and labels [N]:

- ``"digits"``: scikit-learn's bundled 8x8 digits (no download), upsampled bilinearly to 32x32,
  replicated to 3 channels, normalized with the training split's statistics; a seeded permutation
  splits it 70/10/20. 10 classes, no augmentation (flipping changes digits).
- ``"synthetic"``: small random data with class-dependent means (learnable), for smoke tests.
- ``"cifar100"``: CIFAR-100 from a local folder in the python-pickle layout (``cifar-100-python/``
  with ``train``, ``test``, ``meta``, or that folder itself); never downloads. The pickles are read
  with ``RestrictedUnpickler``. Empty val split (thresholds of anytime inference come from a held-out
  part of train).
- ``"imagenet"``: an ImageNet-style folder (``train/`` and ``val/`` with one subfolder per class), read
  by torchvision's ``ImageFolder`` (torchvision needed) with its transforms: random-resized 224 crop
  and flip for train, resize 256 + centre 224 crop for test (the official val images).

Train-time augmentation of the in-memory datasets is ``augment.Augmentation``'s, chosen by the trainer.
"""

from __future__ import annotations

import importlib
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

DATASETS = ("digits", "synthetic", "cifar100", "imagenet")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_FILES = ("train", "test", "meta")
IMAGENET_FOLDERS = ("train", "val")


@dataclass
class Splits:
    """A dataset's splits; ``mean`` and ``std`` (per channel) are what the images were normalized with."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


def _split(images: torch.Tensor, labels: torch.Tensor, fractions: tuple[float, float], seed: int):
    """Seeded permutation, then train/val/test cut at ``fractions`` (train, val) of the samples."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_train = int(round(fractions[0] * len(labels)))
    n_val = int(round(fractions[1] * len(labels)))
    parts = (order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:])
    return [(images[idx], labels[idx]) for idx in parts]


def _normalize(splits, mean: torch.Tensor, std: torch.Tensor):
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return [TensorDataset((images - mean) / std, labels) for images, labels in splits]


def load_digits(seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits (1797 images) as 3x32x32, split 70/10/20 by a ``seed``-ed permutation."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as error:
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn") from error
    bunch = sk_load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8]
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    splits = _split(images.contiguous(), labels, (0.7, 0.1), seed)
    train_images = splits[0][0]
    mean = train_images.mean(dim=(0, 2, 3))
    std = train_images.std(dim=(0, 2, 3))
    return Splits(*_normalize(splits, mean, std), num_classes=10, mean=tuple(mean.tolist()),
                  std=tuple(std.tolist()))


def load_synthetic(seed: int = 0, num_samples: int = 64, num_classes: int = 4) -> Splits:
    """``num_samples`` random 3x32x32 images per split (train; val and test get half), the class
    shifting the mean of each image, so a network can learn it."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, 3, 1, 1, generator=generator)

    def make(n: int):
        labels = torch.randint(num_classes, (n,), generator=generator)
        images = torch.randn(n, 3, 32, 32, generator=generator) + 2.0 * centers[labels]
        return TensorDataset(images, labels)

    half = max(num_samples // 2, 1)
    return Splits(make(num_samples), make(half), make(half), num_classes=num_classes)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR pickles that resolves exactly the globals needed to rebuild numpy
    arrays: ``numpy.core.multiarray._reconstruct`` (and its numpy 2 spelling
    ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray`` and ``numpy.dtype``. Any other global
    (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``; dicts, lists, str, bytes
    and numbers need no globals."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        target = self.ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a dataset pickle: only numpy array "
                "reconstruction (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) is allowed"
            )
        import numpy

        if target[0] == "multiarray":  # numpy >= 2 moved numpy.core to numpy._core
            try:
                multiarray = importlib.import_module("numpy._core.multiarray")
            except ImportError:
                multiarray = importlib.import_module("numpy.core.multiarray")
            return getattr(multiarray, target[1])
        return getattr(numpy, target[1])


def restricted_load(path: str):
    """The object pickled at ``path``, read with ``RestrictedUnpickler`` (Python 2 strings as bytes)."""
    with open(path, "rb") as handle:
        try:
            return RestrictedUnpickler(handle, encoding="bytes").load()
        except pickle.UnpicklingError as error:
            raise pickle.UnpicklingError(f"{path}: {error}") from error


def _cifar_folder(data_dir: str | None) -> str:
    candidates = [] if data_dir is None else [os.path.join(data_dir, "cifar-100-python"), data_dir]
    for folder in candidates:
        if all(os.path.isfile(os.path.join(folder, name)) for name in CIFAR_FILES):
            return folder
    looked = ", ".join(repr(folder) for folder in candidates) or "no --data-dir given"
    raise FileNotFoundError(
        "CIFAR-100 not found (it is never downloaded): expected the python-pickle files "
        f"cifar-100-python/{{{','.join(CIFAR_FILES)}}} under the data directory, or {','.join(CIFAR_FILES)} "
        f"in the directory itself; looked in {looked}"
    )


def _get(record: dict, key: str):
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise KeyError(f"CIFAR pickle has no {key!r} entry")


def _read_cifar_split(path: str):
    record = restricted_load(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a dict, got {type(record).__name__}")
    data = torch.as_tensor(_get(record, "data")).to(torch.uint8)
    labels = torch.as_tensor(list(_get(record, "fine_labels")), dtype=torch.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data [N, 3072] and N fine_labels, got {tuple(data.shape)} "
                         f"and {labels.shape[0]}")
    return data.view(-1, 3, 32, 32).float() / 255.0, labels


def load_cifar100(data_dir: str | None) -> Splits:
    """CIFAR-100 (fine labels) from ``data_dir``; the val split is empty."""
    folder = _cifar_folder(data_dir)
    train = _read_cifar_split(os.path.join(folder, "train"))
    test = _read_cifar_split(os.path.join(folder, "test"))
    empty = (torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.int64))
    train_set, val_set, test_set = _normalize([train, empty, test], torch.tensor(CIFAR100_MEAN),
                                              torch.tensor(CIFAR100_STD))
    return Splits(train_set, val_set, test_set, num_classes=100, mean=CIFAR100_MEAN, std=CIFAR100_STD)


def load_imagenet(data_dir: str | None) -> Splits:
    """ImageNet from ``data_dir/{train,val}/<class>/<image>`` through torchvision (the val split is empty)."""
    try:
        from torchvision import datasets, transforms
    except ImportError as error:  # also: a torchvision whose compiled ops do not match torch
        raise ImportError(f"the 'imagenet' dataset needs torchvision ({error}): pip install torchvision") from error
    folders = [os.path.join(data_dir or "", name) for name in IMAGENET_FOLDERS]
    missing = [folder for folder in folders if not os.path.isdir(folder)]
    if data_dir is None or missing:
        raise FileNotFoundError(
            "ImageNet not found: expected the folders train/ and val/ (one subfolder per class) under "
            f"--data-dir; {'no --data-dir given' if data_dir is None else f'missing {missing}'}")
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = datasets.ImageFolder(folders[0], transforms.Compose([
        transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]))
    test = datasets.ImageFolder(folders[1], transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]))
    if train.classes != test.classes:
        raise ValueError(f"ImageNet train/ and val/ class folders differ under {data_dir}")
    empty = TensorDataset(torch.empty(0, 3, 224, 224), torch.empty(0, dtype=torch.int64))
    return Splits(train, empty, test, num_classes=len(train.classes), mean=IMAGENET_MEAN, std=IMAGENET_STD)


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0, synthetic_samples: int = 64) -> Splits:
    """The splits of dataset ``name`` (one of ``DATASETS``); ``seed`` fixes digits' split and synthetic data,
    ``synthetic_samples`` the synthetic train split's size."""
    if name == "digits":
        return load_digits(seed)
    if name == "synthetic":
        return load_synthetic(seed, synthetic_samples)
    if name == "cifar100":
        return load_cifar100(data_dir)
    if name == "imagenet":
        return load_imagenet(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")

