"""Feature referencing on ATen: ``reroute`` and ``exit_reference`` return views of ``x`` and assemble
the gradient of ``x`` in one pass with the compiled ``dfs_kernels::merge_channels``."""

from __future__ import annotations

import torch

from .._referencing import referencing_ops

_ops = referencing_ops(lambda head, tail, split: torch.ops.dfs_kernels.merge_channels(head, tail, split))
reroute = _ops.reroute
exit_reference = _ops.exit_reference
