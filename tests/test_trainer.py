"""Trainer pieces: datasets, the restricted CIFAR unpickler, atomic checkpoints, exact resume, DDP, the CLI."""

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
from dfs_kernels.training.data import CIFAR100_MEAN, load_cifar100, load_dataset, load_digits
from dfs_kernels.training.loader import FolderSource, rank_batches
from dfs_kernels.training.trainer import TrainConfig, scaled_milestones, train

from launch import largest_relative_difference, train_float64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_digits_shapes_and_deterministic_split():
    pytest.importorskip("sklearn")
    first, again, other = load_digits(0), load_digits(0), load_digits(1)
    sizes = [len(split) for split in (first.train, first.val, first.test)]
    assert sum(sizes) == 1797 and sizes[0] == 1258
    images, labels = first.train.tensors
    assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert first.num_classes == 10
    assert torch.equal(images[:, 0], images[:, 2])  # replicated channels
    for split in ("train", "val", "test"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(first, split).tensors, getattr(again, split).tensors))
    assert not torch.equal(first.test.tensors[1], other.test.tensors[1])


def test_digits_without_sklearn_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_digits()


def _write_fake_cifar(folder, train_n=6, test_n=4, *, protocol=4, data=None, labels=None):
    """A CIFAR-100 python-pickle folder; ``data`` / ``labels`` replace the train split's fields."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", train_n), ("test", test_n)):
        record = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                  b"fine_labels": [int(v) for v in rng.integers(0, 100, n)], b"coarse_labels": [0] * n}
        if name == "train":
            record[b"data"] = record[b"data"] if data is None else data
            record[b"fine_labels"] = record[b"fine_labels"] if labels is None else labels
        with open(os.path.join(folder, name), "wb") as handle:
            pickle.dump(record, handle, protocol=protocol)
    with open(os.path.join(folder, "meta"), "wb") as handle:
        pickle.dump({b"fine_label_names": [b"x"] * 100}, handle, protocol=protocol)


def test_fake_cifar_folder_loads(tmp_path):
    _write_fake_cifar(tmp_path / "cifar-100-python")
    for data_dir in (tmp_path, tmp_path / "cifar-100-python"):
        splits = load_cifar100(str(data_dir))
        assert splits.train.tensors[0].shape == (6, 3, 32, 32) and splits.test.tensors[1].shape == (4,)
        assert len(splits.val) == 0 and splits.num_classes == 100 and splits.mean == CIFAR100_MEAN


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_scalar_labels_load_through_the_restricted_unpickler(tmp_path, protocol):
    labels = [np.int64(v) for v in (0, 99, 5, 7, 1, 2)]
    _write_fake_cifar(tmp_path / "cifar-100-python", protocol=protocol, labels=labels)
    splits = load_cifar100(str(tmp_path))
    assert splits.train.tensors[1].tolist() == [0, 99, 5, 7, 1, 2]


@pytest.mark.parametrize("field, data, labels, message", [
    ("data", np.full((6, 3072), 0.5, dtype=np.float32), None, r"field 'data' must be a numpy array of uint8.*float32"),
    ("data", np.full((6, 3072), 300, dtype=np.int16), None, r"field 'data' must hold pixel values in \[0, 255\]"),
    ("data", np.zeros((6, 32, 32, 3), dtype=np.uint8), None, r"field 'data' must be \[N, 3072\]"),
    ("data", [[0] * 3072] * 6, None, r"field 'data' must be a numpy array.*list"),
    ("fine_labels", None, [0, 1, 2, 3, 4, 100], r"field 'fine_labels' must be in \[0, 100\), got \[0, 100\]"),
    ("fine_labels", None, [0, 1, 2, 3, 4, -1], r"field 'fine_labels' must be in \[0, 100\)"),
    ("fine_labels", None, [0, 1, 2], r"field 'fine_labels' has 3 labels for 6 images"),
    ("fine_labels", None, [0.5] * 6, r"field 'fine_labels' must be a list of integers"),
    ("fine_labels", None, 5, r"field 'fine_labels' must be a list of integers, got int"),
    ("fine_labels", None, b"\x01" * 6, r"field 'fine_labels' must be a list of integers, got bytes"),
    ("fine_labels", None, [[0, 1], [2]] + [0] * 4, r"field 'fine_labels' must be a flat list of integers"),
])
def test_cifar_loader_validates_each_field_naming_the_file(tmp_path, field, data, labels, message):
    _write_fake_cifar(tmp_path / "cifar-100-python", data=data, labels=labels)
    with pytest.raises(ValueError, match=r"cifar-100-python/train: " + message):
        load_cifar100(str(tmp_path))


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
    for protocol in (2, 5):  # an object array would carry arbitrary objects: refused at its dtype
        with open(folder / "train", "wb") as handle:
            pickle.dump({b"data": np.array([1, "x"], dtype=object), b"fine_labels": []}, handle, protocol=protocol)
        with pytest.raises(pickle.UnpicklingError, match="refusing"):
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


def test_milestones():
    assert scaled_milestones("vgg7", 300) == [270, 280, 295]
    assert scaled_milestones("resnet18", 30) == [25, 28, 30]


def _tiny(out, **overrides):
    fields = dict(model="vgg7", strategy="dsn", dataset="synthetic", synthetic_samples=32, batch_size=16, epochs=2,
                  lr=0.05, out=str(out), device="cpu", progress=False, deterministic=True)
    return TrainConfig(**{**fields, **overrides})


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
    command = [sys.executable, "-m", "dfs_kernels.cli.train", "--model", "vgg7", "--dataset",
               "synthetic", "--synthetic-samples", "32", "--strategy", "dfs", "--epochs", "1", "--batch-size",
               "16", "--device", "cpu", "--no-progress", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "test%" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["epochs"]) == 1 and len(metrics["epochs"][0]["test_acc"]) == 6
    assert (out / "metrics.csv").exists()
    assert load_checkpoint(str(out / "last.pt"))["epoch"] == 1


def _model_state(out):
    return load_checkpoint(str(out / "last.pt"))["model"]


def _kill_at_step_script(config: TrainConfig, epoch: int, step: int) -> str:
    """A child program that trains ``config`` and SIGKILLs itself right after step ``step`` of ``epoch``."""
    fields = {key: value for key, value in dataclasses.asdict(config).items()}
    return (
        "import os, signal\n"
        "from dfs_kernels.training.trainer import TrainConfig, train\n"
        "def on_step(epoch, step):\n"
        f"    if (epoch, step) == ({epoch}, {step}):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"train(TrainConfig(**{fields!r}), on_step=on_step)\n"
    )


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(tmp_path):
    # gd: its random projection order is strategy state that the checkpoint must carry
    config = _tiny(tmp_path / "cut", strategy="gd", synthetic_samples=48, checkpoint_every=1)
    child = subprocess.run([sys.executable, "-c", _kill_at_step_script(config, 1, 2)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -9, child.stderr  # really killed, no cleanup ran
    state = load_checkpoint(str(tmp_path / "cut" / "last.pt"))
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = train(dataclasses.replace(config, resume=True))
    full = train(dataclasses.replace(config, out=str(tmp_path / "full")))
    a, b = _model_state(tmp_path / "full"), _model_state(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train_loss"] for r in full["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]
    assert [r["test_acc"] for r in full["epochs"]] == [r["test_acc"] for r in resumed["epochs"]]


def test_failed_resume_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(_tiny(out, epochs=1))
    good = (out / "last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"different run: \['lr'\]"):
        train(dataclasses.replace(_tiny(out, epochs=1, resume=True), lr=0.5))
    (out / "other.pt").write_bytes(good[: len(good) // 2])  # truncated copy
    os.replace(out / "other.pt", out / "last.pt")
    truncated = (out / "last.pt").read_bytes()
    with pytest.raises(ValueError, match="cannot load checkpoint"):
        train(_tiny(out, epochs=2, resume=True))
    assert (out / "last.pt").read_bytes() == truncated  # nothing written over it


def _set(state, path, value):
    *parents, last = path
    for key in parents:
        state = state[key]
    if value is _DELETE:
        del state[last]
    else:
        state[last] = value


_DELETE = object()
BAD_FIELDS = [
    (("rng", "torch"), torch.zeros(5, dtype=torch.float32), r"field 'rng\.torch' must be a uint8 tensor"),
    (("rng", "python", "state"), [1, 2, 3], r"field 'rng\.python\.state' must be an int64 tensor \[625\]"),
    (("rng", "numpy", "kind"), "PCG64", r"field 'rng\.numpy\.kind' must be 'MT19937'"),
    (("rng", "numpy"), _DELETE, r"field 'rng\.numpy' must be present"),
    (("step",), 10**6, r"field 'step' is 1000000, past the end of an epoch of 2 steps"),
    (("step",), -1, r"field 'step' must be a non-negative int"),
    (("epoch",), "1", r"field 'epoch' must be an int, got str"),
    (("epoch",), 7, r"field 'epoch' is 7, past the run's 2 epochs"),
    (("history",), [], r"field 'history' has 0 epochs, field 'epoch' says 1"),
    (("history",), [1], r"field 'history\.0' must be a dict with keys \['epoch', 'lr'"),
    (("history", 0, "test_acc"), [50.0], r"field 'history\.0\.test_acc' must be a list of 6 numbers"),
    (("optimizer", "state", 0, "momentum_buffer"), torch.zeros(1),
     r"field 'optimizer\.state\.0\.momentum_buffer' must have the shape \[64, 3, 3, 3\]"),
    (("model", "layers.0.conv.weight"), 3.0, r"field 'model\.layers\.0\.conv\.weight' must be a tensor"),
    (("optimizer",), {"state": {}, "param_groups": [{"params": [0]}]}, r"field 'optimizer' does not match this run"),
    (("scheduler",), {"milestones": 5}, r"field 'scheduler' does not match this run"),
]


def test_resume_validates_each_checkpoint_field_naming_the_file(tmp_path):
    out = tmp_path / "run"
    train(_tiny(out, epochs=2, stop_after=1))
    good = load_checkpoint(str(out / "last.pt"))
    assert "layers.0.conv.weight" in good["model"]
    for field, value, message in BAD_FIELDS:
        state = load_checkpoint(str(out / "last.pt"))
        _set(state, field, value)
        save_checkpoint(str(out / "bad.pt"), state)
        os.replace(out / "bad.pt", out / "last.pt")
        with pytest.raises(ValueError, match=r"checkpoint .*last\.pt: " + message):
            train(_tiny(out, epochs=2, resume=True))
        save_checkpoint(str(out / "last.pt"), good)
    train(_tiny(out, epochs=2, resume=True))  # the untouched checkpoint resumes


def _unwritable_folder(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return "/proc/self"  # exists, and nobody, root included, can create files in it


def test_unwritable_out_fails_before_any_training(tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before --out was checked")

    monkeypatch.setattr("dfs_kernels.training.trainer.load_dataset", no_data)
    with pytest.raises(PermissionError, match="cannot write checkpoints and metrics to"):
        train(_tiny(_unwritable_folder(tmp_path)))


def test_rank_batches_split_the_global_batch():
    for num_samples, batch_size in ((32, 16), (37, 8), (64, 12)):
        single = rank_batches(num_samples, batch_size, epoch=3, seed=1)
        for world_size in (2, 4):
            if batch_size % world_size:
                continue
            per_rank = [rank_batches(num_samples, batch_size, epoch=3, seed=1, rank=rank, world_size=world_size)
                        for rank in range(world_size)]
            assert len({len(batches) for batches in per_rank}) == 1
            if num_samples % world_size == 0:
                for step, batch in enumerate(single):
                    assert sorted(batch) == sorted(i for batches in per_rank for i in batches[step])
    assert rank_batches(32, 16, epoch=0, seed=0) != rank_batches(32, 16, epoch=1, seed=0)
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        rank_batches(32, 6, epoch=0, seed=0, rank=0, world_size=4)


class _NoisyDataset(torch.utils.data.Dataset):
    """Map-style dataset whose transform draws from torch's global RNG, like torchvision's."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        return torch.full((1, 2, 2), float(index)) + torch.rand(1, 2, 2), index


