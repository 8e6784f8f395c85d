"""Trainer pieces: datasets, the restricted CIFAR unpickler, atomic checkpoints, exact resume, the CLI."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from dfs_kernels.training.checkpoint import load_checkpoint, restore_model, save_checkpoint
from dfs_kernels.training.data import augment, load_cifar100, load_dataset, load_digits
from dfs_kernels.training.trainer import TrainConfig, scaled_milestones, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_shapes_and_deterministic_split():
    pytest.importorskip("sklearn")
    first, again, other = load_digits(0), load_digits(0), load_digits(1)
    sizes = [len(split) for split in (first.train, first.val, first.test)]
    assert sum(sizes) == 1797 and sizes[0] == 1258
    images, labels = first.train.tensors
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert first.num_classes == 10 and first.augmentation == "none"
    assert torch.equal(images[:, 0], images[:, 2])  # replicated channels
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, split).tensors, getattr(again, split).tensors))
    assert not torch.equal(first.test.tensors[1], other.test.tensors[1])


def test_digits_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


def test_crop_flip_augmentation_is_a_padded_crop():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment(images, "crop_flip", torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 9, (2, 2), generator=generator)
    flips = torch.rand(2, generator=generator) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for n in range(2):
        crop = padded[n, :, offsets[0, n]:offsets[0, n] + 32, offsets[1, n]:offsets[1, n] + 32]
        assert torch.equal(out[n], crop.flip(-1) if flips[n] else crop)
    assert augment(images, "none", generator) is images


def _write_fake_cifar(folder, train_n=6, test_n=4):
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name, n in (("train", train_n), ("test", test_n)):
        record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                  b"fine_labels": [int(v) for v in rng.integers(0, 100, n)], b"coarse_labels": [0] * n}
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(record, handle, protocol=4)
    with open(os.path.join(folder, "meta"), "wb") as handle:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, handle, protocol=4)


def test_fake_cifar_folder_loads(tmp_path):
    _write_fake_cifar(tmp_path / "cifar-100-python")
    for data_dir in (tmp_path, tmp_path / "cifar-100-python"):
        splits = load_cifar100(str(data_dir))
        assert splits.train.tensors[0].shape == (6, 3, 32, 32) and splits.test.tensors[1].shape == (4,)
        assert len(splits.val) == 0 and splits.num_classes == 100 and splits.augmentation == "crop_flip"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_rejects_crafted_pickle(tmp_path):
    folder = tmp_path / "cifar-100-python"
    _write_fake_cifar(folder)
    with open(folder / "train", "wb") as handle:
        pickle.dump({b"data": _Evil(), b"fine_labels": []}, handle, protocol=4)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load global (os|posix)\.system"):
        load_cifar100(str(tmp_path))


def test_missing_cifar_names_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python/\{train,test,meta\}"):
        load_dataset("cifar100", str(tmp_path))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.pt")
    save_checkpoint(path, {"epoch": 1, "weights": torch.ones(3)})
    with pytest.raises(Exception):
        save_checkpoint(path, {"epoch": 2, "bad": lambda: None})  # not picklable: fails mid-save
    state = load_checkpoint(path, required=("epoch",))
    assert state["epoch"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pt"]  # no temp file left behind


def test_corrupt_or_mismatched_checkpoint_raises_clearly(tmp_path):
    path = str(tmp_path / "last.pt")
    with open(path, "wb") as handle:
        handle.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot load checkpoint .*last.pt"):
        load_checkpoint(path)
    save_checkpoint(path, {"model": {}})
    with pytest.raises(ValueError, match="misses keys"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="does not match the model"):
        restore_model(torch.nn.Linear(2, 2), {"weight": torch.zeros(3, 3)}, path)


def test_milestones_and_world_size(monkeypatch):
    assert scaled_milestones("vgg7", 300) == [270, 280, 295]
    assert scaled_milestones("resnet18", 30) == [25, 28, 30]
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(NotImplementedError, match="WORLD_SIZE"):
        train(TrainConfig(dataset="synthetic", epochs=1))


def _tiny(out, **kwargs):
    return TrainConfig(model="vgg7", strategy="dsn", dataset="synthetic", synthetic_samples=32, batch_size=16,
                       epochs=2, lr=0.05, out=str(out), device="cpu", progress=False, deterministic=True,
                       **kwargs)


def test_resume_equals_uninterrupted(tmp_path):
    try:
        full = train(_tiny(tmp_path / "full"))
        train(_tiny(tmp_path / "cut", stop_after=1))
        resumed = train(_tiny(tmp_path / "cut", resume=True))
    finally:
        torch.use_deterministic_algorithms(False)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert a["epoch"] == b["epoch"] == 2
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["train_loss"] for r in full["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]
    assert [r["test_acc"] for r in full["epochs"]] == [r["test_acc"] for r in resumed["epochs"]]
    changed = dataclasses.replace(_tiny(tmp_path / "cut", resume=True), epochs=3)
    with pytest.raises(ValueError, match=r"different run: \['epochs'\]"):
        train(changed)


def test_cli_one_epoch_on_synthetic(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(ROOT, "python", "train.py"), "--model", "vgg7", "--dataset",
               "synthetic", "--synthetic-samples", "32", "--strategy", "dfs", "--epochs", "1", "--batch-size",
               "16", "--device", "cpu", "--no-progress", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "test%" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and len(metrics["epochs"][0]["test_acc"]) == 6
    assert (out / "metrics.csv").exists()
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1
