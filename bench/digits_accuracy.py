"""Accuracy of the transformer models on digits: DSN against DFS, mean and standard deviation over seeds.

    python bench/digits_accuracy.py                      # vit_tiny_digits and bert_tiny_digits, 3 seeds
    python bench/digits_accuracy.py --models vit_tiny_digits --seeds 0 1 2 3 4 --epochs 10

Each run is ``dfs_kernels.training.trainer.train`` on the digits split of its seed (AdamW, one lr drop as
the recipe's milestones scaled to the epochs); DSN and DFS runs of one seed share the split and the
initial weights. Writes a JSON (every run's per-exit test accuracy, and their mean and std) and a PNG
to bench/results/, rewriting both after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
try:
    import dfs_kernels  # noqa: F401
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(BENCH_DIR.parent))
import torch  # noqa: E402

from dfs_kernels.training.trainer import TrainConfig, train  # noqa: E402

STRATEGIES = ("dsn", "dfs")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_digits", "bert_tiny_digits"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (these models are small: more threads mostly wait on each other)")
    parser.add_argument("--output", type=Path, help="JSON path (default: bench/results/digits_accuracy_<time>.json)")
    return parser.parse_args(argv)


def summarize(runs: list[dict]) -> dict:
    """Per model and strategy: mean and std (over seeds) of each exit's final test accuracy."""
    summary = {}
    for run in runs:
        summary.setdefault(run["model"], {}).setdefault(run["strategy"], []).append(run["test_acc"])
    return {model: {strategy: {"mean": [statistics.mean(v) for v in zip(*accs)],
                               "std": [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*accs)],
                               "seeds": len(accs)}
                    for strategy, accs in by_strategy.items()}
            for model, by_strategy in summary.items()}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 4), squeeze=False)
    for axis, (model, by_strategy) in zip(axes[0], summary.items()):
        for offset, (strategy, stats) in zip((-0.2, 0.2), by_strategy.items()):
            exits = range(1, len(stats["mean"]) + 1)
            axis.bar([k + offset for k in exits], stats["mean"], 0.4, yerr=stats["std"], capsize=3,
                     label=f"{strategy} (n={stats['seeds']})")
        lowest = min(m - d for stats in by_strategy.values() for m, d in zip(stats["mean"], stats["std"]))
        axis.set_ylim(max(0.0, lowest - 5), 100)
        axis.set_xticks(list(exits))
        axis.set_title(model)
        axis.set_xlabel("exit")
        axis.set_ylabel("test accuracy (%)")
        axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    output = args.output or BENCH_DIR / "results" / f"digits_accuracy_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    runs_dir = tempfile.mkdtemp(prefix="digits_accuracy_")  # checkpoints, not kept
    record = {"benchmark": "digits_accuracy", "config": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": []}
    for model in args.models:
        for seed in args.seeds:
            for strategy in STRATEGIES:
                started = time.perf_counter()
                config = TrainConfig(model=model, strategy=strategy, dataset="digits", epochs=args.epochs,
                                     batch_size=args.batch_size, lr=args.lr, optimizer="adamw", beta=args.beta,
                                     seed=seed, device="cpu", progress=False,
                                     out=f"{runs_dir}/{model}_{strategy}_{seed}")
                result = train(config)
                record["runs"].append({"model": model, "strategy": strategy, "seed": seed,
                                       "test_acc": result["epochs"][-1]["test_acc"],
                                       "seconds": time.perf_counter() - started})
                print(f"{model} {strategy} seed {seed}: test % {record['runs'][-1]['test_acc']} "
                      f"({record['runs'][-1]['seconds']:.0f} s)", flush=True)
                record["summary"] = summarize(record["runs"])
                output.write_text(json.dumps(record, indent=1))
                plot(record["summary"], output.with_suffix(".png"))
    for model, by_strategy in record["summary"].items():
        for strategy, stats in by_strategy.items():
            print(f"{model:<18}{strategy:<5}" + "  ".join(f"{m:5.1f} ± {s:3.1f}"
                                                         for m, s in zip(stats["mean"], stats["std"])))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return record


if __name__ == "__main__":
    main()
