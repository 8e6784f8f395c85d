"""Kernel benchmark of the GPU backends against cuDNN (GPU only).

For the convolution shapes of VGG7-64 (CIFAR 32x32, batch 256), ResNet-18 (CIFAR, batch 256) and
VGG16-64 (224x224, batch 64), in float32 (IEEE), TF32 and bfloat16 channels-last, it times (median
of many calls between CUDA events, ``_timing.median_ms``), for each available backend but the
reference side by side:

- ``forward``: nn.Conv2d's convolution (cuDNN) vs the partitioned convolution of each backend;
- ``input_grad``: cuDNN's full input gradient (what DSN computes) vs the shared-channels-only input
  gradient of each backend (beta = 0.5; the referenced channels' zeros included), each through
  autograd with only the input requiring gradient;
- ``weight_grad``: cuDNN's weight gradient vs each backend's, through autograd with only the weight and
  bias requiring gradients ("aten" and the cuDNN backend use cuDNN's, so they measure the autograd
  overhead);
- ``stage`` (split-point shapes: stride 1, as at every VGG split point): forward + backward of a
  convolution and an exit's pooled read of the same input: composed (aten), fused (the others).

Each backend's result is checked against cuDNN's (max abs error, relative to the output's max).

    python bench/bench_triton_kernels.py                     # everything, results in bench/results/
    python bench/bench_triton_kernels.py --models vgg7 --modes bf16 --quick

On a machine without CUDA it prints why and exits 0 (``bench/gpu_check.py --dry-run`` runs
``bench_shape`` on CPU at tiny sizes).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
try:
    import dfs_kernels
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(BENCH_DIR.parent))
    import dfs_kernels
from _timing import median_ms  # noqa: E402

# (name, batch, C_in, C_out, H=W of the input, kernel, stride, padding): one entry per distinct conv.
SHAPES = {
    "vgg7": [  # VGG7-64 on CIFAR, batch 256: every conv after the first is partitioned
        ("vgg7.conv2", 256, 64, 64, 32, 3, 1, 1),
        ("vgg7.conv3", 256, 64, 128, 16, 3, 1, 1),
        ("vgg7.conv4", 256, 128, 128, 16, 3, 1, 1),
        ("vgg7.conv5", 256, 128, 256, 8, 3, 1, 1),
        ("vgg7.conv6", 256, 256, 256, 8, 3, 1, 1),
    ],
    "resnet18": [  # ResNet-18 on CIFAR, batch 256: the 3x3 convs and the 1x1 downsamples
        ("resnet18.layer1", 256, 64, 64, 32, 3, 1, 1),
        ("resnet18.layer2.down3x3", 256, 64, 128, 32, 3, 2, 1),
        ("resnet18.layer2.down1x1", 256, 64, 128, 32, 1, 2, 0),
        ("resnet18.layer2", 256, 128, 128, 16, 3, 1, 1),
        ("resnet18.layer3.down3x3", 256, 128, 256, 16, 3, 2, 1),
        ("resnet18.layer3", 256, 256, 256, 8, 3, 1, 1),
        ("resnet18.layer4.down3x3", 256, 256, 512, 8, 3, 2, 1),
        ("resnet18.layer4", 256, 512, 512, 4, 3, 1, 1),
    ],
    "vgg16": [  # VGG16-64 on 224x224 images, batch 64
        ("vgg16.conv2", 64, 64, 64, 224, 3, 1, 1),
        ("vgg16.conv3", 64, 64, 128, 112, 3, 1, 1),
        ("vgg16.conv4", 64, 128, 128, 112, 3, 1, 1),
        ("vgg16.conv5", 64, 128, 256, 56, 3, 1, 1),
        ("vgg16.conv6", 64, 256, 256, 56, 3, 1, 1),
        ("vgg16.conv8", 64, 256, 512, 28, 3, 1, 1),
        ("vgg16.conv9", 64, 512, 512, 28, 3, 1, 1),
        ("vgg16.conv11", 64, 512, 512, 14, 3, 1, 1),
    ],
}
MODES = {  # name: (dtype, TF32 allowed, channels_last)
    "fp32": (torch.float32, False, False),
    "tf32": (torch.float32, True, False),
    "bf16": (torch.bfloat16, False, True),
}
BETA = 0.5


def _max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.float().abs().max().clamp_min(1e-12)
    return float((actual.float() - expected.float()).abs().max() / scale)


def benchmarked_backends(device) -> list[str]:
    """The backends timed against cuDNN on ``device``: every available one but the oracle (on CPU
    also Triton under the interpreter, for the dry run)."""
    return [name for name in dfs_kernels.available_backends(device, include_interpreted=True) if name != "reference"]


def bench_shape(shape, mode: str, backends: list[str], quick: bool, *, device="cuda",
                repeats: tuple[int, int] | None = None) -> list[dict]:
    """Rows (one per op and variant, milliseconds) for one convolution ``shape`` in ``mode``.
    ``repeats``: (warm-up, timed) calls per measurement, by default from ``quick``."""
    from dfs_kernels import functional

    device = torch.device(device)
    name, batch, cin, cout, size, k, stride, padding = shape
    dtype, tf32, channels_last = MODES[mode]
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    cp = round(BETA * cin)
    x = torch.randn(batch, cin, size, size, device=device, dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(cout, cin, k, k, device=device, dtype=dtype) / (cin * k * k) ** 0.5).contiguous(memory_format=fmt)
    b = torch.randn(cout, device=device, dtype=dtype)
    conv = dict(stride=(stride, stride), padding=(padding, padding), dilation=(1, 1))
    y = F.conv2d(x, w, b, **conv)
    dy = torch.randn_like(y)
    warmup, timed = repeats or ((5, 20) if quick else (25, 100))

    def time_ms(fn) -> float:
        return median_ms(fn, device, warmup=warmup, repeats=timed)

    rows = []

    def record(op, variant, ms, error=None):
        rows.append({"shape": name, "mode": mode, "op": op, "variant": variant, "ms": ms,
                     "max_rel_error_vs_cudnn": error, "batch": batch, "c_in": cin, "c_out": cout, "size": size,
                     "kernel": k, "stride": stride, "shared_channels": cp})
        print(f"{name:26s} {mode:5s} {op:12s} {variant:14s} {ms:9.3f} ms" + (f"  err {error:.2e}" if error is not None else ""),
              flush=True)

    def gradients(conv_fn, wrt):
        """Autograd of ``conv_fn(x, w, b)`` for the leaves in ``wrt`` (names among x, w, b), the
        other leaves frozen: a backward that computes those gradients only."""
        leaves = {"x": x, "w": w, "b": b}
        leaves = {key: value.detach().requires_grad_(key in wrt) for key, value in leaves.items()}
        out = conv_fn(leaves["x"], leaves["w"], leaves["b"])
        return lambda: torch.autograd.grad(out, [leaves[key] for key in wrt], dy, retain_graph=True)

    def cudnn(xx, ww, bb):
        return F.conv2d(xx, ww, bb, **conv)

    record("forward", "cudnn", time_ms(lambda: F.conv2d(x, w, b, **conv)))
    cudnn_input_grad, cudnn_weight_grad = gradients(cudnn, "x"), gradients(cudnn, "wb")
    record("input_grad", "cudnn-full", time_ms(cudnn_input_grad))
    record("weight_grad", "cudnn", time_ms(cudnn_weight_grad))
    (expected_dx,), (expected_dw, expected_db) = cudnn_input_grad(), cudnn_weight_grad()
    for backend in backends:
        def partitioned(xx, ww, bb, backend=backend):
            return functional.partitioned_conv2d(xx, ww, bb, **conv, shared_channels=cp, backend=backend)

        record("forward", backend, time_ms(lambda: partitioned(x, w, b)), _max_rel_error(partitioned(x, w, b), y))
        op = gradients(partitioned, "x")
        record("input_grad", f"{backend}-shared", time_ms(op), _max_rel_error(op()[0][:, :cp], expected_dx[:, :cp]))
        op = gradients(partitioned, "wb")
        dw, db = op()
        record("weight_grad", backend, time_ms(op), max(_max_rel_error(dw, expected_dw), _max_rel_error(db, expected_db)))

    if stride == 1 and 2 * padding == k - 1:  # a split point: the conv's input also feeds an exit
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        dp = torch.randn(batch, cin, device=device, dtype=dtype)
        for backend in backends:
            def stage(backend=backend):
                out, pooled = functional.partitioned_conv2d_with_exit_pool(xg, wg, bg, **conv, shared_channels=cp,
                                                                          backend=backend)
                torch.autograd.grad((out, pooled), (xg, wg, bg), (dy, dp))

            record("stage", f"{backend}-{'composed' if backend == 'aten' else 'fused'}", time_ms(stage))
    return rows


def environment() -> dict:
    """Device and versions, for the JSON record."""
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    try:
        versions["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        versions["triton"] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, **versions}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vgg7,resnet18,vgg16", help="comma-separated: " + ",".join(SHAPES))
    parser.add_argument("--modes", default="fp32,tf32,bf16", help="comma-separated: " + ",".join(MODES))
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default: bench/results/...)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_triton_kernels: no CUDA device; this benchmark runs on a GPU only.")
        return 0
    backends = benchmarked_backends("cuda")
    for name in dfs_kernels.BACKENDS:
        if name != "reference" and name not in backends:
            print(f"bench_triton_kernels: {name} backend unavailable: {dfs_kernels.unavailable_reason(name, 'cuda')}")
    rows = []
    for model in args.models.split(","):
        for mode in args.modes.split(","):
            for shape in SHAPES[model]:
                rows.extend(bench_shape(shape, mode, backends, args.quick))
                torch.cuda.empty_cache()
    result = {
        "benchmark": "bench_triton_kernels",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **environment(),
        "beta": BETA,
        "backends": backends,
        "timing": "median of calls between CUDA events, milliseconds",
        "rows": rows,
    }
    output = args.output or Path(__file__).resolve().parent / "results" / (
        f"triton_kernels_{torch.cuda.get_device_name().replace(' ', '_')}_{datetime.datetime.now():%Y%m%d_%H%M%S}.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
