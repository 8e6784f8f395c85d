"""The ``"aten"`` backend: convolutions on ATen (oneDNN on CPU, cuDNN on CUDA), DFS glue in the
compiled ops library (csrc/). Importing it registers the autograd formulas and fake implementations
of the library's ops, so it is imported only once the library is loaded."""

from .exit_avg_pool import exit_avg_pool
from .partitioned_conv2d import partitioned_conv2d, partitioned_conv2d_with_exit_pool
from .reroute import exit_reference, reroute

from . import channel_ops  # noqa: F401  (registers the fakes of the channel-assembly ops)

__all__ = [
    "exit_avg_pool", "exit_reference", "partitioned_conv2d", "partitioned_conv2d_with_exit_pool", "reroute",
]
