"""partitioned_conv2d on every backend against dfs_kernels.reference: output and the gradients of
input, weight and bias, over kernel sizes, strides, paddings, dilations, groups, shared-channel
counts, memory layouts and dtypes."""

from __future__ import annotations

import pytest
import torch

import dfs_kernels
from dfs_kernels import functional, reference
from dfs_kernels.testing import assert_close
from helpers import CONV_GRID, LAYOUTS, check_conv, compare_backward, conv_leaves, feature_map, view_of


CONVS = CONV_GRID

CASES = [
    pytest.param(conv, cp, id=f"{name}-cp{cp}")
    for name, conv in CONVS.items()
    for cp in conv.shared_channel_counts()
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv, cp", CASES)
@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_matches_reference_cpu(backend, conv, cp, layout, dtype):
    check_conv(backend, conv, cp, layout, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv, cp", CASES)
@pytest.mark.parametrize("backend", dfs_kernels.BACKENDS)
def test_matches_reference_cuda(backend, conv, cp, layout, dtype):
    if dfs_kernels.unavailable_reason(backend, "cuda"):
        pytest.skip(dfs_kernels.unavailable_reason(backend, "cuda"))
    # cuDNN may run float32 convolutions on TF32 tensor cores.
    tol = "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else dtype
    check_conv(backend, conv, cp, layout, dtype, device="cuda", tol=tol)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_module_padding_modes(backend, padding_mode, layout):
    conv = dfs_kernels.PartitionedConv2d(
        6, 5, 3, stride=2, padding=(1, 2), padding_mode=padding_mode, shared_channels=2, backend=backend
    ).double()
    plain = torch.nn.Conv2d(6, 5, 3, stride=2, padding=(1, 2), padding_mode=padding_mode).double()
    plain.load_state_dict(conv.state_dict())
    base, _ = feature_map((2, 6, 9, 7), layout=layout, dtype=torch.float64)
    view = view_of(layout)

    def expected(base, weight, bias):
        x = view(base)
        if padding_mode == "zeros":
            return reference.partitioned_conv2d(x, weight, bias, stride=2, padding=(1, 2), shared_channels=2)
        # Other modes prepend a differentiable pad to the oracle, as nn.Conv2d does.
        padded = torch.nn.functional.pad(x, plain._reversed_padding_repeated_twice, mode=padding_mode)
        return reference.partitioned_conv2d(padded, weight, bias, stride=2, padding=0, shared_channels=2)

    def actual(base, weight, bias):
        return torch.func.functional_call(conv, {"weight": weight, "bias": bias}, (view(base),))

    compare_backward(actual, expected, [base, plain.weight, plain.bias], names=["input", "weight", "bias"])


@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_unbatched_input(backend):
    conv = dfs_kernels.PartitionedConv2d(4, 3, 3, padding=1, backend=backend)
    x = torch.randn(4, 5, 6)
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1))


@pytest.mark.parametrize("conv", [CONVS["k3-batch1"], CONVS["groups2"], CONVS["depthwise"], CONVS["same-even-kernel"]],
                         ids=["dense", "groups2", "depthwise", "same-even"])
@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_gradcheck(backend, conv):
    """Numerical gradients of the shared channels (the referenced ones are held constant, as the
    stop-gradient says), of weight and bias, in float64."""
    cp = conv.in_channels // 2 + 1
    x = torch.randn(conv.batch, conv.in_channels, *conv.size, dtype=torch.float64)
    shared, referenced = x[:, :cp].clone().requires_grad_(), x[:, cp:].clone()
    weight = torch.randn(conv.out_channels, conv.in_channels // conv.groups, *conv.kernel(), dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(conv.out_channels, dtype=torch.float64, requires_grad=True)

    def fn(shared, weight, bias):
        return functional.partitioned_conv2d(
            torch.cat([shared, referenced], 1), weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
            shared_channels=cp, backend=backend,
        )

    assert torch.autograd.gradcheck(fn, (shared, weight, bias))


@pytest.mark.parametrize("conv, cp", [
    (CONVS["k3-batch1"], 3), (CONVS["groups2"], 5), (CONVS["groups4-stride2"], 4), (CONVS["depthwise"], 2),
], ids=["dense", "groups2-partial", "groups4-whole", "depthwise"])
def test_aten_backend_never_computes_referenced_input_grad(conv, cp):
    """The input-gradient convolutions that run see only the shared channels, and together exactly
    Cp of them; weight gradients still cover every input channel."""
    if "aten" not in dfs_kernels.available_backends("cpu"):
        pytest.skip("aten backend unavailable")
    base, weight, *bias = conv_leaves(conv, "contiguous", torch.float32)
    out = functional.partitioned_conv2d(
        base, weight, bias[0] if bias else None, conv.stride, conv.padding, conv.dilation, conv.groups,
        shared_channels=cp, backend="aten",
    )
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        out.sum().backward()
    input_grad_channels, weight_grad_channels = 0, 0
    for event in prof.events():
        if event.name != "aten::convolution_backward":
            continue
        input_shape, weight_shape = event.input_shapes[1], event.input_shapes[2]
        # output_mask is a constant argument: infer the call's role from what it was given.
        groups = input_shape[1] // weight_shape[1]
        if weight_shape[0] * (input_shape[1] // groups) == weight.shape[0] * weight.shape[1] and input_shape[1] == conv.in_channels:
            weight_grad_channels += input_shape[1]
        else:
            input_grad_channels += input_shape[1]
    assert input_grad_channels == cp
    assert weight_grad_channels == conv.in_channels
    assert base.grad[:, cp:].abs().max() == 0


@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_autocast_casts_like_conv2d(backend):
    conv = dfs_kernels.PartitionedConv2d(6, 4, 3, padding=1, shared_channels=3, backend=backend)
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out, expected, name="output")
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad[:, 3:].abs().max() == 0
    assert conv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("used", ["both", "conv", "pooled"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("conv, cp", CASES)
@pytest.mark.parametrize("backend", dfs_kernels.available_backends("cpu"))
def test_stage_matches_reference_cpu(backend, conv, cp, layout, used):
    """The DFS stage (a partitioned conv and an exit reading the same x): both outputs and every
    gradient, also when only one of the two outputs reaches the loss."""
    leaves = conv_leaves(conv, layout, torch.float64)
    view = view_of(layout)
    pick = {"both": lambda out: out, "conv": lambda out: out[0], "pooled": lambda out: out[1]}[used]

    def actual(base, weight, bias=None):
        return pick(functional.partitioned_conv2d_with_exit_pool(
            view(base), weight, bias, **conv.conv_args(), shared_channels=cp, backend=backend))

    def expected(base, weight, bias=None):
        return pick(reference.partitioned_conv2d_with_exit_pool(view(base), weight, bias, **conv.conv_args(),
                                                                shared_channels=cp))

    compare_backward(actual, expected, leaves, names=["input", "weight", "bias"])
