"""Shared test helpers: building inputs in a given memory layout and comparing a backend with the
reference on outputs and every gradient."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dfs_kernels.testing import assert_close

LAYOUTS = ("contiguous", "channels_last", "strided")


def feature_map(shape, *, layout="contiguous", dtype=torch.float32, device="cpu"):
    """A leaf tensor ``base`` (requires grad) and the view ``x`` of it in the requested layout:
    contiguous NCHW, channels_last, or a non-contiguous view (every other column of a wider map)."""
    n, c, h, w = shape
    if layout == "strided":
        base = torch.randn(n, c, h, 2 * w, dtype=dtype, device=device).requires_grad_()
        return base, base[..., ::2]
    base = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    base.requires_grad_()
    return base, base


def view_of(layout: str):
    """The view ``feature_map`` applies to its leaf for ``layout``, to redo it on a clone of the leaf."""
    return (lambda base: base[..., ::2]) if layout == "strided" else (lambda base: base)


def compare_backward(run_actual, run_expected, leaves, *, dtype=None, names=None, seed=1):
    """Runs both functions on clones of ``leaves`` (each returns one tensor or a tuple), backpropagates
    the same random cotangents and compares outputs and every leaf's gradient."""
    def run(fn):
        clones = [leaf.detach().clone().requires_grad_(leaf.requires_grad) for leaf in leaves]
        outputs = fn(*clones)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        generator = torch.Generator(device=outputs[0].device).manual_seed(seed)
        cotangents = [
            torch.randn(out.shape, generator=generator, dtype=out.dtype, device=out.device) for out in outputs
        ]
        torch.autograd.backward(outputs, cotangents)
        return outputs, [clone.grad for clone in clones]

    actual_out, actual_grads = run(run_actual)
    expected_out, expected_grads = run(run_expected)
    names = names or [f"leaf{i}" for i in range(len(leaves))]
    for i, (a, e) in enumerate(zip(actual_out, expected_out)):
        assert_close(a, e, name=f"output{i}", dtype=dtype)
    for name, leaf, a, e in zip(names, leaves, actual_grads, expected_grads):
        if leaf.requires_grad:
            assert_close(a, e, name=f"grad of {name}", dtype=dtype, like=leaf)


