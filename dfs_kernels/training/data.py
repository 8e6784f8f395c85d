"""Image classification datasets for the trainer.

``load_dataset(name, data_dir=None, seed=0) -> Splits`` gives ``train``, ``val`` and ``test`` datasets
of (normalized float32 image [3, H, W], int64 label). All but ImageNet live in memory as
``TensorDataset``s of images [N, 3, 32, 32] and labels [N]:

- ``"digits"``: scikit-learn's bundled 8x8 digits (no download), upsampled bilinearly to 32x32,
  replicated to 3 channels, normalized with the training split's statistics; a seeded permutation
  splits it 70/10/20. 10 classes, no augmentation (flipping changes digits).
- ``"synthetic"``: small random data with class-dependent means (learnable), for smoke tests.
- ``"synthetic_tokens"``: random token-id sequences [64] from a vocabulary of 1000, each class favouring a
  band of it (learnable), for the encoders that embed ids (``models.bert_tiny``).
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

DATASETS = ("digits", "synthetic", "synthetic_tokens", "cifar100", "imagenet")
IN_MEMORY_DATASETS = ("digits", "synthetic", "synthetic_tokens")
"""The datasets that are not read from a data directory."""
TOKEN_DATASETS = ("synthetic_tokens",)
"""Datasets of token ids [N, T] rather than images, for the encoders that embed ids (``models.bert_tiny``)."""
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_FILES = ("train", "test", "meta")
CIFAR100_CLASSES = 100
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


def load_synthetic_tokens(seed: int = 0, num_samples: int = 64, num_classes: int = 4, vocab_size: int = 1000,
                          sequence_length: int = 64) -> Splits:
    """``num_samples`` random token-id sequences [T] per split (train; val and test get half) for the
    encoders: half of a sequence's tokens are drawn from a band of the vocabulary that belongs to its
    class, the rest from the whole vocabulary, so a network can learn it."""
    generator = torch.Generator().manual_seed(seed)
    band = vocab_size // num_classes

    def make(n: int):
        labels = torch.randint(num_classes, (n,), generator=generator)
        anywhere = torch.randint(vocab_size, (n, sequence_length), generator=generator)
        in_band = labels[:, None] * band + torch.randint(band, (n, sequence_length), generator=generator)
        from_band = torch.rand(n, sequence_length, generator=generator) < 0.5
        return TensorDataset(torch.where(from_band, in_band, anywhere), labels)

    half = max(num_samples // 2, 1)
    return Splits(make(num_samples), make(half), make(half), num_classes=num_classes)


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


def _multiarray():
    try:  # numpy >= 2 moved numpy.core to numpy._core
        return importlib.import_module("numpy._core.multiarray")
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")


def _plain_dtype(*args):
    """``numpy.dtype(*args)``, refusing object dtypes (their items would be arbitrary Python objects)."""
    import numpy

    dtype = numpy.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype} in a dataset pickle: it holds Python objects")
    return dtype


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of bytes use it: latin-1 only."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r} in a dataset pickle")
    return text.encode("latin1")


def _frombuffer(*args):
    import numpy

    try:
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:
        numeric = importlib.import_module("numpy.core.numeric")
    if args and numpy.dtype(args[1]).hasobject:
        raise pickle.UnpicklingError("refusing an object array in a dataset pickle")
    return numeric._frombuffer(*args)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR pickles that resolves exactly the globals needed to rebuild numpy arrays
    and scalars: ``numpy.core.multiarray._reconstruct`` and ``.scalar`` (and their numpy 2 spelling
    ``numpy._core.multiarray``), ``numpy.core.numeric._frombuffer`` (protocol 5 arrays), ``numpy.ndarray``,
    ``numpy.dtype`` (object dtypes refused) and ``_codecs.encode`` with latin-1 (protocol 2 bytes). Any
    other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``; dicts, lists,
    str, bytes and numbers need no globals."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda: _multiarray()._reconstruct,
        ("numpy.core.multiarray", "scalar"): lambda: _multiarray().scalar,
        ("numpy._core.multiarray", "scalar"): lambda: _multiarray().scalar,
        ("numpy.core.numeric", "_frombuffer"): lambda: _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): lambda: _frombuffer,
        ("numpy", "ndarray"): lambda: importlib.import_module("numpy").ndarray,
        ("numpy", "dtype"): lambda: _plain_dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        resolve = self.ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a dataset pickle: only numpy arrays and scalars "
                "(numpy.core.multiarray._reconstruct / scalar, numpy.ndarray, numpy.dtype) are allowed"
            )
        return resolve()


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


def _get(record: dict, key: str, path: str):
    for candidate in (key.encode(), key):
        if candidate in record:
            return record[candidate]
    raise ValueError(f"{path}: the CIFAR pickle has no {key!r} field (it has {sorted(record)})")


def _cifar_images(data, path: str) -> torch.Tensor:
    """``data`` [N, 3072] of integer pixels in [0, 255] -> float images [N, 3, 32, 32] in [0, 1]."""
    import numpy

    if not isinstance(data, numpy.ndarray) or data.dtype.kind not in "iu":
        kind = data.dtype if isinstance(data, numpy.ndarray) else type(data).__name__
        raise ValueError(f"{path}: field 'data' must be a numpy array of uint8 pixels, got {kind}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: field 'data' must be [N, 3072] (N images, 3x32x32 channel-major), "
                         f"got {list(data.shape)}")
    if data.dtype != numpy.uint8 and data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: field 'data' must hold pixel values in [0, 255], got "
                         f"[{data.min()}, {data.max()}]")
    return torch.from_numpy(data.astype(numpy.uint8)).view(-1, 3, 32, 32).float() / 255.0


def _cifar_labels(labels, count: int, num_classes: int, path: str) -> torch.Tensor:
    """``labels`` (a list of ints or numpy integers, or an integer array) -> int64 [count] in [0, num_classes)."""
    import numpy

    if not isinstance(labels, (list, tuple, numpy.ndarray)):
        raise ValueError(f"{path}: field 'fine_labels' must be a list of integers, got {type(labels).__name__}")
    try:
        values = numpy.asarray(labels)
    except (ValueError, TypeError) as error:  # ragged nesting
        raise ValueError(f"{path}: field 'fine_labels' must be a flat list of integers: {error}") from error
    if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
        raise ValueError(f"{path}: field 'fine_labels' must be a list of integers, got "
                         f"{values.dtype} of shape {list(values.shape)}")
    if len(values) != count:
        raise ValueError(f"{path}: field 'fine_labels' has {len(values)} labels for {count} images in 'data'")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{path}: field 'fine_labels' must be in [0, {num_classes}), got "
                         f"[{values.min()}, {values.max()}]")
    return torch.as_tensor(values.astype(numpy.int64))


def _read_cifar_split(path: str):
    record = restricted_load(path)
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a dict of fields, got {type(record).__name__}")
    images = _cifar_images(_get(record, "data", path), path)
    return images, _cifar_labels(_get(record, "fine_labels", path), len(images), CIFAR100_CLASSES, path)


def load_cifar100(data_dir: str | None) -> Splits:
    """CIFAR-100 (fine labels) from ``data_dir``; the val split is empty."""
    folder = _cifar_folder(data_dir)
    train = _read_cifar_split(os.path.join(folder, "train"))
    test = _read_cifar_split(os.path.join(folder, "test"))
    empty = (torch.empty(0, 3, 32, 32), torch.empty(0, dtype=torch.int64))
    train_set, val_set, test_set = _normalize([train, empty, test], torch.tensor(CIFAR100_MEAN),
                                              torch.tensor(CIFAR100_STD))
    return Splits(train_set, val_set, test_set, num_classes=CIFAR100_CLASSES, mean=CIFAR100_MEAN, std=CIFAR100_STD)


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
    if name == "synthetic_tokens":
        return load_synthetic_tokens(seed, synthetic_samples)
    if name == "cifar100":
        return load_cifar100(data_dir)
    if name == "imagenet":
        return load_imagenet(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")

