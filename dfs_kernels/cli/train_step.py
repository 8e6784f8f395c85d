"""``dfs-train-step``: runs the training-step benchmark, ``bench/train_step.py`` of the source checkout this
package is installed from (``pip install -e .``); the benchmark and its results folder are not part of
the installed package. ``dfs-train-step --help`` lists its options."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "train_step.py"


def main(argv=None) -> None:
    if not SCRIPT.is_file():
        raise SystemExit(f"dfs-train-step: error: no benchmark at {SCRIPT}; it runs from a source checkout "
                         "installed with pip install -e (or run python bench/train_step.py there)")
    spec = importlib.util.spec_from_file_location("dfs_kernels_bench_train_step", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # its dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    sys.argv[0] = "dfs-train-step"
    benchmark.main(argv)  # its record is written to a JSON file; console scripts exit with main()'s value


if __name__ == "__main__":
    main()
