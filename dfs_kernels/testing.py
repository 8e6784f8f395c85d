"""Comparison helpers for checking a backend against ``dfs_kernels.reference``.

``TOLERANCES`` is the one table of per-dtype tolerances used by the test suite and benchmarks.
"""

from __future__ import annotations

import torch

# (rtol, atol) per dtype. float32/float64 differ from the oracle only by summation order (one
# convolution versus two plus an add); float16/bfloat16 by their rounding of the output; tf32 is
# float32 run on TensorFloat-32 tensor cores (10-bit mantissa).
TOLERANCES: dict[object, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-4),
    "tf32": (5e-3, 5e-3),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def tolerance(dtype: torch.dtype | str) -> tuple[float, float]:
    """(rtol, atol) for ``dtype`` (a torch dtype or "tf32")."""
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of {list(TOLERANCES)}, got {dtype!r}") from None


def assert_close(
    actual: torch.Tensor | None,
    expected: torch.Tensor | None,
    *,
    name: str,
    dtype: torch.dtype | str | None = None,
    like: torch.Tensor | None = None,
) -> None:
    """Asserts ``|actual - expected| <= atol + rtol * |expected|`` elementwise with the tolerance of
    ``dtype`` (default: ``expected``'s dtype); on failure the message names the worst element.

    A gradient that autograd left as None is zero: pass ``like`` (a tensor of the right shape) so
    that None compares as zeros.
    """
    if actual is None or expected is None:
        reference = actual if actual is not None else expected if expected is not None else like
        if reference is None:
            return
        actual = torch.zeros_like(reference) if actual is None else actual
        expected = torch.zeros_like(reference) if expected is None else expected
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    rtol, atol = tolerance(dtype if dtype is not None else expected.dtype)
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    excess = (actual64 - expected64).abs() - (atol + rtol * expected64.abs())
    nonfinite = actual64.isfinite() != expected64.isfinite()
    if actual.numel() == 0 or (excess.max() <= 0 and not nonfinite.any()):
        return
    worst = int(torch.where(nonfinite.flatten(), torch.inf, excess.flatten()).argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual.shape))
    failing = int(((excess > 0) | nonfinite).sum())
    raise AssertionError(
        f"{name}: {failing} of {actual.numel()} elements differ beyond rtol={rtol}, atol={atol}; "
        f"worst at index {index}: actual {actual64[index].item():.9g}, expected {expected64[index].item():.9g} "
        f"(|diff| {abs(actual64[index] - expected64[index]).item():.3g})"
    )
