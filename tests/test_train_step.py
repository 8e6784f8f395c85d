"""Smoke test of bench/train_step.py: a tiny run end to end, checking the JSON record it writes."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import dfs_kernels

BENCH = Path(__file__).resolve().parents[1] / "bench" / "train_step.py"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("bench_train_step", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_tiny_run_writes_every_field(train_step, tmp_path, capsys):
    output = tmp_path / "record.json"
    train_step.main(["--model", "vgg7", "--batch-sizes", "2", "4", "--iterations", "2", "--warmup", "0",
                     "--output", str(output)])
    record = json.loads(output.read_text())

    assert record["device"]["type"] == "cpu"
    assert record["versions"]["torch"] and "extension_loaded" in record["versions"]
    assert record["config"]["model"] == "vgg7" and record["config"]["beta"] == 0.5
    expected = {"dsn", train_step.DSN_WITHOUT_INPUT_GRADS, "dfs_eager"}
    expected |= {f"dfs:{backend}" for backend in dfs_kernels.available_backends("cpu")}
    assert [run["batch_size"] for run in record["runs"]] == [2, 4]
    for run in record["runs"]:
        assert set(run["variants"]) == expected
        for variant in run["variants"].values():
            assert variant["error"] is None
            for key in ("forward_s", "backward_s", "other_s", "step_s"):
                assert len(variant[key]) == 2 and all(seconds > 0 for seconds in variant[key])
            assert variant["fps"] > 0 and variant["peak_memory_bytes"] > 0
        assert "input_grad_time_s" in run
        assert set(run["dfs"]) == expected - {"dsn", train_step.DSN_WITHOUT_INPUT_GRADS}
        for entry in run["dfs"].values():
            assert {"r_ideal", "r_measured", "gap", "saving_realized"} <= entry.keys()
        assert all("speedup_vs_dfs_eager" in run["dfs"][f"dfs:{b}"] for b in dfs_kernels.available_backends("cpu"))
    assert set(record["linear_fit"]) == expected
    assert all({"slope", "intercept", "r2"} == fit.keys() for fit in record["linear_fit"].values())

    printed = capsys.readouterr().out
    assert "R_ideal" in printed and "R_measured" in printed and "ms / image" in printed
    # The closing verdict names the fastest DFS variant at the largest batch, and its share of the ideal.
    fastest = min((label for label in record["runs"][-1]["dfs"] if label.startswith("dfs:")),
                  key=lambda label: record["runs"][-1]["dfs"][label]["r_measured"])
    assert record["verdict"].startswith(f"verdict (batch 4): {fastest} is ")
    assert record["verdict"] in printed  # (the share of the ideal is left out where noise makes D <= 0)


def test_beta_sweep_and_plots(train_step, tmp_path):
    pytest.importorskip("matplotlib")
    output = tmp_path / "sweep.json"
    train_step.main(["--model", "vgg7", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0",
                     "--beta-sweep", "--plot", "--output", str(output)])
    record = json.loads(output.read_text())
    sweep = record["beta_sweep"]
    assert sorted({entry["beta"] for entry in sweep["dfs"].values()}) == list(train_step.BETA_SWEEP)
    assert record["linear_fit"]["dsn"] is None  # one batch size: no fit
    assert (tmp_path / "sweep_steps.png").stat().st_size > 0
    assert (tmp_path / "sweep_beta_sweep.png").stat().st_size > 0


def test_linear_fit(train_step):
    fit = train_step.linear_fit([1, 2, 4], [3.0, 5.0, 9.0])
    assert fit == pytest.approx({"slope": 2.0, "intercept": 1.0, "r2": 1.0})
    assert train_step.linear_fit([8, 8], [1.0, 2.0]) is None


def test_transformers_measure_the_partitioned_linear_layers(train_step, tmp_path):
    output = tmp_path / "bert.json"
    train_step.main(["--model", "bert_tiny", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0",
                     "--optimizer", "adamw", "--output", str(output)])
    run = json.loads(output.read_text())["runs"][0]
    assert train_step.DSN_WITHOUT_INPUT_GRADS in run["variants"]
    assert all(variant["error"] is None for variant in run["variants"].values())
    assert run["input_grad_time_s"] is not None and run["dfs"]

    # the official ViT placement partitions no GEMM: D = 0, R_ideal = 1
    train_step.main(["--model", "vit_tiny", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0",
                     "--output", str(output)])
    run = json.loads(output.read_text())["runs"][0]
    assert train_step.DSN_WITHOUT_INPUT_GRADS not in run["variants"]
    assert run["input_grad_time_s"] == 0.0
    assert all(entry["r_ideal"] == 1.0 for entry in run["dfs"].values())


def test_linear_without_input_grad_keeps_the_parameter_gradients(train_step):
    import torch

    linear = torch.nn.Linear(6, 5)
    skipped = train_step.without_input_grads(torch.nn.Sequential(torch.nn.Linear(6, 5)), ["0"])
    skipped[0].weight, skipped[0].bias = linear.weight, linear.bias
    x = torch.randn(3, 4, 6, requires_grad=True)
    expected = torch.autograd.grad(linear(x).square().sum(), (linear.weight, linear.bias))
    x_grad, *parameter_grads = torch.autograd.grad(skipped(x).square().sum(), (x, linear.weight, linear.bias))
    assert torch.count_nonzero(x_grad) == 0
    for actual, wanted in zip(parameter_grads, expected):
        torch.testing.assert_close(actual, wanted)


def test_layout_defaults_to_channels_last_and_the_run_states_its_settings(train_step, tmp_path, capsys):
    import torch

    assert train_step.parse_args(["--model", "vgg7"]).channels_last is True
    assert train_step.parse_args(["--model", "vgg7", "--no-channels-last"]).channels_last is False
    output = tmp_path / "nchw.json"
    train_step.main(["--model", "vgg7", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0",
                     "--no-channels-last", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["config"]["channels_last"] is False
    assert record["device"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["device"]["cpu"]
    printed = capsys.readouterr().out
    assert "settings: layout NCHW (--no-channels-last)" in printed
    assert f"{torch.get_num_threads()} threads" in printed and "Recommended on CPU: channels_last" in printed


def test_dsn_without_input_grads_keeps_the_weight_gradient_and_zeros_the_input_one(train_step):
    import torch
    from torch import nn

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    skipped = train_step._without_input_grad(conv)
    for module in (skipped, torch.compile(skipped, backend="aot_eager", fullgraph=True)):
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        grads = torch.autograd.grad(module(x).square().sum(), (x, conv.weight))
        x_ref = x.detach().requires_grad_()
        expected = torch.autograd.grad(conv(x_ref).square().sum(), conv.weight)[0]
        assert torch.equal(grads[0], torch.zeros_like(x))
        torch.testing.assert_close(grads[1], expected)
    # The zeros come from an opaque op, so a compiler cannot fold them into the ops that consume them.
    assert isinstance(train_step.zeros_like_opaque, torch._library.custom_ops.CustomOpDef)


def test_train_step_all_summarizes_a_committed_record():
    """The matrix driver's row and table come from one train_step record: check them against its figures."""
    spec = importlib.util.spec_from_file_location("bench_train_step_all", BENCH.with_name("train_step_all.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    record_path = BENCH.parent / "results" / "train_step_all_cpu_20261203" / "vgg7_channels_last_eager.json"
    record = json.loads(record_path.read_text())
    row = module.row_of("vgg7", "channels_last", "eager", record)
    run = record["runs"][-1]
    entry = run["dfs"]["dfs:aten"]
    assert row["batch"] == run["batch_size"] == 64
    assert row["r_measured"] == entry["r_measured"] and row["r_ideal"] == entry["r_ideal"]
    assert row["fps_gain"] == pytest.approx(1 / entry["r_measured"] - 1)
    table = module.markdown([row, {"model": "msdnet", "layout": "nchw", "mode": "compiled", "error": "boom"}],
                            {"device": record["device"], "versions": record["versions"]})
    assert f"| vgg7 | channels_last | eager | 64 | {row['dsn_ms']:.1f} |" in table
    assert "failed: boom" in table and record["device"]["cpu_capability"] in table


SMALL_HF_RESNET = ('{"embedding_size": 8, "hidden_sizes": [8, 16, 24], "depths": [1, 1, 1], '
                   '"layer_type": "basic"}')
SMALL_HF_BERT = ('{"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 37, '
                 '"vocab_size": 100}')


def test_library_model_without_input_grads_swaps_the_layers_its_dfs_wrapper_partitions(train_step):
    pytest.importorskip("transformers")
    args = train_step.parse_args(["--model", "hf:resnet", "--exits", "resnet.encoder.stages.0,resnet.encoder.stages.1",
                                  "--model-kwargs", SMALL_HF_RESNET, "--image-size", "16", "--device", "cpu"])
    variants, _ = train_step.build_variants(args, [0.5])
    by_label = {variant.label: variant for variant in variants}
    dfs = by_label[f"dfs:{dfs_kernels.available_backends('cpu')[0]}"].model
    skipped = by_label[train_step.DSN_WITHOUT_INPUT_GRADS].model
    swapped = {name for name, module in skipped.named_modules() if isinstance(module, train_step.ConvWithoutInputGrad)}
    assert swapped == {f"model.{name}" for names in dfs.partitioned for name in names} and swapped
    state = by_label["dsn"].model.state_dict()
    for variant in variants:  # every variant starts from the same weights, heads included
        assert all(torch.equal(value, state[key]) for key, value in variant.model.state_dict().items())


def test_library_text_model_runs_every_variant(train_step, tmp_path):
    pytest.importorskip("transformers")
    output = tmp_path / "hf_bert.json"
    train_step.main(["--model", "hf:bert", "--exits", "bert.encoder.layer.0,bert.encoder.layer.1", "--model-kwargs",
                     SMALL_HF_BERT, "--seq-len", "8", "--batch-sizes", "2", "--iterations", "1", "--warmup", "0",
                     "--output", str(output)])
    run = json.loads(output.read_text())["runs"][0]
    assert train_step.DSN_WITHOUT_INPUT_GRADS in run["variants"] and run["dfs"]
    assert all(variant["error"] is None for variant in run["variants"].values())


@pytest.mark.parametrize("options", [["--model", "hf:bert"], ["--model", "vgg7", "--exits", "layers.0"],
                                     ["--model", "keras:bert", "--exits", "a"]])
def test_library_options_are_checked(train_step, options):
    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(options)
    assert exit_info.value.code == 2