def test_folder_source_draws_per_sample_randomness():
    source = FolderSource(_NoisyDataset(), seed=5, workers=0)
    device = torch.device("cpu")
    batches = [[3, 1, 4], [0, 5]]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    whole = {int(i): image for images, labels in source.iterate(batches, 2, device) for image, i in zip(images, labels)}
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is untouched
    alone = {int(i): image for images, labels in source.iterate([[5], [1, 3]], 2, device) for image, i in zip(images, labels)}
    for index in alone:
        assert torch.equal(whole[index], alone[index])
    other_epoch = next(iter(source.iterate([[3]], 3, device)))[0][0]
    assert not torch.equal(other_epoch, whole[3])


def test_imagenet_errors_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(ImportError, match="pip install torchvision"):
        load_dataset("imagenet", str(tmp_path))


def _first_step_float64(tmp_path, name, strategy, *, processes=1, nodes=1, sync_bn=True, **model):
    """(first-step gradients, model state) of one float64 step of a 16-image global batch, trained by
    ``processes`` processes on each of ``nodes`` nodes. With weight decay 0 SGD's momentum buffers after one
    step are the gradients. ``model``: TrainConfig fields of another model than VGG7."""
    out = tmp_path / name
    fields = dict(model="vgg7", strategy=strategy, dataset="synthetic", synthetic_samples=16, batch_size=16,
                  epochs=1, lr=0.02, weight_decay=0.0, out=str(out), device="cpu", progress=False,
                  deterministic=True, sync_bn=sync_bn)
    fields.update(model)
    train_float64(tmp_path, fields, processes=processes, nodes=nodes)
    state = load_checkpoint(str(out / "last.pt"))
    gradients = [entry["momentum_buffer"] for _, entry in sorted(state["optimizer"]["state"].items())]
    assert gradients and all(g.dtype == torch.float64 for g in gradients)
    return gradients, [value for value in state["model"].values() if value.is_floating_point()]


