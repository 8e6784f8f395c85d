"""Turn a sharded checkpoint of an FSDP run into the plain checkpoint a one-process run writes.

    python -m dfs_kernels.cli.consolidate runs/fsdp/last.dcp runs/fsdp/last.pt

The output loads with ``torch.load(weights_only=True)``, in ``dfs-anytime`` and in ``dfs-train --resume``
without ``--fsdp`` (``dfs_kernels.training.sharded_checkpoint.consolidate``). Runs in one process.
"""

from __future__ import annotations

import argparse

from dfs_kernels.training.sharded_checkpoint import consolidate

from ._common import HelpFormatter


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dfs_kernels.cli.consolidate", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("folder", help="the sharded checkpoint (an FSDP run's OUT/last.dcp)")
    parser.add_argument("output", help="the checkpoint file to write (e.g. OUT/last.pt)")
    args = parser.parse_args(argv)
    try:
        consolidate(args.folder, args.output)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
