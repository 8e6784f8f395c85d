"""Microbenchmark: the backward of one linear layer as nn.Linear (DSN) and as PartitionedLinear (DFS,
beta=0.5) on the "aten" backend, side by side in one run, for BERT-base shapes scaled to a CPU.

    PYTHONPATH=$PWD python bench/bench_linear_backward.py [--tokens 2048] [--repeats 30]

For each shape it times, interleaved round-robin so that other load on the machine hits every
variant alike: the whole backward (input, weight and bias gradients) of nn.Linear and of
PartitionedLinear, and its parts: the full input gradient ``dY @ W``, the partitioned one
(``partitioned_linear_input_grad``: ``dY @ W[:, :Cp]`` into its slice, zeros elsewhere) and the weight
gradient ``dY^T @ X``. It reports medians with the spread (median absolute deviation) as the noise,
and whether the issue's target holds: the DFS backward is faster than nn.Linear's by at least a third
of the input-gradient time (the ideal saving at beta 0.5 is half of it). Results go to
bench/results/linear_backward_cpu.json with the CPU model and ATen's CPU capability.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import torch

import dfs_kernels
from _timing import cpu_model

SHAPES = {  # name: (in_features, out_features) of BERT-base's projections
    "qkv 768->768": (768, 768),
    "ffn-in 768->3072": (768, 3072),
    "ffn-out 3072->768": (3072, 768),
}
TARGET_FRACTION = 1 / 3  # of the input-gradient time


def _variants(tokens: int, in_features: int, out_features: int, beta: float) -> dict:
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, requires_grad=True)
    plain = torch.nn.Linear(in_features, out_features)
    partitioned = dfs_kernels.PartitionedLinear.from_linear(plain, beta=beta, backend="aten")
    plain_out, partitioned_out = plain(x), partitioned(x)
    grad = torch.randn_like(plain_out)
    params = (x, plain.weight, plain.bias)
    cp = partitioned.shared_features
    return {
        "nn.Linear backward": lambda: torch.autograd.grad(plain_out, params, grad, retain_graph=True),
        "PartitionedLinear backward": lambda: torch.autograd.grad(partitioned_out, params, grad, retain_graph=True),
        "input grad, full": lambda: grad.mm(plain.weight.detach()),
        "input grad, partitioned": lambda: torch.ops.dfs_kernels.partitioned_linear_input_grad(
            grad, x.detach(), plain.weight.detach(), cp),
        "weight grad": lambda: grad.t().mm(x.detach()),
    }


def _measure(variants: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of each variant, ``repeats`` samples each, taken round-robin."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples


def _summary(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {"median_ms": 1e3 * median, "mad_ms": 1e3 * statistics.median(abs(v - median) for v in values),
            "min_ms": 1e3 * min(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="M, rows of the GEMM (batch x sequence)")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=pathlib.Path,
                        default=pathlib.Path(__file__).parent / "results" / "linear_backward_cpu.json")
    args = parser.parse_args()
    if not dfs_kernels.extension_loaded():
        raise SystemExit("the compiled ops library is not loaded: build it first (setup.py build_ext --inplace)")

    results = []
    for name, (in_features, out_features) in SHAPES.items():
        samples = _measure(_variants(args.tokens, in_features, out_features, args.beta), args.repeats, args.warmup)
        timings = {variant: _summary(values) for variant, values in samples.items()}
        plain = timings["nn.Linear backward"]["median_ms"]
        dfs = timings["PartitionedLinear backward"]["median_ms"]
        input_grad = timings["input grad, full"]["median_ms"]
        saving = plain - dfs
        row = {
            "shape": name, "tokens": args.tokens, "in_features": in_features, "out_features": out_features,
            "beta": args.beta, "timings": timings, "backward_saving_ms": saving,
            "saving_over_input_grad": saving / input_grad,
            "target_met": saving >= TARGET_FRACTION * input_grad,
        }
        results.append(row)
        print(f"{name:>18}: nn.Linear {plain:7.2f} ms  DFS {dfs:7.2f} ms  saving {saving:6.2f} ms = "
              f"{saving / input_grad:.2f} x input grad ({input_grad:.2f} ms; partitioned "
              f"{timings['input grad, partitioned']['median_ms']:.2f} ms, weight grad "
              f"{timings['weight grad']['median_ms']:.2f} ms)  target >= {TARGET_FRACTION:.2f}: "
              f"{'met' if row['target_met'] else 'NOT met'}")

    report = {
        "benchmark": "linear_backward", "device": "cpu", "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": args.repeats, "noise": "mad_ms: median absolute deviation",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
