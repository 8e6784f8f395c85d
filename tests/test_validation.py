"""Bad input raises a ValueError or TypeError that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import ExitHead, FeatureReroute, PartitionedConv2d, functional

X = torch.randn(2, 6, 5, 5)
W = torch.randn(4, 6, 3, 3)


@pytest.mark.parametrize("beta, error", [(-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError),
                                         (None, TypeError), (True, TypeError)])
@pytest.mark.parametrize("factory", [
    lambda beta: PartitionedConv2d(6, 4, 3, beta=beta),
    lambda beta: ExitHead(6, 3, beta=beta),
    lambda beta: FeatureReroute(6, beta=beta),
    lambda beta: dfs_kernels.convert(torch.nn.Conv2d(3, 3, 1), beta=beta, every_conv=True),
], ids=["PartitionedConv2d", "ExitHead", "FeatureReroute", "convert"])
def test_beta(factory, beta, error):
    with pytest.raises(error, match="beta"):
        factory(beta)


@pytest.mark.parametrize("shared_channels, error", [(-1, ValueError), (7, ValueError), (2.0, TypeError),
                                                    ("2", TypeError), (False, TypeError)])
def test_shared_channels(shared_channels, error):
    with pytest.raises(error, match=r"shared_channels .*\[0, 6\]"):
        PartitionedConv2d(6, 4, 3, shared_channels=shared_channels)
    with pytest.raises(error, match="shared_channels"):
        functional.partitioned_conv2d(X, W, shared_channels=shared_channels)
    with pytest.raises(error, match="shared_channels"):
        functional.reroute(X, shared_channels)
    with pytest.raises(error, match="shared_channels"):
        functional.exit_avg_pool(X, shared_channels)


def test_input_rank_and_channels():
    with pytest.raises(ValueError, match=r"input must be 4-D"):
        functional.partitioned_conv2d(torch.randn(6, 5), W, shared_channels=3)
    with pytest.raises(ValueError, match=r"input must have weight.shape\[1\] \* groups = 6 channels"):
        functional.partitioned_conv2d(torch.randn(2, 5, 5, 5), W, shared_channels=3)
    with pytest.raises(ValueError, match=r"x must have 6 channels"):
        ExitHead(6, 3)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"x must have 6 channels"):
        FeatureReroute(6)(torch.randn(2, 5, 4, 4))
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        functional.reroute(torch.randn(6, 4), 2)
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor"):
        functional.partitioned_conv2d([1.0], W, shared_channels=3)


def test_dtype_and_device_mismatch():
    with pytest.raises(TypeError, match=r"weight must have input's dtype torch.float32, got torch.float64"):
        functional.partitioned_conv2d(X, W.double(), shared_channels=3)
    with pytest.raises(TypeError, match=r"bias must have input's dtype"):
        functional.partitioned_conv2d(X, W, torch.zeros(4, dtype=torch.float16), shared_channels=3)
    with pytest.raises(ValueError, match=r"weight must be on input's device cpu, got meta"):
        functional.partitioned_conv2d(X, W.to("meta"), shared_channels=3)
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        functional.partitioned_conv2d(X, W, torch.zeros(3), shared_channels=3)
    with pytest.raises(TypeError, match=r"input must have a floating dtype"):
        functional.partitioned_conv2d(X.long(), W.long(), shared_channels=3)


def test_conv_arguments():
    with pytest.raises(ValueError, match=r"stride must be an int >= 1"):
        functional.partitioned_conv2d(X, W, stride=0, shared_channels=3)
    with pytest.raises(ValueError, match=r"padding must be 'same', 'valid'"):
        functional.partitioned_conv2d(X, W, padding="full", shared_channels=3, backend="aten")
    with pytest.raises(ValueError, match=r"padding='same' requires stride=1"):
        functional.partitioned_conv2d(X, W, stride=2, padding="same", shared_channels=3, backend="aten")
    with pytest.raises(ValueError, match=r"groups must be a positive int"):
        functional.partitioned_conv2d(X, W, groups=0, shared_channels=3)


@pytest.mark.parametrize("backend", ["fast", "", None, "AUTO"])
def test_unknown_backend(backend):
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of \['reference', 'aten', 'triton', 'cudnn'\]"):
        functional.partitioned_conv2d(X, W, shared_channels=3, backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        PartitionedConv2d(6, 4, 3, backend=backend)
    with pytest.raises(ValueError, match="backend must be"):
        dfs_kernels.convert(torch.nn.Conv2d(3, 3, 1), backend=backend, every_conv=True)


def test_requested_backend_unavailable_on_device_raises_instead_of_falling_back():
    reason = dfs_kernels.unavailable_reason("aten", "meta")
    assert reason is not None
    with pytest.raises(dfs_kernels.BackendUnavailableError, match=r"backend='aten' is not available on meta"):
        functional.partitioned_conv2d(X.to("meta"), W.to("meta"), shared_channels=3, backend="aten")
    assert issubclass(dfs_kernels.BackendUnavailableError, ValueError)


def test_auto_says_what_it_chose():
    assert dfs_kernels.resolve_backend("auto", "cpu") == dfs_kernels.available_backends("cpu")[0]
    assert dfs_kernels.resolve_backend("reference", "cpu") == "reference"
