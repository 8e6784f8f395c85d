"""The command-line programs and the packaging around them: help with defaults and choices, options
checked at start-up against each other and the machine, model names, console scripts, licence."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import dfs_kernels
from dfs_kernels.cli import train as train_cli
from dfs_kernels.training.trainer import TrainConfig, check_config

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BENCH = ROOT / "bench" / "train_step.py"
CPU_UNAVAILABLE = [name for name in dfs_kernels.BACKENDS if dfs_kernels.unavailable_reason(name, "cpu")]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step_cli", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _help(main, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _options(text: str) -> str:
    return " ".join(text.split())  # argparse wraps help text at the terminal width


def test_train_help_shows_defaults_and_backend_choices(capsys):
    text = _options(_help(train_cli.main, capsys))
    assert "--epochs EPOCHS epochs (the recipes' length) (default: 300)" in text
    assert "(default: 128)" in text and "(default: dsn)" in text and "(default: runs/default)" in text
    backends = re.search(r"--backend \{([^}]*)\}", text).group(1).split(",")
    assert backends == ["auto", *dfs_kernels.BACKENDS]
    assert "vgg7_64" in text


@pytest.mark.parametrize("program", ["anytime", "info", "bench"])
def test_other_programs_help_shows_defaults(program, capsys, bench):
    main = bench.main if program == "bench" else importlib.import_module(f"dfs_kernels.cli.{program}").main
    text = _options(_help(main, capsys))
    expected = {"anytime": "(default: 256)", "info": "show this help", "bench": "(default: float32)"}[program]
    assert expected in text
    if program == "bench":
        assert "(default: 0.5)" in text and "vgg7_64" in text and "(default: None)" not in text


def _must_not_run(*args, **kwargs):
    raise AssertionError("data or a model was set up before the options were checked")


def _usage_error(argv, capsys, monkeypatch) -> str:
    monkeypatch.setattr("dfs_kernels.training.trainer.load_dataset", _must_not_run)
    monkeypatch.setattr("dfs_kernels.training.trainer.build_model", _must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(argv)
    assert exit_info.value.code == 2
    return _options(capsys.readouterr().err)


@pytest.mark.skipif(not CPU_UNAVAILABLE, reason="every backend runs on this CPU")
def test_unavailable_backend_is_refused_at_start_up_with_what_can_run(tmp_path, capsys, monkeypatch):
    backend = CPU_UNAVAILABLE[0]
    error = _usage_error(["--strategy", "dfs", "--backend", backend, "--device", "cpu", "--out", str(tmp_path)],
                         capsys, monkeypatch)
    assert f"backend '{backend}' cannot run on cpu: {dfs_kernels.unavailable_reason(backend, 'cpu')}" in error
    assert "On this machine use one of 'auto', " + ", ".join(
        repr(name) for name in dfs_kernels.available_backends("cpu")) in error


def test_triton_on_cpu_advice_names_the_interpreter(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "dfs_kernels.cli.train", "--strategy", "dfs", "--backend", "triton",
               "--device", "cpu", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 2
    assert "TRITON_INTERPRET=1" in done.stderr and "On this machine use one of 'auto'" in done.stderr
    assert not os.listdir(tmp_path)  # nothing was set up


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "dsn", "--backend", "aten"], "backend 'aten' has no effect: strategy 'dsn' trains the 'dsn'"),
    (["--strategy", "gd", "--backend", "reference"], "backend 'reference' has no effect: strategy 'gd'"),
    (["--strategy", "bdl", "--beta", "0.3"], "beta 0.3 has no effect: strategy 'bdl' trains the 'dsn' flavour"),
])
def test_options_a_strategy_ignores_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    assert message in _usage_error([*argv, "--device", "cpu", "--out", str(tmp_path)], capsys, monkeypatch)


@pytest.mark.parametrize("options, message", [
    (dict(dataset="synthetic", data_dir="/data"), "data_dir is ignored: dataset 'synthetic'"),
    (dict(dataset="digits", synthetic_samples=8), "synthetic_samples is ignored by dataset 'digits'"),
    (dict(dataset="cifar100", workers=8), "workers is ignored: dataset 'cifar100' is batched in memory"),
    (dict(sync_bn=False), "sync_bn=False has no effect in a one-process run"),
])
def test_options_without_effect_warn(options, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.warns(UserWarning, match=message):
        check_config(TrainConfig(device="cpu", **options))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_usage_error(tmp_path, capsys, monkeypatch, bench):
    error = _usage_error(["--device", "cuda", "--out", str(tmp_path)], capsys, monkeypatch)
    assert "device 'cuda' requested, but" in error and "use device 'cpu'" in error
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "device 'cuda' requested, but" in capsys.readouterr().err


def test_factory_model_names_are_accepted(tmp_path, bench):
    config = train_cli.parse_args(["--model", "vgg7_64", "--device", "cpu", "--out", str(tmp_path)])
    assert config.model == "vgg7"  # the registry name, so the recipes apply
    assert check_config(TrainConfig(model="vgg16_64", device="cpu")).model == "vgg16"
    assert bench.parse_args(["--model", "vgg7_64", "--device", "cpu"]).model == "vgg7"
    assert type(dfs_kernels.models.build_model("vgg7_64", num_classes=10)).__name__ == "MultiExitVGG"


def test_benchmark_prints_no_profiler_noise(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "KINETO_LOG_LEVEL"}
    command = [sys.executable, str(BENCH), "--model", "vgg7", "--batch-sizes", "2", "--iterations", "1",
               "--warmup", "0", "--output", str(tmp_path / "record.json")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "record.json").exists()
    assert "USDT" not in done.stdout + done.stderr and "profiler_st" not in done.stdout + done.stderr


def test_console_scripts_point_at_the_programs(capsys):
    scripts = PYPROJECT["project"]["scripts"]
    assert set(scripts) == {"dfs-train", "dfs-anytime", "dfs-info", "dfs-train-step"}
    for name, target in scripts.items():
        module_name, function = target.split(":")
        main = getattr(importlib.import_module(module_name), function)
        assert _help(main, capsys).startswith(f"usage: {name} "), name


def test_licence_file_is_the_declared_apache_2():
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS" in text


def test_readme_main_job_command_installs_what_training_needs():
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "python bench/train_step.py" in line and "pip install" in line)
    extras = re.search(r'-e "\.\[([^\]]*)\]"', command).group(1).split(",")
    optional = PYPROJECT["project"]["optional-dependencies"]
    installed = {requirement for extra in extras for requirement in optional[extra]}
    assert "scikit-learn" in installed  # the digits dataset of dfs-train
