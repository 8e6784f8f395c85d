"""FSDP2 training: two Gloo processes equal one process on the full batch, sharded checkpoints resume
bit-identically and consolidate into a plain checkpoint, and the options FSDP cannot honour are refused."""

import json

import pytest
import torch
from launch import largest_relative_difference, train_float64

from dfs_kernels.cli.train import parse_args
from dfs_kernels.training.checkpoint import load_checkpoint
from dfs_kernels.training.sharded_checkpoint import consolidate
from dfs_kernels.training.trainer import TrainConfig, check_config, train

FSDP_TOLERANCE = 1e-9
"""As the DDP test's (tests/test_trainer.py): float64, only the summation order differs (per-process
partial sums, then Gloo's reduce-scatter), here over three SGD steps; wrong gradient averaging, a
missing shard or per-process BatchNorm statistics differ by 1e-1 or more."""


def _fields(out, model, strategy, **overrides):
    return {**dict(model=model, strategy=strategy, dataset="synthetic", synthetic_samples=48, batch_size=16,
                   epochs=1, lr=0.02, weight_decay=0.0, out=str(out), device="cpu", progress=False,
                   deterministic=True), **overrides}


def _plain_checkpoint(out, fsdp: bool) -> dict:
    path = out / "last.pt"
    if fsdp:
        consolidate(str(out / "last.dcp"), str(path))
    return load_checkpoint(str(path))


def _tensors(state: dict) -> tuple[list, list]:
    """(model tensors by name, optimizer momentum buffers by parameter index)."""
    model = [state["model"][name] for name in sorted(state["model"]) if state["model"][name].is_floating_point()]
    momentum = [entry["momentum_buffer"] for _, entry in sorted(state["optimizer"]["state"].items())]
    return model, momentum


@pytest.mark.parametrize("model,strategy", [("vgg7", "dsn"), ("vgg7", "dfs"), ("vit_tiny_digits", "dfs")])
def test_fsdp_two_processes_equal_one_process_on_the_full_batch(tmp_path, model, strategy):
    """Three steps; the losses of every exit and every parameter, head, BatchNorm statistic and momentum
    buffer afterwards (VGG: heads in the model's group, convolutions sharded with their fused exit
    method; ViT: every block and head sharded on its own)."""
    train_float64(tmp_path, _fields(tmp_path / "single", model, strategy))
    train_float64(tmp_path, _fields(tmp_path / "fsdp", model, strategy, fsdp=True), processes=2)
    single, sharded = _plain_checkpoint(tmp_path / "single", False), _plain_checkpoint(tmp_path / "fsdp", True)
    assert sorted(sharded["model"]) == sorted(single["model"])  # fully_shard keeps the parameter names
    assert sharded["model"][sorted(sharded["model"])[0]].dtype == torch.float64
    for expected, actual in zip(_tensors(single), _tensors(sharded), strict=True):
        assert len(expected) == len(actual) > 0
        assert largest_relative_difference(expected, actual) < FSDP_TOLERANCE
    losses = [json.loads((tmp_path / run / "metrics.json").read_text())["epochs"][0]["train_loss"]
              for run in ("single", "fsdp")]
    # the trainer records the exits' losses as float32 sums over the steps: float32 rounding (measured 9e-8)
    assert largest_relative_difference([torch.tensor(losses[0])], [torch.tensor(losses[1])]) < 1e-6


def test_fsdp_resume_from_a_sharded_checkpoint_is_bit_identical(tmp_path):
    fields = _fields(tmp_path / "whole", "vgg7", "dfs", synthetic_samples=32, epochs=2, fsdp=True)
    train_float64(tmp_path, fields, processes=2)
    fields["out"] = str(tmp_path / "resumed")
    train_float64(tmp_path, dict(fields, stop_after=1), processes=2)
    train_float64(tmp_path, dict(fields, resume=True), processes=2)
    whole, resumed = _plain_checkpoint(tmp_path / "whole", True), _plain_checkpoint(tmp_path / "resumed", True)
    assert resumed["epoch"] == whole["epoch"] == 2
    for expected, actual in zip(_tensors(whole), _tensors(resumed), strict=True):
        assert all(torch.equal(x, y) for x, y in zip(expected, actual, strict=True))
    assert resumed["history"][1]["train_loss"] == whole["history"][1]["train_loss"]


