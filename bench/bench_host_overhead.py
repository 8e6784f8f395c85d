"""Microbenchmark: the host cost of one DFS call against the PyTorch call it replaces.

At tiny shapes a call is almost all host work (Python, dispatcher, autograd bookkeeping), so the
difference between a DFS module and its PyTorch counterpart is the overhead DFS adds; at a realistic
shape the same difference shows whether that overhead still matters next to the kernels.

    python -m pytest bench/bench_host_overhead.py --benchmark-only     # pytest-benchmark tables
    PYTHONPATH=$PWD python bench/bench_host_overhead.py --out bench/results/host_overhead_cpu_<date>/after.json \
        [--before .../before.json]                                      # JSON + summary.md + bar plot

Pairs (each timed as fwd+bwd, ``out.backward(grad)`` with the input requiring grad, and as a forward
under ``torch.no_grad()``), on the "aten" backend, one thread:

- ``PartitionedConv2d`` vs ``nn.Conv2d`` (3x3, padding 1): x [1, 8, 4, 4] 8 -> 8 and x [32, 64, 32, 32] 64 -> 64.
- ``PartitionedLinear`` vs ``nn.Linear``: x [1, 16, 8] 8 -> 8 and x [32, 128, 256] 256 -> 256.
- ``functional.reroute`` vs the literal ``cat([x+, sg(x-)]), cat([sg(x+), x-])``: x [1, 8, 4, 4] and
  x [32, 64, 32, 32], Cp = C / 2.

The script mode times the pairs interleaved (PyTorch, DFS, PyTorch, ...) so that other load on the
machine hits both alike, and keeps the minimum over rounds of the mean per call: the host cost
without the machine's noise. Targets (issue 19): fwd+bwd within +10 us of PyTorch at the tiny shapes,
no-grad forward within +2 us, reroute no slower than the literal split.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import subprocess
import time
from collections.abc import Callable

import torch

import dfs_kernels
from _timing import cpu_model
from dfs_kernels import functional

TARGET_US = {"fwd+bwd": 10.0, "no-grad fwd": 2.0}
PHASES = ("fwd+bwd", "no-grad fwd")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tiny: bool
    build: Callable[[torch.device], dict[str, Callable[[torch.Tensor], object]]]  # {"pytorch": f, "dfs": f}
    shape: tuple[int, ...]


def _conv(c_in: int, c_out: int):
    def build(device):
        torch.manual_seed(0)
        plain = torch.nn.Conv2d(c_in, c_out, 3, padding=1, device=device)
        dfs = dfs_kernels.PartitionedConv2d.from_conv(plain, beta=0.5, backend="aten")
        return {"pytorch": plain, "dfs": dfs}
    return build


def _linear(features: int):
    def build(device):
        torch.manual_seed(0)
        plain = torch.nn.Linear(features, features, device=device)
        dfs = dfs_kernels.PartitionedLinear.from_linear(plain, beta=0.5, backend="aten")
        return {"pytorch": plain, "dfs": dfs}
    return build


def _reroute(channels: int):
    cp = channels // 2

    def literal(x):
        shared, referenced = x[:, :cp], x[:, cp:]
        return torch.cat([shared, referenced.detach()], 1), torch.cat([shared.detach(), referenced], 1)

    def build(device):
        return {"pytorch": literal, "dfs": lambda x: functional.reroute(x, cp, backend="aten")}
    return build


CASES = (
    Case("conv 3x3 8->8", True, _conv(8, 8), (1, 8, 4, 4)),
    Case("linear 8->8", True, _linear(8), (1, 16, 8)),
    Case("reroute C=8 Cp=4", True, _reroute(8), (1, 8, 4, 4)),
    Case("conv 3x3 64->64", False, _conv(64, 64), (32, 64, 32, 32)),
    Case("linear 256->256", False, _linear(256), (32, 128, 256)),
    Case("reroute C=64 Cp=32", False, _reroute(64), (32, 64, 32, 32)),
)


def _outputs(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def call(fn: Callable, x: torch.Tensor, phase: str) -> Callable[[], object]:
    """One timed call of ``fn`` on ``x``: forward and backward, or a no-grad forward."""
    if phase == "no-grad fwd":
        def forward():
            with torch.no_grad():
                return fn(x)
        return forward
    x = x.detach().requires_grad_()
    grads = tuple(torch.ones_like(out) for out in _outputs(fn(x)))

    def forward_backward():
        torch.autograd.backward(_outputs(fn(x)), grads)
    return forward_backward


def mean_us(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Microseconds per call of ``calls`` calls in a row; on GPU the calls are queued and synchronized
    once, so a call costs its host time wherever the device waits on the host (tiny shapes)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / calls * 1e6


def measure_pair(fns: dict[str, Callable[[], object]], rounds: int, calls: int, device: torch.device) -> dict:
    """{name: us per call}: the minimum over ``rounds`` interleaved rounds of the mean of ``calls`` calls."""
    for fn in fns.values():  # warm-up: first-call registrations, oneDNN primitive caches
        mean_us(fn, max(2, calls // 10), device)
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best[name], mean_us(fn, calls, device))
    return best


def measure(rounds: int, tiny_calls: int, large_calls: int, device: torch.device, tiny_only: bool = False) -> list[dict]:
    """[{case, shape, phase, pytorch_us, dfs_us}] of every case (the tiny ones with ``tiny_only``):
    ``measure_pair`` with ``tiny_calls`` calls (``large_calls`` at the realistic shapes)."""
    rows = []
    for case in CASES:
        if tiny_only and not case.tiny:
            continue
        x = torch.randn(case.shape, device=device)
        impls = case.build(device)
        for phase in PHASES:
            fns = {name: call(fn, x, phase) for name, fn in impls.items()}
            best = measure_pair(fns, rounds, tiny_calls if case.tiny else large_calls, device)
            rows.append({"case": case.name, "shape": list(case.shape), "tiny": case.tiny, "phase": phase,
                         "pytorch_us": best["pytorch"], "dfs_us": best["dfs"]})
            print(f"{case.name:22s} {phase:12s} pytorch {best['pytorch']:10.1f} us   dfs {best['dfs']:10.1f} us")
    return rows


# --- pytest-benchmark ------------------------------------------------------------------------------


def _benchmark_params():
    import pytest

    return [pytest.param(case, impl, phase, id=f"{case.name}-{impl}-{phase}")
            for case in CASES for phase in PHASES for impl in ("pytorch", "dfs")]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize(("case", "impl", "phase"), _benchmark_params())


def test_host_overhead(benchmark, case, impl, phase):
    torch.set_num_threads(1)
    fn = call(case.build(torch.device("cpu"))[impl], torch.randn(case.shape), phase)
    benchmark.group = f"{case.name} {phase}"
    benchmark(fn)


# --- script: JSON, summary, plot -------------------------------------------------------------------


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _verdict(row: dict) -> str:
    delta = row["dfs_us"] - row["pytorch_us"]
    if row["case"].startswith("reroute"):
        return "met" if delta <= 0 else "not met"
    return "met" if delta <= TARGET_US[row["phase"]] else "not met"


def write_summary(record: dict, before: dict | None, path: pathlib.Path) -> None:
    earlier = {(r["case"], r["phase"]): r for r in before["results"]} if before else {}
    lines = [
        f"# Host overhead per call, {record['date']}",
        "",
        f"{record['cpu']}, torch {record['torch']}, {record['threads']} thread, ATen CPU capability "
        f"{record['capability']}, commit {record['commit']}. Minimum over {record['rounds']} interleaved rounds "
        "of the mean per call (`python bench/bench_host_overhead.py`).",
        "",
        "| case | phase | PyTorch us | DFS us | DFS - PyTorch us | DFS / PyTorch |"
        + (" before: PyTorch us | before: DFS us | before: DFS / PyTorch |" if earlier else "")
        + " target (tiny shapes) |",
        "|---|---|---|---|---|---|" + ("---|---|---|" if earlier else "") + "---|",
    ]
    for row in record["results"]:
        before_cells = ""
        if earlier:
            old = earlier.get((row["case"], row["phase"]))
            before_cells = (f" {old['pytorch_us']:.1f} | {old['dfs_us']:.1f} | {old['dfs_us'] / old['pytorch_us']:.2f} |"
                            if old else " - | - | - |")
        target = _verdict(row) if row["tiny"] else "-"
        lines.append(f"| {row['case']} {row['shape']} | {row['phase']} | {row['pytorch_us']:.1f} | "
                     f"{row['dfs_us']:.1f} | {row['dfs_us'] - row['pytorch_us']:+.1f} | "
                     f"{row['dfs_us'] / row['pytorch_us']:.2f} |{before_cells} {target} |")
    path.write_text("\n".join(lines) + "\n")


def plot(record: dict, before: dict | None, path: pathlib.Path) -> None:
    """DFS time / PyTorch time per call at the tiny shapes (1 = no overhead), before and after when
    an earlier record is given: a ratio, so that the machine's speed at the time cancels out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in record["results"] if row["tiny"]]
    earlier = {(r["case"], r["phase"]): r for r in before["results"]} if before else {}
    series = []
    if earlier:
        old = [earlier[(row["case"], row["phase"])] for row in rows]
        series.append(("before", [r["dfs_us"] / r["pytorch_us"] for r in old]))
    series.append(("after" if earlier else "DFS", [row["dfs_us"] / row["pytorch_us"] for row in rows]))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (label, values) in enumerate(series):
        ax.bar([j + i * width for j in range(len(rows))], values, width, label=label)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(rows))])
    ax.set_xticklabels([f"{row['case']}\n{row['phase']}" for row in rows], fontsize=8)
    ax.set_ylabel("DFS / PyTorch time per call")
    ax.set_title(f"Host overhead at tiny shapes ({record['cpu']}, {record['threads']} thread)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, required=True, help="JSON file; summary.md and the plot beside it")
    parser.add_argument("--before", type=pathlib.Path, help="an earlier JSON to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny-calls", type=int, default=400)
    parser.add_argument("--large-calls", type=int, default=3)
    parser.add_argument("--tiny-only", action="store_true", help="only the tiny shapes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = measure(args.rounds, args.tiny_calls, args.large_calls, torch.device("cpu"), args.tiny_only)
    record = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "torch": torch.__version__,
        "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "commit": _commit(), "rounds": args.rounds, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    before = json.loads(args.before.read_text()) if args.before else None
    write_summary(record, before, args.out.parent / "summary.md")
    plot(record, before, args.out.parent / "host_overhead.png")


if __name__ == "__main__":
    main()