DDP_TOLERANCE = 1e-9
"""Largest relative difference, per tensor, of the first step's gradients (and of the weights and BatchNorm
statistics after it) between one process on the 16-image batch and two processes on 8 images each, in
float64. Only the summation order differs (per-process partial sums, then Gloo's all-reduce), so the
difference is rounding: measured 3e-13 to 7e-13 (float64 epsilon 1.1e-16, amplified by the normalizations
and the chain of layers). A float32 step, or several chaotic steps, would make it depend on the CPU's
vector width. Per-process BatchNorm statistics, a wrong gradient average or a wrong sample split
change the gradients by 1e-1 or more (per-process BatchNorm: 0.85 for dfs, 0.57 gd, 0.46 bdl); 1e-9 sits between."""


@pytest.mark.parametrize("strategy", ["dfs", "gd", "bdl"])
def test_ddp_two_cpu_processes_equal_one_process_on_the_full_batch(tmp_path, strategy):
    single = _first_step_float64(tmp_path, "single", strategy)
    double = _first_step_float64(tmp_path, "ddp", strategy, processes=2)
    assert largest_relative_difference(single[0], double[0]) < DDP_TOLERANCE  # gradients
    assert largest_relative_difference(single[1], double[1]) < DDP_TOLERANCE  # weights, BatchNorm buffers
    if strategy == "dfs":  # the check can fail: per-process BatchNorm statistics train another network
        unsynced = _first_step_float64(tmp_path, "unsynced", strategy, processes=2, sync_bn=False)
        assert largest_relative_difference(single[0], unsynced[0]) > 1e6 * DDP_TOLERANCE