@dataclasses.dataclass(frozen=True)
class Conv:
    """One convolution configuration of the test grids."""

    in_channels: int
    out_channels: int
    kernel_size: int | tuple[int, int]
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] | str = 0
    dilation: int = 1
    groups: int = 1
    bias: bool = True
    size: tuple[int, int] = (9, 7)
    batch: int = 2

    def kernel(self) -> tuple[int, int]:
        k = self.kernel_size
        return (k, k) if isinstance(k, int) else k

    def conv_args(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def shared_channel_counts(self) -> list[int]:
        """Cp in {0, 1, C_in - 1, C_in, round(0.5 * C_in)}."""
        c = self.in_channels
        return sorted({0, 1, c - 1, c, round(0.5 * c)})


def conv_leaves(conv: Conv, layout: str, dtype: torch.dtype, device="cpu") -> list[torch.Tensor]:
    """Leaf input (in ``layout``), weight and, when ``conv.bias``, bias for ``conv``, all requiring grad."""
    base, _ = feature_map((conv.batch, conv.in_channels, *conv.size), layout=layout, dtype=dtype, device=device)
    weight = torch.randn(
        conv.out_channels, conv.in_channels // conv.groups, *conv.kernel(), dtype=dtype, device=device
    ).requires_grad_()
    bias = torch.randn(conv.out_channels, dtype=dtype, device=device).requires_grad_() if conv.bias else None
    return [t for t in (base, weight, bias) if t is not None]


def loss_and_grads(model, x, forward=None):
    """Loss (sum of the mean squares of the outputs) of ``forward`` (default ``model``) on ``x``, and the
    parameters' gradients."""
    model.zero_grad()
    loss = sum(out.square().mean() for out in (model if forward is None else forward)(x))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


# --- the convolution grids ------------------------------------------------------------------------

CONV_GRID = {
    "k1": Conv(6, 5, 1, size=(7, 5)),
    "k3-batch1": Conv(6, 4, 3, padding=1, bias=False, batch=1),
    "k5-stride2": Conv(5, 6, 5, stride=2, padding=2, size=(11, 9)),
    "k7": Conv(4, 4, 7, padding=3, size=(9, 8)),
    "k3x5-nonsquare": Conv(6, 5, (3, 5), stride=(2, 1), padding=(1, 2), size=(9, 10)),
    "same-dilation2": Conv(6, 4, 3, padding="same", dilation=2),
    "same-even-kernel": Conv(6, 4, (2, 4), padding="same", bias=False),
    "valid-stride2": Conv(6, 4, 3, stride=2, padding="valid"),
    "stride2-dilation2": Conv(7, 3, 3, stride=2, dilation=2, size=(13, 11)),
    "groups2": Conv(8, 6, 3, padding=1, groups=2),
    "groups4-stride2": Conv(8, 8, 3, stride=2, padding=1, groups=4, bias=False),
    "depthwise": Conv(6, 6, 3, padding=1, groups=6),
    "depthwise-x2-dilation2": Conv(4, 8, 3, padding=2, dilation=2, groups=4),
}
"""The full grid, for backends that run at native speed."""

LEAN_CONV_GRID = {
    "k3": Conv(6, 5, 3, padding=1),
    "k1-stride2": Conv(5, 4, 1, stride=2, size=(7, 6), bias=False),
    "k5-stride2": Conv(5, 6, 5, stride=2, padding=2, size=(11, 9)),
    "k3x5-stride2x1": Conv(6, 5, (3, 5), stride=(2, 1), padding=(1, 2)),
    "stride2-dilation2": Conv(7, 3, 3, stride=2, dilation=2, size=(13, 11)),
    "groups2": Conv(8, 6, 3, padding=1, groups=2, batch=1),
    "depthwise-same": Conv(6, 6, 3, padding="same", groups=6, bias=False, size=(5, 4)),
    # More channels than one 16-wide tile: several channel tiles and K blocks, a tile straddling Cp.
    "wide": Conv(20, 18, 3, padding=1, size=(5, 4)),
}
"""A lean grid for the Triton interpreter, which runs every program in Python."""


GPU_SIZED_CONVS = {
    "vgg-64": Conv(64, 64, 3, padding=1, size=(16, 16), batch=4),
    "resnet-down": Conv(64, 128, 3, stride=2, padding=1, size=(16, 16), batch=4, bias=False),
    "1x1-down": Conv(64, 128, 1, stride=2, size=(15, 15), batch=3, bias=False),
}
"""Convolutions of the models' sizes, which the GPU grids add to the lean one."""

CUDA_DTYPES = {"f32": (torch.float32, torch.float32), "tf32": (torch.float32, "tf32"),
               "f16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16)}
"""The GPU grids' dtypes: name -> (dtype, tolerance); "tf32" is float32 with the backend under test
allowed TF32 (the oracle never is: ``exact_cuda_math``)."""


def cuda_dtype_cases(convs: dict[str, Conv]) -> list:
    """pytest params (conv name, dtype name) over ``convs`` and ``CUDA_DTYPES``: TF32 against the IEEE
    oracle only on the short reductions (C_in / groups * kH * kW <= 63) the "tf32" tolerance is meant
    for, since TF32's error grows with the reduction's length."""
    return [
        pytest.param(name, dtype_name, id=f"{name}-{dtype_name}")
        for name, conv in convs.items()
        for dtype_name in CUDA_DTYPES
        if dtype_name != "tf32" or conv.in_channels // conv.groups * conv.kernel()[0] * conv.kernel()[1] <= 63
    ]


@pytest.fixture
def exact_cuda_math(monkeypatch):
    """The oracle runs on cuDNN and cuBLAS: keep them in IEEE float32, so that only a backend asked
    for TF32 uses it (import this fixture into the test module)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


def boundary_shared_counts(conv: Conv) -> list[int]:
    """Cp in {0, 1, C_in - 1, C_in}, plus one that cuts a group."""
    c = conv.in_channels
    counts = {0, 1, c - 1, c}
    if conv.groups > 1:
        counts.add(c // conv.groups + 1)
    return sorted(counts)


def check_conv(backend: str, conv: Conv, cp: int, layout: str, dtype: torch.dtype, device="cpu", tol=None):
    """partitioned_conv2d on ``backend`` against the reference: output and every gradient."""
    from dfs_kernels import functional, reference

    leaves = conv_leaves(conv, layout, dtype, device)
    view = view_of(layout)

    def actual(base, weight, bias=None):
        return functional.partitioned_conv2d(view(base), weight, bias, **conv.conv_args(), shared_channels=cp,
                                             backend=backend)

    def expected(base, weight, bias=None):
        return reference.partitioned_conv2d(view(base), weight, bias, **conv.conv_args(), shared_channels=cp)

    compare_backward(actual, expected, leaves, dtype=tol or dtype, names=["input", "weight", "bias"])


# --- registered ops -------------------------------------------------------------------------------

OP_PREFIXES = {"aten": ("", ""), "cudnn": ("cudnn_", None), "triton": ("triton_", "triton_")}
"""Backend -> (prefix of its partitioned-convolution ops, prefix of its exit-pooling and channel ops,
or None where it uses those of "aten")."""


def opcheck_cases(backend: str, device="cpu", dtype=torch.float32) -> list[tuple[str, tuple]]:
    """(op name, arguments) covering every registered op of ``backend``: odd shapes, NCHW and NHWC,
    groups, stride and dilation, Cp at 0, in the middle and cutting a group, the exit's gradient; for
    the linear ops tokens, rows and strided views, Cp at 0, in the middle and at in_features."""
    conv, glue = OP_PREFIXES[backend]

    def t(*shape, cl=False, grad=False):
        x = torch.randn(*shape, device=device, dtype=dtype)
        return (x.contiguous(memory_format=torch.channels_last) if cl else x).requires_grad_(grad)

    x, x_cl, w, w_grouped = t(2, 6, 5, 4), t(2, 6, 5, 4, cl=True), t(4, 6, 3, 3), t(4, 3, 3, 3)
    grad_out = t(2, 4, 5, 4)
    leaf = lambda tensor: tensor.clone().requires_grad_()  # noqa: E731
    cases = [
        (f"{conv}partitioned_conv2d", (leaf(x), leaf(w), t(4, grad=True), [1, 1], [1, 1], [1, 1], 1, 2)),
        (f"{conv}partitioned_conv2d", (leaf(x_cl), leaf(w_grouped), None, [2, 1], [1, 2], [1, 2], 2, 4)),
        (f"{conv}partitioned_conv2d_input_grad", (grad_out, x, w, [1, 1], [1, 1], [1, 1], 1, 3)),
        (f"{conv}partitioned_conv2d_input_grad", (grad_out, x_cl, w_grouped, [1, 1], [1, 1], [1, 1], 2, 4)),
        (f"{conv}partitioned_conv2d_input_grad", (grad_out, x, w, [1, 1], [1, 1], [1, 1], 1, 0)),
        (f"{conv}partitioned_conv2d_input_grad", (t(2, 4, 3, 2), x_cl, w_grouped, [2, 2], [1, 1], [1, 1], 2, 4,
                                                  t(2, 6))),
        (f"{conv}partitioned_conv2d_input_grad", (grad_out, x, w_grouped, [1, 1], [1, 1], [1, 1], 2, 0, t(2, 6))),
        (f"{conv}partitioned_conv2d_with_exit_pool", (leaf(x), leaf(w), t(4, grad=True), [1, 1], [1, 1], [1, 1], 1, 2)),
        (f"{conv}partitioned_conv2d_with_exit_pool", (leaf(x_cl), leaf(w_grouped), None, [1, 1], [1, 1], [1, 1], 2, 5)),
    ]
    tokens, rows, w_linear = t(3, 5, 7), t(6, 7), t(4, 7)
    cases += [
        (f"{conv}partitioned_linear", (leaf(tokens), leaf(w_linear), t(4, grad=True), 3)),
        (f"{conv}partitioned_linear", (leaf(rows), leaf(w_linear), None, 0)),
        (f"{conv}partitioned_linear", (leaf(tokens.transpose(0, 1)), leaf(w_linear), None, 7)),
        (f"{conv}partitioned_linear_input_grad", (t(3, 5, 4, grad=True), tokens, leaf(w_linear), 3)),
        (f"{conv}partitioned_linear_input_grad", (t(6, 4), rows, t(7, 4).t(), 7)),
        (f"{conv}partitioned_linear_input_grad", (t(6, 4), rows, w_linear, 0)),
    ]
    if glue is not None:
        cases += [
            (f"{glue}exit_avg_pool", (leaf(x), 2)),
            (f"{glue}exit_avg_pool", (leaf(x_cl), 0)),
            (f"{glue}exit_avg_pool_backward", (t(2, 6), [2, 6, 5, 4], 2, False)),
            (f"{glue}exit_avg_pool_backward", (t(6, 2).t(), [2, 6, 5, 4], 5, True)),
            (f"{glue}merge_channels", (x, x_cl, 2)),
            (f"{glue}merge_channels", (None, x, 4)),
            (f"{glue}merge_channels", (x_cl, None, 6)),
        ]
    if backend == "aten":
        cases += [
            ("pad_channels", ([t(2, 2, 5, 4), t(2, 1, 5, 4)], 6)),
            ("pad_channels", ([x_cl[:, :3]], 6)),
            ("reroute", (leaf(x), 2, 1)),
            ("reroute", (leaf(tokens), 3, 2)),
            ("exit_reference", (leaf(x_cl), 0, 1)),
            ("exit_reference", (leaf(tokens), 7, 2)),
        ]
    if backend == "triton":
        cases.append(("triton_conv2d_weight_grad", (grad_out, x_cl, w, [1, 1], [1, 1], [1, 1], 1, True)))
    return cases
