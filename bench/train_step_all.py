"""The training-step benchmark over every CNN of the package, both layouts, eager and compiled.

    python bench/train_step_all.py                        # CPU: VGG7-64, ResNet-18, MSDNet, VGG16-64
    python bench/train_step_all.py --models vgg7 resnet18 --iterations 20

Each configuration is one ``bench/train_step.py`` run (its variants interleaved, so every ratio comes
from one run) in a process of its own, so that one configuration's compiled graphs and allocator state
cannot slow the next. Every run's JSON goes to ``--output-dir``, with ``summary.json``, ``summary.md``
(the table the README quotes) and ``summary.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
import train_step  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

# CPU-sized batches: the batch 64 for the CIFAR networks; VGG16-64 sees 224x224 ImageNet images.
DEFAULT_BATCH = {"vgg7": 64, "resnet18": 64, "msdnet": 64, "vgg16": 4}
LAYOUTS = {"channels_last": "--channels-last", "nchw": "--no-channels-last"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_BATCH), choices=sorted(DEFAULT_BATCH))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=sorted(LAYOUTS))
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    parser.add_argument("--iterations", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--output-dir", type=Path,
                        default=BENCH_DIR / "results" / f"train_step_all_cpu_{datetime.date.today():%Y%m%d}")
    return parser.parse_args(argv)


def row_of(model: str, layout: str, mode: str, record: dict) -> dict:
    """The figures one configuration contributes to the summary (the largest batch of its run)."""
    run = record["runs"][-1]
    dsn = run["variants"]["dsn"]
    row = {"model": model, "layout": layout, "mode": mode, "batch": run["batch_size"],
           "dsn_ms": dsn.get("median_step_s", float("nan")) * 1e3, "d_ms": (run.get("input_grad_time_s") or 0) * 1e3}
    entry = run.get("dfs", {}).get("dfs:aten")
    if entry:
        variant = run["variants"]["dfs:aten"]
        row |= {"dfs_ms": variant["median_step_s"] * 1e3, "r_ideal": entry["r_ideal"], "r_measured": entry["r_measured"],
                "r_measured_paired": entry["r_measured_paired"], "gap": entry["gap"],
                "fps_gain": 1 / entry["r_measured"] - 1, "vs_dfs_eager": entry.get("speedup_vs_dfs_eager"),
                "memory_vs_dsn": (variant["peak_memory_bytes"] / dsn["peak_memory_bytes"]
                                  if variant.get("peak_memory_bytes") and dsn.get("peak_memory_bytes") else None)}
    return row


def markdown(rows: list[dict], environment: dict) -> str:
    device = environment["device"]
    lines = [f"CPU: {device.get('cpu')} ({device.get('cpu_capability')}), {device['threads']} threads; "
             f"torch {environment['versions']['torch']}; beta 0.5, float32, median step (ms) of interleaved variants",
             "",
             "| model | layout | mode | batch | dsn ms | dfs:aten ms | R_ideal | R_measured | gap | FPS gain "
             "| vs dfs_eager | peak mem vs dsn |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['layout']} | {row['mode']} | | failed: {row['error'][:80]} "
                         "| | | | | | | |")
            continue
        if "r_measured" not in row:
            lines.append(f"| {row['model']} | {row['layout']} | {row['mode']} | {row['batch']} | {row['dsn_ms']:.1f} "
                         "| n/a | | | | | | |")
            continue
        eager = row["vs_dfs_eager"]
        memory = row["memory_vs_dsn"]
        lines.append(
            f"| {row['model']} | {row['layout']} | {row['mode']} | {row['batch']} | {row['dsn_ms']:.1f} "
            f"| {row['dfs_ms']:.1f} | {row['r_ideal']:.3f} | {row['r_measured']:.3f} | {row['gap']:+.3f} "
            f"| {row['fps_gain'] * 100:+.1f}% | " + (f"{eager * 100:+.1f}%" if eager is not None else "n/a")
            + " | " + (f"{memory:.3f}" if memory is not None else "n/a") + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if "r_measured" in row]
    if not measured:
        return
    labels = [f"{row['model']}\n{row['layout']}\n{row['mode']}" for row in measured]
    positions = range(len(measured))
    figure, axis = plt.subplots(figsize=(max(6, 0.9 * len(measured)), 4.5))
    axis.bar([p - 0.2 for p in positions], [row["r_ideal"] for row in measured], 0.4, label="R_ideal")
    axis.bar([p + 0.2 for p in positions], [row["r_measured"] for row in measured], 0.4, label="R_measured (dfs:aten)")
    axis.axhline(1.0, color="k", linewidth=0.8)
    axis.set_xticks(list(positions), labels, fontsize=7)
    axis.set_ylim(min(0.7, min(row["r_measured"] for row in measured) - 0.05), 1.1)
    axis.set_ylabel("T_dfs / T_dsn")
    axis.legend()
    axis.set_title("DFS training step against DSN, CPU, beta 0.5")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    configs = [(model, layout, mode) for model in args.models for layout in args.layouts for mode in args.modes]
    rows, environment = [], None
    progress = tqdm(configs, desc="configurations", unit="run", file=sys.stderr) if tqdm else configs
    for model, layout, mode in progress:
        output = args.output_dir / f"{model}_{layout}_{mode}.json"
        command = [sys.executable, str(BENCH_DIR / "train_step.py"), "--model", model, "--batch-sizes",
                   str(DEFAULT_BATCH[model]), "--iterations", str(args.iterations), LAYOUTS[layout],
                   "--output", str(output)] + (["--compile"] if mode == "compiled" else [])
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            error = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["failed"])[-1]
        except subprocess.TimeoutExpired:
            error = f"timed out after {args.timeout:.0f} s"
        if error is None:
            record = json.loads(output.read_text())
            environment = environment or {"device": record["device"], "versions": record["versions"]}
            row = row_of(model, layout, mode, record)
        else:
            row = {"model": model, "layout": layout, "mode": mode, "error": error}
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"benchmark": "train_step_all", "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
               **(environment or {}), "iterations": args.iterations, "rows": rows}
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if environment:
        (args.output_dir / "summary.md").write_text(markdown(rows, environment))
        print(markdown(rows, environment))
    try:
        plot(rows, args.output_dir / "summary.png")
    except ImportError:
        print("matplotlib is not installed: no summary.png")
    return rows


if __name__ == "__main__":
    main()
