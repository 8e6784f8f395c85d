"""bench/gpu_check.py, the one-command GPU validation, run dry on CPU: so that the script the GPU
machine runs cannot break unseen between the rare runs it gets there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"


def run_gpu_check(out_dir: Path, *options: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), str(out_dir), "--dry-run", *options],
                            capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    record_path = out_dir / "gpu_check.json"
    assert record_path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(record_path.read_text())


@pytest.mark.slow
def test_dry_run_passes_every_phase_and_reports_every_figure(tmp_path):
    result, record = run_gpu_check(tmp_path, timeout=600)
    logs = {name: (tmp_path / entry["log"]).read_text()[-2000:]
            for name, entry in record["phases"].items() if "log" in entry}
    assert result.returncode == 0, (result.stdout[-2000:], logs)
    assert record["dry_run"] is True
    assert record["wall_s"] < record["deadline_s"]
    assert list(record["phases"]) == ["build", "correctness", "kernels", "host_overhead", "train_step"]
    for name, entry in record["phases"].items():
        assert entry["status"] == "passed", (name, entry.get("failed_checks"), logs[name])
        assert entry["seconds"] <= entry["limit_s"]
    environment = record["environment"]
    assert environment["versions"]["torch"] and environment["versions"]["extension_loaded"] is not None
    backends = [name for name in environment["backends"] if name != "reference"]
    assert backends, environment

    correctness = record["phases"]["correctness"]
    assert correctness["summary"]["failed"] == 0
    checked = {check["backend"] for check in correctness["checks"] if check["status"] == "passed"}
    assert checked == set(backends)  # every backend the device runs was compared with the oracle
    names = " ".join(check["name"] for check in correctness["checks"])
    for kind in ("conv", "fused stage", "reroute and exit pool", "cuda graph", "torch.compile"):
        assert kind in names
    for cp in ("cp=0", "cp=1", "cp=5", "cp=6"):  # 0, 1, C_in - 1, C_in
        assert cp in names

    kernels = record["phases"]["kernels"]
    ops = {(row["op"], row["variant"]) for row in kernels["rows"]}
    for backend in backends:
        assert {("forward", backend), ("input_grad", f"{backend}-shared"), ("weight_grad", backend)} <= ops
    assert {("forward", "cudnn"), ("input_grad", "cudnn-full"), ("weight_grad", "cudnn")} <= ops
    assert all(row["ms"] > 0 for row in kernels["rows"])
    ratio = kernels["summary"][kernels["modes"][0]]["input_grad"][f"{backends[0]}-shared"]["geomean_vs_cudnn"]
    assert ratio > 0

    host = record["phases"]["host_overhead"]
    assert {(row["case"], row["phase"]) for row in host["rows"]} == {
        (case, phase) for case in ("conv 3x3 8->8", "linear 8->8", "reroute C=8 Cp=4")
        for phase in ("fwd+bwd", "no-grad fwd")}
    assert all(row["pytorch_us"] > 0 and row["dfs_us"] > 0 for row in host["rows"])

    models = record["phases"]["train_step"]["models"]
    assert set(models) == {"vgg7", "resnet18"}
    for summary in models.values():
        assert {"dsn", "dfs_eager"} <= set(summary["variants"])
        for label, entry in summary["dfs"].items():
            # Figures, not bounds: at the dry run's tiny sizes D is within timing noise and may come out
            # negative (R_ideal above 1) on a loaded machine.
            assert math.isfinite(entry["r_ideal"]) and entry["r_measured"] > 0, (label, entry)
            assert entry["fps_gain_vs_dsn"] is not None

    files = set(record["files"])
    assert files == {"build.log", "correctness.log", "kernels.log", "host_overhead.log", "train_step.log",
                     "kernels.png", "train_step.png"}
    assert {path.name for path in tmp_path.iterdir()} == files | {"gpu_check.json"}  # no leftovers


def test_a_phase_over_its_limit_is_reported_and_the_run_goes_on(tmp_path):
    """Correctness gets 6 s (far less than it needs), the benchmarks none: the JSON still comes,
    with the phase marked timeout and what it checked before the limit, the others skipped."""
    result, record = run_gpu_check(tmp_path, "--limit", "correctness=6", "--limit", "kernels=0",
                                   "--limit", "host_overhead=0", "--limit", "train_step=0", timeout=300)
    assert result.returncode == 1
    phases = record["phases"]
    assert phases["build"]["status"] == "passed"
    assert phases["correctness"]["status"] == "timeout"
    assert phases["correctness"]["seconds"] < 30
    assert isinstance(phases["correctness"]["checks"], list)  # what it saved before it was stopped
    assert phases["kernels"]["status"] == phases["host_overhead"]["status"] == phases["train_step"]["status"] == "skipped"
    assert phases["kernels"]["reason"] == "its limit (0 s) is under 5 s"


@pytest.mark.parametrize("option, message", [
    ("kernels=fast", "--limit kernels=fast: the seconds must be a number, got 'fast'"),
    ("kernels=-1", "--limit kernels=-1: the seconds must be >= 0, got '-1'"),
    ("bench=10", "--limit: phase must be one of"),
])
def test_a_bad_limit_is_refused_naming_the_option(tmp_path, option, message):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--dry-run", "--limit", option],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "gpu_check.json").exists()  # refused before any phase ran
