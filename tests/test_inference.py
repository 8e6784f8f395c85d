"""Inference: threshold fitting and budgeted evaluation on hand-made confidences, cumulative exit FLOPs,
the early-exit runner against the simulated evaluation (decisions and FLOPs), and the dfs-anytime program."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from dfs_kernels import inference
from dfs_kernels.cli import anytime
from dfs_kernels.inference import ExitOutputs
from dfs_kernels.models import build_model, summary
from dfs_kernels.training.trainer import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INF = math.inf

# --- thresholds and budgeted evaluation -------------------------------------------------------------


def test_geometric_exit_fractions():
    torch.testing.assert_close(inference.geometric_exit_fractions(0.5, 3),
                               torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))
    torch.testing.assert_close(inference.geometric_exit_fractions(1.0, 4), torch.full((4,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="positive"):
        inference.geometric_exit_fractions(0.0, 3)


def test_thresholds_give_the_intended_exit_counts():
    # 8 samples, 4 / 2 / 2 meant to leave at exits 1 / 2 / 3. Samples 0 and 1 are the most confident at
    # exit 2 but have left at exit 1: exit 2's threshold is taken among the samples still there.
    confidences = torch.tensor([
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2],
        [0.99, 0.98, 0.1, 0.2, 0.3, 0.7, 0.6, 0.5],
        [0.5] * 8,
    ], dtype=torch.float64)
    thresholds = inference.fit_thresholds(confidences, torch.tensor([0.5, 0.25, 0.25]))
    assert thresholds.tolist() == [0.6, 0.6, -INF]
    assert inference.assign_exits(confidences, thresholds).tolist() == [0, 0, 0, 0, 2, 1, 1, 2]


def test_a_tie_that_lets_extra_samples_out_is_made_up_at_the_next_exit():
    # 1 / 1 / 2 of 4 meant for exits 1 / 2 / 3; two samples tie at exit 1, so both leave and exit 2,
    # whose cumulative target (2) is already met, lets nobody out (+inf).
    confidences = torch.tensor([[0.9, 0.9, 0.1, 0.2], [0.1, 0.2, 0.9, 0.8], [0.5] * 4], dtype=torch.float64)
    thresholds = inference.fit_thresholds(confidences, torch.tensor([0.25, 0.25, 0.5]))
    assert thresholds.tolist() == [0.9, INF, -INF]
    assert inference.assign_exits(confidences, thresholds).tolist() == [0, 0, 2, 2]


def test_accuracy_and_average_flops_by_hand():
    outputs = ExitOutputs(
        confidences=torch.tensor([[0.9, 0.4, 0.6, 0.2], [0.3, 0.3, 0.3, 0.3]], dtype=torch.float64),
        predictions=torch.tensor([[1, 0, 2, 3], [1, 1, 2, 0]]),
        labels=torch.tensor([1, 1, 0, 0]),
    )
    # exits [1, 2, 1, 2]: predictions 1 (right), 1 (right), 2 (wrong), 0 (right)
    result = inference.evaluate_thresholds(outputs, torch.tensor([0.5, -INF]), [10, 30])
    assert result.accuracy == 75.0
    assert result.average_flops == (10 + 30 + 10 + 30) / 4
    assert result.exit_counts == [2, 2]
    assert inference.anytime_accuracy(outputs) == [25.0, 75.0]


def test_budget_sweep_counts_and_monotone_validation_cost():
    generator = torch.Generator().manual_seed(0)
    num_exits, n = 5, 203

    def outputs():  # distinct random confidences: no ties
        return ExitOutputs(torch.rand(num_exits, n, generator=generator, dtype=torch.float64),
                           torch.randint(0, 3, (num_exits, n), generator=generator),
                           torch.randint(0, 3, (n,), generator=generator))

    flops = [10, 25, 45, 70, 100]
    val, test = outputs(), outputs()
    points = inference.budget_curve(val, test, flops)
    assert [point.p for point in points] == list(inference.DEFAULT_PS)
    for point in points:
        intended = n * inference.geometric_exit_fractions(point.p, num_exits)
        assert all(abs(count - want) < 1 for count, want in zip(point.val.exit_counts, intended.tolist()))
        assert sum(point.test.exit_counts) == n
    val_costs = [point.val.average_flops for point in points]
    assert all(later >= earlier for earlier, later in zip(val_costs, val_costs[1:]))
    assert val_costs[0] < 20 and val_costs[-1] > 70  # the sweep spans small to large budgets


# --- FLOPs ------------------------------------------------------------------------------------------


def test_exit_flops_are_cumulative_and_those_of_the_summary():
    model = build_model("vgg7", num_classes=10, flavour="dsn").eval()
    flops = inference.exit_flops(model)
    assert flops == [cost["flops"] for cost in summary.exit_costs(model)]
    # exit 1: conv 3->64 and Linear(64, 10); exit 2 adds conv 64->64 and another Linear(64, 10), at 32x32
    assert flops[0] == 2 * (32 * 32 * 64 * 3 * 9 + 64 * 10)
    assert flops[1] - flops[0] == 2 * (32 * 32 * 64 * 64 * 9 + 64 * 10)
    assert all(later > earlier for earlier, later in zip(flops, flops[1:]))

    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        _, forward = inference.count_flops(model, lambda: model(images))
    _, all_first = inference.count_flops(model, lambda: inference.early_exit_predict(model, images, [-INF] * 6))
    _, all_last = inference.count_flops(model, lambda: inference.early_exit_predict(model, images, [INF] * 6))
    assert forward == all_last == 3 * flops[-1]
    assert all_first == 3 * flops[0]


def test_flops_are_not_counted_through_partitioned_convolutions():
    with pytest.raises(ValueError, match="dsn"):
        inference.exit_flops(build_model("vgg7", num_classes=10, flavour="dfs"))


# --- early-exit runner ------------------------------------------------------------------------------


def separated_thresholds(confidences: torch.Tensor, p: float) -> torch.Tensor:
    """Fitted thresholds moved down to midway to the next lower confidence of their exit: the same
    decisions, with a margin against rounding differences between full and compacted batches."""
    thresholds = inference.fit_thresholds(confidences, inference.geometric_exit_fractions(p, len(confidences)))
    for k, threshold in enumerate(thresholds[:-1].tolist()):
        below = confidences[k][confidences[k] < threshold]
        if math.isfinite(threshold) and below.numel():
            thresholds[k] = (threshold + below.max()) / 2
    return thresholds


@pytest.mark.parametrize("name, kwargs", [
    ("vgg7", {"flavour": "dsn"}),
    ("vgg7", {"flavour": "dfs"}),
    ("vgg7", {"flavour": "dfs_eager"}),
    ("resnet18", {"flavour": "dsn"}),
    ("msdnet", {"flavour": "dsn", "growth_rate": 2}),
    ("msdnet", {"flavour": "dfs", "growth_rate": 2}),
])
def test_early_exit_runner_matches_the_simulated_evaluation(name, kwargs):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs).eval()
    images, labels = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    simulated = inference.collect_exit_outputs(model, TensorDataset(images, labels))
    thresholds = separated_thresholds(simulated.confidences, 1.0)
    expected_exits = inference.assign_exits(simulated.confidences, thresholds)
    assert len(expected_exits.unique()) >= 3

    run = lambda: inference.early_exit_predict(model, images, thresholds.tolist())  # noqa: E731
    result = run()
    assert torch.equal(result.exits, expected_exits)
    assert torch.equal(result.predictions, simulated.predictions.gather(0, expected_exits[None]).squeeze(0))

    if kwargs["flavour"] == "dsn":  # FlopCounterMode cannot see inside the DFS flavours' ops
        _, counted = inference.count_flops(model, run)
        flops = inference.exit_flops(model)
        assert counted == sum(flops[k] for k in expected_exits.tolist())
        simulated_cost = inference.evaluate_thresholds(simulated, thresholds, flops).average_flops
        assert counted == pytest.approx(simulated_cost * len(images), rel=1e-12)


# --- dfs-anytime (dfs_kernels.cli.anytime) ------------------------------------------------------------------------------


@pytest.mark.slow
def test_anytime_cli_on_two_runs(tmp_path):
    runs = []
    for strategy in ("dsn", "dfs"):
        out = str(tmp_path / strategy)
        train(TrainConfig(model="vgg7", strategy=strategy, dataset="synthetic", synthetic_samples=32, epochs=1,
                          batch_size=16, out=out, progress=False))
        runs.append(out)
    prefix = str(tmp_path / "results" / "anytime")
    command = [sys.executable, "-m", "dfs_kernels.cli.anytime", *runs, "--out", prefix,
               "--runner-p", "0.5", "1.5", "--repeats", "1", "--no-progress"]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert completed.returncode == 0, completed.stderr

    with open(prefix + ".json") as handle:
        result = json.load(handle)
    assert result["machine"]["torch"] == torch.__version__ and result["machine"]["cpu"]
    assert [run["strategy"] for run in result["runs"]] == ["dsn", "dfs"]
    for run in result["runs"]:
        assert run["threshold_split"] == "val" and run["test_samples"] == 16
        flops = [exit["flops"] for exit in run["exits"]]
        assert len(flops) == 6 and flops == sorted(flops)
        assert [point["p"] for point in run["budgeted"]] == list(inference.DEFAULT_PS)
        assert all(sum(point["test"]["exit_counts"]) == 16 for point in run["budgeted"])
        assert [record["p"] for record in run["early_exit"]] == [0.5, 1.5]
        for record in run["early_exit"]:
            assert record["same_decisions"] == 1.0
            assert record["counted_flops_per_image"] == pytest.approx(record["simulated_average_flops"])
            assert record["speedup"] > 0 and record["thresholds"][-1] == "-inf"
    with open(prefix + ".png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "dfs (dfs): vgg7 on synthetic" in completed.stdout


def test_anytime_cli_fits_thresholds_on_held_out_train_images_without_a_val_split():
    empty = TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long))
    train_set = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10))
    subset, description = anytime.threshold_split(SimpleNamespace(train=train_set, val=empty), holdout=4)
    assert torch.equal(subset.tensors[1], torch.arange(6, 10)) and description.startswith("train[-4:]")
