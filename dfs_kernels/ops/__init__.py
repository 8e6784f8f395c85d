"""The registered ops (``torch.ops.dfs_kernels``), one file per op family.

A family is one piece of DFS math with one schema. Every backend with kernels of its own exposes the
family under that schema with its prefix (``"aten"``: none, ``"cudnn"``: ``cudnn_``, ``"triton"``:
``triton_``); the schemas of the compiled ops are in ``csrc/registration.cpp``, the Triton ones repeat
them (``dfs_kernels/backends/triton``). Each family file holds, for every prefix at once, what sits
between the functional layer and the kernels: the fake (for ``torch.compile`` and ``opcheck``), the
autograd formula (one ``setup_context`` and ``backward`` for every backend; the forward ops of the
compiled backends run the same formula written in C++, csrc/autograd/, and register no Python one), the
FLOP formula, and the calls the functional layer makes.

- ``partitioned_conv2d``: ``partitioned_conv2d``, ``partitioned_conv2d_with_exit_pool``,
  ``partitioned_conv2d_input_grad`` (and the Triton weight gradient).
- ``partitioned_linear``: ``partitioned_linear``, ``partitioned_linear_input_grad``.
- ``exit_avg_pool``: ``exit_avg_pool``, ``exit_avg_pool_backward``.
- ``channels``: ``merge_channels``, ``pad_channels``, and the split-point views built on
  ``merge_channels`` (``reroute``, ``exit_reference``).

Every op is differentiable to any order. The first backward runs the backend's kernels; a backward
that is itself recorded (``create_graph=True``) is built from differentiable ATen ops with the same
values (``_composite``), so double backward, gradient penalties and Hessian-vector products see the
DFS gradients, never a silent zero. Forward-mode AD and ``torch.func`` transforms are not supported
by registered ops (torch has no such formulas for custom ops): ``dfs_kernels.functional`` computes
with ``dfs_kernels.reference`` under them, never calling these ops there (docs/semantics.md).
"""

from __future__ import annotations

from . import channels, exit_avg_pool, partitioned_conv2d, partitioned_linear
from ._op_set import OpSet

__all__ = ["OpSet", "channels", "exit_avg_pool", "partitioned_conv2d", "partitioned_linear", "register_prefix"]


def register_prefix(conv_prefix: str, glue_prefix: str | None) -> None:
    """Registers fakes, autograd and FLOP formulas of the families a backend defines: the
    partitioned-convolution and partitioned-linear families (the GEMMs) under ``conv_prefix`` and,
    unless ``glue_prefix`` is None (a
    backend that reuses another's), the exit-pooling and channel families under ``glue_prefix``.
    Called once per backend, after its ops are defined."""
    partitioned_conv2d.register(conv_prefix, glue_prefix or "")
    partitioned_linear.register(conv_prefix)
    if glue_prefix is not None:
        exit_avg_pool.register(glue_prefix)
        channels.register(glue_prefix)