def _one_process(tmp_path, name, **overrides):
    config = TrainConfig(**_fields(tmp_path / name, "vgg7", "dfs", **{"synthetic_samples": 16, **overrides}))
    return train(config)


def test_one_process_fsdp_equals_plain_training_and_its_consolidated_checkpoint_resumes_without_fsdp(tmp_path):
    plain = _one_process(tmp_path, "plain", epochs=2, stop_after=1)
    sharded = _one_process(tmp_path, "fsdp", epochs=2, stop_after=1, fsdp=True)
    assert sharded["epochs"][0]["train_loss"] == pytest.approx(plain["epochs"][0]["train_loss"], rel=1e-5)
    expected, actual = _plain_checkpoint(tmp_path / "plain", False), _plain_checkpoint(tmp_path / "fsdp", True)
    for a, b in zip(_tensors(expected), _tensors(actual), strict=True):
        assert largest_relative_difference(a, b) < 1e-5
    # the consolidated checkpoint is a last.pt: a run without FSDP continues from it
    more = _one_process(tmp_path, "fsdp", epochs=2, resume=True)
    assert [record["epoch"] for record in more["epochs"]] == [1, 2]


def test_fsdp_bf16_mixed_precision_trains_with_float32_master_weights(tmp_path):
    result = _one_process(tmp_path, "bf16", fsdp=True, fsdp_mixed_precision="bf16")
    assert all(torch.isfinite(torch.tensor(result["epochs"][0]["train_loss"])))
    state = _plain_checkpoint(tmp_path / "bf16", True)
    assert {tensor.dtype for tensor in _tensors(state)[0]} == {torch.float32}


def test_resume_refuses_a_checkpoint_of_the_other_kind(tmp_path):
    _one_process(tmp_path, "plain")
    with pytest.raises(ValueError, match=r"last\.pt: it was written without fsdp"):
        _one_process(tmp_path, "plain", fsdp=True, resume=True, epochs=2)


@pytest.mark.parametrize("overrides,message", [
    (dict(fsdp=True, strategy="bdl"), "fsdp supports the strategies"),
    (dict(fsdp=True, strategy="gd"), "fsdp supports the strategies"),
    (dict(fsdp=True, amp="fp16"), "amp 'fp16' is not supported with fsdp"),
    (dict(fsdp=True, compile=True), "compile is not supported with fsdp"),
    (dict(fsdp_mixed_precision="bf16"), "needs fsdp"),
    (dict(fsdp=True, fsdp_mixed_precision="fp8"), "fsdp_mixed_precision must be one of"),
    (dict(activation_checkpointing=True), "nothing to save on VGG"),
])
def test_options_fsdp_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(TrainConfig(**{"model": "vgg7", "strategy": "dsn", "dataset": "synthetic", **overrides}))


def test_consolidate_names_a_folder_without_a_sharded_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="holds no sharded checkpoint"):
        consolidate(str(tmp_path), str(tmp_path / "last.pt"))


def test_dfs_train_takes_the_scaling_options_and_refuses_what_fsdp_cannot_honour(capsys):
    common = ["--model", "resnet18", "--dataset", "synthetic", "--device", "cpu"]
    config = parse_args([*common, "--fsdp", "--fsdp-mixed-precision", "bf16", "--activation-checkpointing"])
    assert (config.fsdp, config.fsdp_mixed_precision, config.activation_checkpointing) == (True, "bf16", True)
    with pytest.raises(SystemExit) as exit:
        parse_args([*common, "--fsdp", "--strategy", "gd"])
    assert exit.value.code == 2 and "fsdp supports the strategies" in capsys.readouterr().err
