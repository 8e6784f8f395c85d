"""Anytime and budgeted evaluation of trained multi-exit networks: a thin CLI over ``dfs_kernels.inference``.

    dfs-anytime /tmp/digits_dsn /tmp/digits_dfs --out bench/results/anytime_vgg7_digits_cpu

For each run directory written by dfs-train (DIR/last.pt): per-exit test accuracy and cumulative
FLOPs (printed); MSDNet's budgeted batch classification over p = 0.05..1.95, with thresholds fitted on
the val split, or on the last --holdout train images when the dataset has none (CIFAR-100); and the
early-exit runner at the --runner-p values: whether its decisions match the simulated evaluation, the
FLOPs it executed, and its wall-clock speed-up over the plain forward (all exits, full batches).
Writes OUT.json and OUT.png (every run on one plot).

The model runs in the "dsn" flavour whatever flavour it was trained in: one state_dict loads into all
flavours and their forwards are the same computation, and FlopCounterMode can count this one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
from dataclasses import asdict

import torch

from dfs_kernels import inference
from dfs_kernels.models import build_model, zoo
from dfs_kernels.multi_exit import MultiExitModel
from dfs_kernels.training.checkpoint import load_checkpoint, restore_model
from dfs_kernels.training.data import load_dataset
from dfs_kernels.training.distributed import check_device

from ._common import HelpFormatter


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dfs-anytime", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="directories holding last.pt")
    parser.add_argument("--out", default="anytime", help="writes OUT.json and OUT.png")
    parser.add_argument("--batch-size", type=int, default=256, help="inference batch size")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="train images (the last ones) to fit thresholds on when there is no val split")
    parser.add_argument("--runner-p", type=float, nargs="+", default=[0.5, 1.0, 1.5],
                        help="p of the budgets at which the early-exit runner is checked and timed")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (medians are reported)")
    parser.add_argument("--timing-samples", type=int, default=1024, help="test images per timed pass")
    parser.add_argument("--data-dir", default=None, help="where the datasets are (default: each run's data_dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    args = parser.parse_args(argv)
    try:
        args.device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as error:
        parser.error(str(error))
    return args


def machine(device: torch.device) -> dict:
    """Where the timings were taken."""
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average_1min": os.getloadavg()[0],  # taken before starting: other work skews the timings
    }


def load_run(run_dir: str, device: torch.device, datasets: dict, data_dir: str | None):
    """(config, eval-mode "dsn" model with the run's weights, dataset splits); ``datasets`` caches splits."""
    path = os.path.join(run_dir, "last.pt")
    state = load_checkpoint(path, required=("model", "config"))
    config = state["config"]
    key = (config["dataset"], data_dir or config.get("data_dir"), config.get("seed", 0),
           config.get("synthetic_samples", 64))
    if key not in datasets:
        datasets[key] = load_dataset(key[0], key[1], seed=key[2], synthetic_samples=key[3])
    splits = datasets[key]
    if zoo.is_spec(config["model"]):  # a library model (dfs-train --model LIBRARY:NAME --exits ...)
        model = zoo.build_multi_exit(config["model"], config["exits"], num_classes=splits.num_classes,
                                     model_kwargs=config.get("model_kwargs"), flavour="dsn",
                                     example_input=splits.test[:2][0])
    else:
        model = build_model(config["model"], num_classes=splits.num_classes, flavour="dsn",
                            beta=config.get("beta", 0.5))
    restore_model(model, state["model"], path)
    return config, model.to(device).eval(), splits


def threshold_split(splits, holdout: int):
    """(dataset to fit thresholds on, its description)."""
    if len(splits.val) > 0:
        return splits.val, "val"
    count = min(holdout, len(splits.train))
    images, labels = splits.train.tensors
    subset = torch.utils.data.TensorDataset(images[-count:], labels[-count:])
    return subset, f"train[-{count}:] (no val split: the model was trained on these images too)"


def _number(value: float):
    """JSON has no infinities: +inf ("nobody leaves") and -inf ("everybody left leaves") become strings."""
    return value if math.isfinite(value) else str(value)


def _mflops(flops: float) -> str:
    return f"{flops / 1e6:9.2f}"


def check_runner(model, batches, test, flops, p: float, thresholds: torch.Tensor) -> dict:
    """The early-exit runner over the whole test split at one budget: its decisions against the simulated
    evaluation's and the FLOPs it executed."""
    results, counted = inference.count_flops(
        model, lambda: [inference.early_exit_predict(model, images, thresholds.tolist()) for images in batches])
    predictions = torch.cat([result.predictions for result in results]).cpu()
    exits = torch.cat([result.exits for result in results]).cpu()
    simulated_exits = inference.assign_exits(test.confidences, thresholds)
    simulated_predictions = test.predictions.gather(0, simulated_exits[None]).squeeze(0)
    simulated = inference.evaluate_thresholds(test, thresholds, flops)
    same = (exits == simulated_exits) & (predictions == simulated_predictions)
    return {
        "p": p, "thresholds": [_number(t) for t in thresholds.tolist()], "test_accuracy": simulated.accuracy,
        "exit_counts": simulated.exit_counts, "simulated_average_flops": simulated.average_flops,
        "counted_flops_per_image": counted / len(predictions), "same_decisions": same.double().mean().item(),
        "flops_speedup": flops[-1] / simulated.average_flops,
    }


def print_exits(label: str, flops: list[int], accuracy: list[float]) -> None:
    print(f"{label}\n{'exit':>4} {'MFLOPs':>9} {'test acc %':>10}")
    for number, (exit_cost, exit_accuracy) in enumerate(zip(flops, accuracy), start=1):
        print(f"{number:>4} {_mflops(exit_cost)} {exit_accuracy:10.2f}")


def print_runner(records: list[dict], timing: inference.SpeedupResult, images: int, args) -> None:
    print(f"early exit on {images} test images, batch {args.batch_size}, median of {args.repeats}: "
          f"all exits {timing.all_exits_seconds * 1e3:.1f} ms")
    print(f"{'p':>5} {'test acc %':>10} {'MFLOPs':>9} {'counted':>9} {'same':>6} {'ms':>8} {'speed-up':>8} "
          f"{'FLOPs x':>8}")
    for record in records:
        print(f"{record['p']:5.2f} {record['test_accuracy']:10.2f} {_mflops(record['simulated_average_flops'])} "
              f"{_mflops(record['counted_flops_per_image'])} {record['same_decisions']:6.3f} "
              f"{record['seconds'] * 1e3:8.1f} {record['speedup']:8.2f} {record['flops_speedup']:8.2f}")


def evaluate_run(run_dir: str, args, device: torch.device, datasets: dict):
    """(JSON record, plot curves) of one run, printing its tables."""
    config, model, splits = load_run(run_dir, device, datasets, args.data_dir)
    if not isinstance(splits.test, torch.utils.data.TensorDataset):
        raise SystemExit(f"{run_dir}: anytime.py evaluates in-memory datasets (digits, synthetic, cifar100); "
                         f"{config['dataset']!r} is read from image folders, which it does not support yet")
    progress = not args.no_progress
    fit_set, fit_description = threshold_split(splits, args.holdout)
    val = inference.collect_exit_outputs(model, fit_set, batch_size=args.batch_size, progress=progress)
    test = inference.collect_exit_outputs(model, splits.test, batch_size=args.batch_size, progress=progress)
    test_images = splits.test.tensors[0].to(device)
    if isinstance(model, MultiExitModel):  # counted on a test image; the package's models know their input
        flops = inference.exit_flops(model, test_images[:1])
    else:
        flops = inference.exit_flops(model)
    accuracy = inference.anytime_accuracy(test)
    points = inference.budget_curve(val, test, flops)
    strategy = config.get("strategy", "dsn")
    label = f"{os.path.basename(os.path.normpath(run_dir))} ({strategy})"
    print_exits(f"\n{label}: {config['model']} on {config['dataset']}, thresholds fitted on {fit_description}",
                flops, accuracy)

    thresholds = [inference.fit_thresholds(val.confidences, inference.geometric_exit_fractions(p, val.num_exits))
                  for p in args.runner_p]
    runner = [check_runner(model, list(test_images.split(args.batch_size)), test, flops, p, exit_thresholds)
              for p, exit_thresholds in zip(args.runner_p, thresholds)]
    timing_batches = list(test_images[: args.timing_samples].split(args.batch_size))
    timing = inference.measure_speedup(model, timing_batches, [t.tolist() for t in thresholds],
                                       repeats=args.repeats, progress=progress)
    for record, seconds, speedup in zip(runner, timing.early_exit_seconds, timing.speedups):
        record.update(seconds=seconds, all_exits_seconds=timing.all_exits_seconds, speedup=speedup)
    print_runner(runner, timing, min(args.timing_samples, len(test_images)), args)

    record = {
        "run_dir": os.path.abspath(run_dir), "label": label, "model": config["model"], "dataset": config["dataset"],
        "strategy": strategy, "trained_flavour": config.get("flavour") or ("dfs" if strategy == "dfs" else "dsn"),
        "beta": config.get("beta"), "epochs": config.get("epochs"), "threshold_split": fit_description,
        "threshold_samples": len(fit_set), "test_samples": len(splits.test),
        "exits": [{"exit": number, "flops": exit_cost, "test_accuracy": exit_accuracy}
                  for number, (exit_cost, exit_accuracy) in enumerate(zip(flops, accuracy), start=1)],
        "budgeted": [{"p": point.p, "thresholds": [_number(t) for t in point.thresholds],
                      "val": asdict(point.val), "test": asdict(point.test)} for point in points],
        "early_exit": runner,
    }
    return record, inference.RunCurves(label, flops, accuracy, points)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    machine_info = machine(device)
    datasets: dict = {}
    records, curves = [], []
    for run_dir in args.runs:
        record, run_curves = evaluate_run(run_dir, args, device, datasets)
        records.append(record)
        curves.append(run_curves)
    names = sorted({f"{record['model']} on {record['dataset']}" for record in records})
    result = {
        "machine": machine_info,
        "settings": {"batch_size": args.batch_size, "repeats": args.repeats, "timing_samples": args.timing_samples,
                     "ps": list(inference.DEFAULT_PS), "runner_ps": args.runner_p, "inference_flavour": "dsn",
                     "flops": "FlopCounterMode per image, 2 per multiply-add, cumulative per exit"},
        "runs": records,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        json.dump(result, handle, indent=2)
    inference.plot_runs(curves, f"{args.out}.png", title=", ".join(names) + ": budgeted batch classification")
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
