"""Library models (``torchvision:``, ``timm:``, ``hf:`` specs, ``dfs_kernels.models.zoo``) in the trainer and
``dfs-train``: small random Hugging Face configurations in every CI leg, torchvision where it loads."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from dfs_kernels.models import zoo
from dfs_kernels.training.checkpoint import load_checkpoint
from dfs_kernels.training.trainer import TrainConfig, check_config, train
from test_zoo import TIMM, TORCHVISION

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_RESNET = {"embedding_size": 8, "hidden_sizes": [8, 16, 24], "depths": [1, 1, 1], "layer_type": "basic"}
RESNET_EXITS = ["resnet.encoder.stages.0", "resnet.encoder.stages.1"]
SMALL_BERT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37,
              "vocab_size": 1000, "max_position_embeddings": 64}
BERT_EXITS = ["bert.encoder.layer.0", "bert.encoder.layer.1"]


def _config(out, **overrides) -> TrainConfig:
    fields = dict(model="hf:resnet", exits=RESNET_EXITS, model_kwargs=SMALL_RESNET, strategy="dfs",
                  dataset="synthetic", synthetic_samples=32, batch_size=16, epochs=1, lr=0.05, out=str(out),
                  device="cpu", progress=False, deterministic=True)
    return TrainConfig(**{**fields, **overrides})


# --- specs -------------------------------------------------------------------------------------------


def test_specs_name_their_library_and_modality():
    assert zoo.is_spec("hf:resnet") and not zoo.is_spec("resnet18")
    assert zoo.parse_spec("timm:resnet18") == ("timm", "resnet18")
    assert zoo.reads_tokens("hf:bert") and not zoo.reads_tokens("hf:resnet")
    assert not zoo.reads_tokens("torchvision:resnet18")  # no import needed to know a torchvision model reads images


@pytest.mark.parametrize("spec, error, message", [
    ("keras:resnet", ValueError, r"LIBRARY:NAME with LIBRARY one of \['torchvision', 'timm', 'hf'\]"),
    ("hf:", ValueError, "LIBRARY:NAME"),
    ("hf:resnett", ValueError, r"unknown model 'hf:resnett'; closest names: \['resnet'"),
    ("hf:sam", ValueError, "no image or sequence classification model"),
])
def test_bad_specs_say_what_is_wrong(spec, error, message):
    with pytest.raises(error, match=message):
        zoo.build_backbone(spec, num_classes=3)


@pytest.mark.parametrize("spec, package", [("timm:resnet18", "timm"), ("hf:bert", "transformers")])
def test_a_missing_library_names_its_pip_package(spec, package, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=f"pip install {package}"):
        zoo.build_backbone(spec, num_classes=3)


def test_hugging_face_defaults_are_overridden_by_model_kwargs():
    model = zoo.build_backbone("hf:resnet", num_classes=3, **SMALL_RESNET)
    assert model.config.hidden_sizes == [8, 16, 24] and model.config.num_labels == 3


# --- trainer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(exits=None), "exits must list the module names"),
    (dict(exits="resnet.encoder.stages.0"), "exits must list the module names"),
    (dict(strategy="bdl"), "bdl strategy cannot train a MultiExitModel"),
    (dict(dataset="synthetic_tokens"), "do not fit"),
    (dict(model="hf:bert", exits=BERT_EXITS, model_kwargs=SMALL_BERT), "do not fit"),
    (dict(model="vgg7"), "exits and model_kwargs apply to library models"),
    (dict(model="vgg7", exits=None), "exits and model_kwargs apply to library models"),
])
def test_check_config_refuses_what_a_library_model_cannot_take(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        check_config(_config(tmp_path, **overrides))


@pytest.mark.parametrize("strategy", ["dfs", "gd", "byot"])
def test_hugging_face_resnet_trains_checkpoints_and_resumes_exactly(tmp_path, strategy):
    full = train(_config(tmp_path / "full", strategy=strategy, epochs=2))
    train(_config(tmp_path / "cut", strategy=strategy, epochs=2, stop_after=1))
    resumed = train(_config(tmp_path / "cut", strategy=strategy, epochs=2, resume=True))
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["model"]
    assert {key.split(".")[0] for key in a} == {"model", "heads"}
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert [r["train_loss"] for r in full["epochs"]] == [r["train_loss"] for r in resumed["epochs"]]
    assert len(full["epochs"][-1]["test_acc"]) == len(RESNET_EXITS) + 1
    with pytest.raises(ValueError, match=r"different run: \['exits'\]"):
        train(_config(tmp_path / "cut", strategy=strategy, epochs=2, resume=True, exits=RESNET_EXITS[:1]))


def test_hugging_face_encoder_trains_on_token_ids(tmp_path):
    result = train(_config(tmp_path, model="hf:bert", exits=BERT_EXITS, model_kwargs=SMALL_BERT,
                           dataset="synthetic_tokens", optimizer="adamw", lr=1e-3))
    record = result["epochs"][0]
    assert len(record["test_acc"]) == 3 and all(torch.isfinite(torch.tensor(record["train_loss"])))


def test_bf16_autocast_and_channels_last(tmp_path):
    record = train(_config(tmp_path, amp="bf16", channels_last=True))["epochs"][0]
    assert all(torch.isfinite(torch.tensor(record["train_loss"])))


@pytest.mark.slow
def test_compiled_training_equals_eager(tmp_path):
    eager = train(_config(tmp_path / "eager", strategy="dsn"))
    compiled = train(_config(tmp_path / "compiled", strategy="dsn", compile=True))
    torch.testing.assert_close(torch.tensor(compiled["epochs"][0]["train_loss"]),
                               torch.tensor(eager["epochs"][0]["train_loss"]), rtol=1e-4, atol=1e-4)


# --- dfs-train ---------------------------------------------------------------------------------------


def _dfs_train(*options: str, out) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "dfs_kernels.cli.train", *options, "--epochs", "1", "--device", "cpu",
               "--no-progress", "--out", str(out)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_dfs_train_runs_a_hugging_face_model_on_digits(tmp_path):
    done = _dfs_train("--model", "hf:resnet", "--exits", ",".join(RESNET_EXITS), "--model-kwargs",
                      json.dumps(SMALL_RESNET), "--strategy", "dfs", "--dataset", "digits", "--batch-size", "128",
                      out=tmp_path)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["exits"] == RESNET_EXITS and len(metrics["epochs"][0]["test_acc"]) == 3


@pytest.mark.parametrize("spec, available", [("torchvision:resnet18", TORCHVISION), ("timm:resnet18", TIMM)])
def test_dfs_train_runs_torchvision_and_timm_models(tmp_path, spec, available):
    if not available:
        pytest.skip(f"{spec.split(':')[0]} (or a torchvision that loads with this torch build) is not installed")
    done = _dfs_train("--model", spec, "--exits", "layer1,layer2,layer3", "--strategy", "dfs",
                      "--dataset", "synthetic", "--synthetic-samples", "16", "--batch-size", "8", out=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "metrics.json").read_text())["epochs"][0]["test_acc"]) == 4


@pytest.mark.parametrize("options, message", [
    (["--model", "hf:resnet"], "exits must list the module names"),
    (["--model", "vgg7", "--exits", "layers.0"], "exits and model_kwargs apply to library models"),
    (["--model", "hf:resnet", "--exits", "a", "--model-kwargs", "[1]"], "must be a JSON object"),
])
def test_dfs_train_refuses_bad_library_options(tmp_path, options, message):
    done = _dfs_train(*options, out=tmp_path)
    assert done.returncode == 2 and message in " ".join(done.stderr.split()), done.stderr


def test_dfs_train_help_documents_library_models(capsys):
    from dfs_kernels.cli import train as train_cli

    with pytest.raises(SystemExit):
        train_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--exits NAME,NAME,..." in text and "torchvision:NAME/timm:NAME/hf:NAME" in text
    assert "--model-kwargs JSON" in text


def test_check_config_keeps_exits_as_a_list(tmp_path):
    config = check_config(dataclasses.replace(_config(tmp_path), exits=tuple(RESNET_EXITS)))
    assert config.exits == RESNET_EXITS


def test_dfs_anytime_evaluates_a_library_model_run(tmp_path):
    from dfs_kernels.cli import anytime

    train(_config(tmp_path / "run", strategy="dfs"))
    anytime.main([str(tmp_path / "run"), "--out", str(tmp_path / "anytime"), "--repeats", "1", "--timing-samples",
                  "8", "--batch-size", "4", "--no-progress"])
    record = json.loads((tmp_path / "anytime.json").read_text())["runs"][0]
    flops = [entry["flops"] for entry in record["exits"]]
    assert len(flops) == 3 and flops == sorted(flops) and flops[0] > 0
    assert all(runner["same_decisions"] == 1.0 for runner in record["early_exit"])
