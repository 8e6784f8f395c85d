"""Prints what this installation of dfs_kernels can do: versions, the compiled library, and which
backend each device gets. Attach its output to bug reports.

    dfs-info
"""

from __future__ import annotations

import argparse
import platform

import torch

import dfs_kernels
from dfs_kernels import _library

from ._common import HelpFormatter


def main(argv=None) -> None:
    argparse.ArgumentParser(prog="dfs-info", description=__doc__, formatter_class=HelpFormatter).parse_args(argv)
    print(f"dfs_kernels {dfs_kernels.__version__}, torch {torch.__version__}, python {platform.python_version()}")
    print(f"compiled library: {_library.library_path() or 'not loaded: ' + str(_library.load_error())}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} threads"
        print(f"{device} ({name}):")
        for backend in dfs_kernels.BACKENDS:
            reason = dfs_kernels.unavailable_reason(backend, device)
            print(f"  {backend:<10} {'available' if reason is None else 'unavailable: ' + reason}")
        print(f"  backend='auto' -> {dfs_kernels.resolve_backend('auto', device)!r}")


if __name__ == "__main__":
    main()