def test_ddp_on_two_nodes_equals_one_process_on_the_full_batch(tmp_path):
    """Two torchrun launches of one process each, meeting at a c10d rendezvous on 127.0.0.1: the launch of a
    job over two machines, each running its own torchrun."""
    single = _first_step_float64(tmp_path, "single", "dfs")
    two_nodes = _first_step_float64(tmp_path, "two_nodes", "dfs", processes=1, nodes=2)
    assert largest_relative_difference(single[0], two_nodes[0]) < DDP_TOLERANCE
    assert largest_relative_difference(single[1], two_nodes[1]) < DDP_TOLERANCE


def test_ddp_trains_a_library_model_as_one_process_does(tmp_path):
    pytest.importorskip("transformers")
    model = dict(model="hf:resnet", exits=["resnet.encoder.stages.0", "resnet.encoder.stages.1"],
                 model_kwargs={"embedding_size": 8, "hidden_sizes": [8, 16, 24], "depths": [1, 1, 1],
                               "layer_type": "basic"})
    single = _first_step_float64(tmp_path, "single", "dfs", **model)
    double = _first_step_float64(tmp_path, "ddp", "dfs", processes=2, **model)
    assert largest_relative_difference(single[0], double[0]) < DDP_TOLERANCE
    assert largest_relative_difference(single[1], double[1]) < DDP_TOLERANCE
