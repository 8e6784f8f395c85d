"""Shared test helpers: building inputs in a given memory layout and comparing a backend with the
reference on outputs and every gradient."""

from __future__ import annotations

import dataclasses

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
