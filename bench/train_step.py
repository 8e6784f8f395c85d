"""Training-step benchmark of the multi-exit models: DSN against DFS (eager reference and the
package's ops on every available backend), and DFS against its ideal (docs/cost_model.md).

    python bench/train_step.py                       # VGG7-64, CPU or GPU defaults
    python bench/train_step.py --model resnet18 --batch-sizes 32 64 --plot
    python bench/train_step.py --beta-sweep --plot   # the paper's Figure 5
    python bench/train_step.py --model torchvision:resnet50 --exits layer1,layer2,layer3 --image-size 64

A step is forward + summed exit cross-entropies, backward, SGD step (momentum) and zero_grad; it is
split into forward, backward and other (optimizer), timed with the host clock on CPU and CUDA events on
GPU, and the median over the timed steps is reported with FPS and peak step memory. All variants are
run round-robin, one step each per iteration with the order rotating, so drift (thermal, other load)
hits them alike.

D, the time the DSN step spends in the input gradients of the layers DFS partitions (``PartitionedConv2d``,
and the transformers' ``PartitionedLinear``), is measured in the same run as the difference between the
DSN step and the same DSN model whose partitioned layers compute no input gradient (``ConvWithoutInputGrad``,
``LinearWithoutInputGrad``: the weight and bias gradients by ATen, a zero tensor as the input gradient; the
exits unchanged). Each exit still sends gradient into its layer, so everything upstream of those layers
runs as in DSN and the difference is their input-gradient work less a zero-fill.
Timing the convolution backward of each layer's shapes in isolation would miss the step's cache and
scheduling context. D is the median of the per-iteration differences of the two backward phases
(forward and optimizer work are the same in both), and with it:

    R_ideal    = (T_dsn - (1 - beta) * D) / T_dsn    R_measured = T_dfs / T_dsn
    saving realized = (T_dsn - T_dfs) / ((1 - beta) * D)

R_measured is also given from the per-iteration ratios ("paired"), which drift cannot bias. MSDNet's
and the official ViT's dfs flavours partition no layer (their split points are reroutes), so there D = 0
and R_ideal = 1. The token models ("bert_tiny") are fed random token ids of their sequence length.

A library model (``--model torchvision:NAME``, ``timm:NAME`` or ``hf:NAME`` with ``--exits``, see
``dfs_kernels.models.zoo``) is wrapped by ``dfs_kernels.multi_exit`` in each flavour from one set of
weights; D swaps the layers its DFS wrapper partitions (``MultiExitModel.partitioned``) in the DSN wrapper.
It is fed random images of ``--image-size`` or, for Hugging Face text models, token ids of ``--seq-len``.

Peak memory is what a step allocates above what was live before it (CUDA allocator statistics; on
CPU, the profiler's allocation events replayed in order). A JSON record with every raw timing goes
to bench/results/; ``--plot`` writes PNGs beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# Kineto (the profiler behind the CPU peak-memory measurement) prints "USDT ... profiler_start/stop"
# for every profiled step, at a level above its errors; 6 silences them. Read when the profiler first
# starts, so setting it here, after importing torch, is in time.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
try:
    import dfs_kernels
except ImportError:  # run from a checkout that is not installed
    sys.path.insert(0, str(BENCH_DIR.parent))
    import dfs_kernels
from dfs_kernels import models  # noqa: E402
from dfs_kernels.models import zoo  # noqa: E402
from dfs_kernels.multi_exit import MultiExitModel, final_logits  # noqa: E402
from dfs_kernels.cli._common import HelpFormatter, comma_separated, json_object  # noqa: E402
from dfs_kernels.nn import PartitionedLinear  # noqa: E402
from dfs_kernels.nn import PartitionedConv2d  # noqa: E402
from dfs_kernels.training.distributed import check_device  # noqa: E402

from _timing import PhaseClock, linear_fit, median, peak_step_memory  # noqa: E402

try:
    from tqdm.auto import tqdm
except ImportError:  # tqdm is a declared dependency, but the GPU machines may lack it
    tqdm = None

RESULTS_DIR = BENCH_DIR / "results"
PHASES = ("forward", "backward", "other")
BETA_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DSN_WITHOUT_INPUT_GRADS = "dsn_without_input_grads"
PEAK_MEMORY_MEASURE = ("bytes allocated at the peak of one training step above those live before it "
                       "(CUDA: allocator peak statistics; CPU: profiler allocation events replayed in order)")
# Defaults per device type: batch sizes (a range, for the linear fit), warm-up and timed steps.
DEFAULT_BATCH_SIZES = {
    "cpu": {"vgg7": (16, 32, 64), "resnet18": (8, 16, 32), "vgg16": (2, 4, 8), "msdnet": (16, 32, 64),
            "msdnet_imagenet": (2, 4, 8), "vit_tiny": (16, 32, 64), "vit_tiny_gemm_input": (16, 32, 64),
            "vit_tiny_digits": (32, 64, 128), "vit_tiny_digits_gemm_input": (32, 64, 128), "bert_tiny": (16, 32, 64),
            "bert_tiny_digits": (64, 128, 256), "bert_small": (4, 8, 16)},
    "cuda": {"vgg7": (128, 256, 512), "resnet18": (64, 128, 256), "vgg16": (32, 64, 128),
             "msdnet": (128, 256, 512), "msdnet_imagenet": (32, 64, 128), "vit_tiny": (256, 512, 1024),
             "vit_tiny_gemm_input": (256, 512, 1024), "vit_tiny_digits": (512, 1024, 2048),
             "vit_tiny_digits_gemm_input": (512, 1024, 2048),
             "bert_tiny": (256, 512, 1024), "bert_tiny_digits": (1024, 2048, 4096), "bert_small": (32, 64, 128)},
}
DEFAULT_STEPS = {"cpu": (3, 40), "cuda": (10, 30)}
NUM_CLASSES = {"vgg7": 100, "resnet18": 100, "msdnet": 100, "vgg16": 1000, "msdnet_imagenet": 1000, "vit_tiny": 10,
               "vit_tiny_gemm_input": 10, "vit_tiny_digits": 10, "vit_tiny_digits_gemm_input": 10, "bert_tiny": 2,
               "bert_tiny_digits": 10, "bert_small": 2}
LIBRARY_NUM_CLASSES = 10
LIBRARY_BATCH_SIZES = {"cpu": (8, 16), "cuda": (64, 128)}
OPTIMIZERS = ("sgd", "adamw")


@dataclass(eq=False)  # identity hashing: variants key dicts
class Variant:
    """One model being timed: a flavour (and backend), or the DSN model without partitioned input grads."""

    label: str
    flavour: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    beta: float | None  # None for the DSN models
    error: str | None = None
    timings: dict[int, dict[str, list[float]]] = field(default_factory=dict)  # batch size -> phase -> seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--model", default="vgg7", metavar="MODEL",
                        help=f"multi-exit network: one of {sorted(models.MODELS)} (factory names such as vgg7_64 "
                             "work too), or a library model torchvision:NAME, timm:NAME or hf:NAME with --exits")
    parser.add_argument("--exits", type=comma_separated, metavar="NAME,NAME,...",
                        help="library models: the modules whose outputs the exits read, in the order they run")
    parser.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                        help="library models: keyword arguments of the model (Hugging Face: of its configuration)")
    parser.add_argument("--image-size", type=int, default=64, help="library image models: input height and width")
    parser.add_argument("--seq-len", type=int, default=128, help="Hugging Face text models: tokens per sequence")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: by model and device")
    parser.add_argument("--beta", type=float, default=0.5, help="DFS shared fraction of channels")
    parser.add_argument("--beta-sweep", action="store_true",
                        help=f"also time dfs at beta in {BETA_SWEEP} at the largest batch size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16 runs forward and loss under autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format (image models); --no-channels-last for NCHW. The default: "
                             "oneDNN and cuDNN run faster in it, for DSN and DFS alike")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                        help="sgd (momentum 0.9) or adamw (the transformers' optimizer)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--iterations", type=int, help="timed steps per variant (default: 40 CPU, 30 GPU)")
    parser.add_argument("--warmup", type=int,
                        help="untimed steps per variant first (default: 3 CPU, 10 GPU; at least 5 with --compile)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    parser.add_argument("--output", type=Path,
                        help="JSON path (default: bench/results/train_step_<model>_<device>_<time>.json)")
    parser.add_argument("--plot", action="store_true", help="write PNG figures beside the JSON")
    args = parser.parse_args(argv)
    try:
        if zoo.is_spec(args.model):
            zoo.parse_spec(args.model)
            if not args.exits:
                raise ValueError(f"--exits is required for the library model {args.model!r}")
        else:
            args.model = models.canonical_model_name(args.model)
            if args.exits or args.model_kwargs:
                raise ValueError("--exits and --model-kwargs apply to library models (torchvision:, timm:, hf:)")
    except ValueError as error:
        parser.error(str(error))
    try:
        args.device = check_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    device_type = "cuda" if args.device.type == "cuda" else "cpu"
    warmup, iterations = DEFAULT_STEPS[device_type]
    if args.compile:  # the first steps compile (forward, backward) and may recompile once
        warmup = max(warmup, 5)
    args.warmup = warmup if args.warmup is None else args.warmup
    args.iterations = iterations if args.iterations is None else args.iterations
    args.batch_sizes = args.batch_sizes or list(DEFAULT_BATCH_SIZES[device_type].get(
        args.model, LIBRARY_BATCH_SIZES[device_type]))
    if args.iterations < 1 or args.warmup < 0 or min(args.batch_sizes) < 1:
        parser.error("--iterations and --batch-sizes must be positive, --warmup non-negative")
    return args


# ----------------------------------------------------------------------------------------------- models


def partitioned_layer_names(model: nn.Module) -> list[str]:
    partitioned = (PartitionedConv2d, PartitionedLinear)
    return [name for name, module in model.named_modules() if isinstance(module, partitioned)]


@torch.library.custom_op("dfs_kernels_bench::zeros_like", mutates_args=())
def zeros_like_opaque(input: torch.Tensor) -> torch.Tensor:
    """``torch.zeros_like``, opaque to torch.compile: inductor would otherwise fold the zeros into the
    ops that consume them (an add, a ReLU's backward) and so remove more than the input gradient from
    the compiled step, inflating D."""
    return torch.zeros_like(input)


@zeros_like_opaque.register_fake
def _(input):
    return torch.empty_like(input)


class _ConvZeroInputGrad(torch.autograd.Function):
    """conv2d whose backward computes the weight and bias gradients and, for the input, only a zero
    tensor: the gradient stays materialized (like DSN's) so the ops upstream see the same inputs,
    and the one difference from DSN is the input-gradient convolution itself (less a zero-fill)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(input, weight)
        ctx.args = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.args
        _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_output, input, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0, 0], groups, [False, True, has_bias])
        grad_input = zeros_like_opaque(input) if ctx.needs_input_grad[0] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None


class ConvWithoutInputGrad(nn.Conv2d):
    """nn.Conv2d (same parameters) whose input gradient is never computed (see _ConvZeroInputGrad)."""

    def _conv_forward(self, input, weight, bias):
        return _ConvZeroInputGrad.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


class _LinearZeroInputGrad(torch.autograd.Function):
    """linear whose backward computes the weight and bias gradients and a zero input gradient (as
    _ConvZeroInputGrad)."""

    @staticmethod
    def forward(ctx, input, weight, bias):
        ctx.save_for_backward(input)
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (input,) = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = rows.t() @ input.reshape(-1, input.shape[-1])
        grad_bias = rows.sum(0) if ctx.has_bias else None
        grad_input = zeros_like_opaque(input) if ctx.needs_input_grad[0] else None
        return grad_input, grad_weight, grad_bias


class LinearWithoutInputGrad(nn.Linear):
    """nn.Linear (same parameters) whose input gradient is never computed (see _LinearZeroInputGrad)."""

    def forward(self, input):
        return _LinearZeroInputGrad.apply(input, self.weight, self.bias)


def _without_input_grad(layer: nn.Module) -> nn.Module:
    if isinstance(layer, nn.Linear):
        replacement = LinearWithoutInputGrad(layer.in_features, layer.out_features, layer.bias is not None,
                                             device="meta")
    else:
        replacement = ConvWithoutInputGrad(
            layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
            layer.groups, layer.bias is not None, device="meta")
    replacement.weight, replacement.bias = layer.weight, layer.bias
    return replacement


def without_input_grads(model: nn.Module, layer_names: list[str]) -> nn.Module:
    """``model`` (in place) with the named convolutions and linear layers computing no input gradient:
    DSN's step minus D."""
    for name in layer_names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, _without_input_grad(getattr(parent, child_name)))
    return model


def make_variant(label: str, flavour: str, model: nn.Module, beta: float | None, state: dict,
                 args: argparse.Namespace) -> Variant:
    model.load_state_dict(state)
    model.to(args.device).train()
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    return Variant(label, flavour, torch.compile(model) if args.compile else model, optimizer, beta)


def num_classes(args: argparse.Namespace) -> int:
    return NUM_CLASSES.get(args.model, LIBRARY_NUM_CLASSES)


def library_inputs(args: argparse.Namespace, backbone: nn.Module, batch_size: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Random inputs of a library model: token ids for Hugging Face text models, images otherwise."""
    if zoo.reads_tokens(args.model):
        return torch.randint(backbone.config.vocab_size, (batch_size, args.seq_len), generator=generator)
    return torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator)


def model_builder(args: argparse.Namespace):
    """``build(flavour, **kwargs)`` (kwargs: beta, backend) of the benchmarked model. A library model's
    backbone is built once; each flavour wraps a copy of it with ``multi_exit``."""
    if not zoo.is_spec(args.model):
        return lambda flavour, **kwargs: models.build_model(args.model, num_classes=num_classes(args),
                                                            flavour=flavour, **kwargs)
    backbone = zoo.build_backbone(args.model, num_classes=num_classes(args), **args.model_kwargs)
    example = library_inputs(args, backbone, 2, torch.Generator().manual_seed(args.seed))
    return lambda flavour, **kwargs: dfs_kernels.multi_exit(copy.deepcopy(backbone), args.exits,
                                                            num_classes=num_classes(args), flavour=flavour,
                                                            example_input=example, **kwargs)


def build_variants(args: argparse.Namespace, betas: list[float], *, include_eager: bool = True,
                   ) -> tuple[list[Variant], dict[str, str]]:
    """DSN, DSN without partitioned input grads (when the dfs flavour partitions a layer), and per beta
    dfs_eager and dfs on each available backend, all from one initial state. Also returns the
    backends that cannot run here, with the reason."""
    torch.manual_seed(args.seed)
    build = model_builder(args)
    dsn = build("dsn")
    state = dsn.state_dict()
    variants = [make_variant("dsn", "dsn", dsn, None, state, args)]
    layer_names = partitioned_layer_names(build("dfs"))
    if layer_names:
        skipped = without_input_grads(build("dsn"), layer_names)
        variants.append(make_variant(DSN_WITHOUT_INPUT_GRADS, "dsn", skipped, None, state, args))
    backends = dfs_kernels.available_backends(args.device)
    unavailable = {name: dfs_kernels.unavailable_reason(name, args.device) or "runs only under the Triton interpreter"
                   for name in dfs_kernels.BACKENDS if name not in backends}
    for beta in betas:
        suffix = "" if len(betas) == 1 else f"@{beta:g}"
        if include_eager:
            model = build("dfs_eager", beta=beta)
            variants.append(make_variant(f"dfs_eager{suffix}", "dfs_eager", model, beta, state, args))
        for backend in backends:
            model = build("dfs", beta=beta, backend=backend)
            variants.append(make_variant(f"dfs:{backend}{suffix}", "dfs", model, beta, state, args))
    return variants, unavailable


# ------------------------------------------------------------------------------------------------ steps


def train_step(variant: Variant, images: torch.Tensor, labels: torch.Tensor, clock: PhaseClock,
               autocast: contextlib.AbstractContextManager) -> None:
    clock.start()
    with autocast:
        logits = variant.model(images)
        logits[-1] = final_logits(logits[-1])  # a library model's own output (e.g. a Hugging Face ModelOutput)
        loss = sum(F.cross_entropy(exit_logits.float(), labels) for exit_logits in logits)
    clock.mark()
    loss.backward()
    clock.mark()
    variant.optimizer.step()
    variant.optimizer.zero_grad(set_to_none=True)
    clock.mark()


def make_batch(args: argparse.Namespace, batch_size: int, model: nn.Module, num_classes: int):
    generator = torch.Generator().manual_seed(args.seed + batch_size)
    if isinstance(model, MultiExitModel):
        images = library_inputs(args, model.model, batch_size, generator).to(args.device)
    else:
        images = model.example_input(batch_size, generator).to(args.device)
    if args.channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(num_classes, (batch_size,), generator=generator).to(args.device)
    return images, labels


def run_interleaved(variants: list[Variant], args: argparse.Namespace, batch_size: int,
                    progress) -> dict[str, int | None]:
    """Times every variant at ``batch_size``: warm-up then timed steps, round-robin with the order
    rotating each iteration; then one step each for peak memory. A variant that raises is dropped with
    its error recorded. Returns the peak memory per variant label."""
    images, labels = make_batch(args, batch_size, getattr(variants[0].model, "_orig_mod", variants[0].model),
                                num_classes(args))
    clock = PhaseClock(args.device)
    autocast = (torch.autocast(args.device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())
    for variant in variants:
        variant.timings[batch_size] = {phase: [] for phase in PHASES}
    gc.collect()
    gc.disable()  # as timeit does: a collection would otherwise land in some variant's step at random
    try:
        for iteration in range(args.warmup + args.iterations):
            shift = iteration % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                if variant.error is None:
                    try:
                        train_step(variant, images, labels, clock, autocast)
                    except Exception as error:  # noqa: BLE001  (a failing variant is reported, the rest go on)
                        variant.error = f"{type(error).__name__}: {error}"
                    else:
                        if iteration >= args.warmup:
                            for phase, seconds in zip(PHASES, clock.durations()):
                                variant.timings[batch_size][phase].append(seconds)
                progress.update(1)
    finally:
        gc.enable()
    return {
        variant.label: peak_step_memory(lambda: train_step(variant, images, labels, clock, autocast), args.device)
        for variant in variants if variant.error is None
    }


# ------------------------------------------------------------------------------------------------ results


def summarize(variants: list[Variant], batch_size: int, peaks: dict[str, int | None]) -> dict:
    """Medians, FPS, memory, D, R_ideal and R_measured at one batch size (seconds, bytes)."""
    summary = {"batch_size": batch_size, "variants": {}}
    for variant in variants:
        timings = variant.timings[batch_size]
        steps = [sum(phases) for phases in zip(*(timings[phase] for phase in PHASES))]
        record = {f"{phase}_s": timings[phase] for phase in PHASES} | {"step_s": steps, "error": variant.error}
        if steps and variant.error is None:
            record |= {f"median_{phase}_s": median(timings[phase]) for phase in PHASES}
            record |= {"median_step_s": median(steps), "fps": batch_size / median(steps),
                       "peak_memory_bytes": peaks.get(variant.label)}
        summary["variants"][variant.label] = record
    dsn = summary["variants"]["dsn"]
    skipped = summary["variants"].get(DSN_WITHOUT_INPUT_GRADS)
    if "median_step_s" not in dsn:
        return summary
    t_dsn = dsn["median_step_s"]
    if skipped is None:  # the dfs flavour partitions no layer: nothing to save
        d = 0.0
    elif "median_step_s" in skipped:
        # Backward phases only: the forward and optimizer work of the two models is the same, so their
        # differences would add noise and nothing else. Paired: both ran in the same iteration.
        d = median([a - b for a, b in zip(dsn["backward_s"], skipped["backward_s"])])
    else:
        summary["input_grad_time_s"] = None
        return summary
    summary["input_grad_time_s"] = d
    summary["dfs"] = {}
    record_of = {variant: summary["variants"][variant.label] for variant in variants}
    medians = {variant: record.get("median_step_s") for variant, record in record_of.items()}
    for variant, t_dfs in medians.items():
        if variant.flavour == "dsn" or t_dfs is None:
            continue
        possible = (1 - variant.beta) * d
        entry = {"beta": variant.beta, "r_ideal": (t_dsn - possible) / t_dsn, "r_measured": t_dfs / t_dsn,
                 # the same ratio from the steps of each iteration, which ran side by side: robust to drift
                 "r_measured_paired": median([a / b for a, b in zip(record_of[variant]["step_s"], dsn["step_s"])])}
        entry["gap"] = entry["r_measured"] - entry["r_ideal"]
        entry["saving_realized"] = (t_dsn - t_dfs) / possible if possible > 0 else None
        eager = [medians[other] for other in medians if other.flavour == "dfs_eager" and other.beta == variant.beta]
        if variant.flavour == "dfs" and eager and eager[0] is not None:
            entry["speedup_vs_dfs_eager"] = eager[0] / t_dfs - 1
        summary["dfs"][variant.label] = entry
    return summary


def fit_batch_sizes(runs: list[dict]) -> dict[str, dict[str, float] | None]:
    """Per variant, median step time against batch size: slope (s / image), intercept (s), R^2."""
    labels = runs[0]["variants"].keys()
    fits = {}
    for label in labels:
        points = [(run["batch_size"], run["variants"][label]["median_step_s"])
                  for run in runs if "median_step_s" in run["variants"][label]]
        fits[label] = linear_fit(*map(list, zip(*points))) if points else None
    return fits


def format_run(run: dict) -> str:
    ms, mib = 1e3, 2**20
    dsn = run["variants"]["dsn"]
    header = (f"{'variant':<26}{'forward':>9}{'backward':>10}{'other':>8}{'step':>9}{'FPS':>8}"
              f"{'peak MiB':>10}{'vs dsn':>8}")
    lines = [f"batch {run['batch_size']}  (median ms per step)", header, "-" * len(header)]
    for label, record in run["variants"].items():
        if "median_step_s" not in record:
            lines.append(f"{label:<26}  failed: {record['error']}")
            continue
        peak = record["peak_memory_bytes"]
        ratio = record["median_step_s"] / dsn["median_step_s"] if "median_step_s" in dsn else float("nan")
        lines.append(
            f"{label:<26}" + "".join(f"{record[f'median_{p}_s'] * ms:>{w}.1f}" for p, w in zip(PHASES, (9, 10, 8)))
            + f"{record['median_step_s'] * ms:>9.1f}{record['fps']:>8.1f}"
            + (f"{peak / mib:>10.1f}" if peak is not None else f"{'n/a':>10}") + f"{ratio:>8.3f}"
        )
    if run.get("input_grad_time_s", 0.0) is None:
        lines.append(f"D not measured: {DSN_WITHOUT_INPUT_GRADS} failed")
    elif "input_grad_time_s" in run:
        lines.append(f"D = {run['input_grad_time_s'] * ms:.1f} ms: "
                     "input gradients of the partitioned layers in the DSN step"
                     + ("" if DSN_WITHOUT_INPUT_GRADS in run["variants"] else " (the dfs flavour partitions no layer)"))
        for label, entry in run["dfs"].items():
            realized = entry["saving_realized"]
            line = (f"  {label:<24} R_ideal {entry['r_ideal']:.3f}  R_measured {entry['r_measured']:.3f} "
                    f"(paired {entry['r_measured_paired']:.3f})  "
                    f"gap {entry['gap']:+.3f}  saving realized "
                    + (f"{realized * 100:.0f}%" if realized is not None else "n/a"))
            if "speedup_vs_dfs_eager" in entry:
                line += f"  {entry['speedup_vs_dfs_eager'] * 100:+.1f}% vs dfs_eager"
            lines.append(line)
        memory = {label: record.get("peak_memory_bytes") for label, record in run["variants"].items()}
        if memory.get("dsn"):
            lines.append("  peak memory vs dsn: " + ", ".join(
                f"{label} {peak / memory['dsn']:.3f}" for label, peak in memory.items()
                if label.startswith("dfs") and peak is not None))
    return "\n".join(lines)


def verdict(runs: list[dict]) -> str | None:
    """One line for the largest batch size: how much faster the fastest ``dfs`` variant is than DSN, and
    what share of the ideal saving it realizes; None where no DFS variant ran."""
    run = max(runs, key=lambda run: run["batch_size"])
    candidates = {label: entry for label, entry in run.get("dfs", {}).items() if label.startswith("dfs:")}
    if not candidates:
        return None
    label, entry = min(candidates.items(), key=lambda item: item[1]["r_measured"])
    faster = 1 / entry["r_measured"] - 1
    line = (f"verdict (batch {run['batch_size']}): {label} is {abs(faster) * 100:.1f}% "
            f"{'faster' if faster >= 0 else 'slower'} than dsn")
    if entry["saving_realized"] is not None:
        line += f"; {entry['saving_realized'] * 100:.0f}% of the ideal saving realized (R_ideal {entry['r_ideal']:.3f})"
    return line


def format_fits(fits: dict) -> str:
    lines = ["step time vs batch size (least squares over the median step times)",
             f"{'variant':<26}{'ms / image':>11}{'intercept ms':>14}{'R^2':>8}"]
    for label, fit in fits.items():
        lines.append(f"{label:<26}  n/a (one batch size)" if fit is None else
                     f"{label:<26}{fit['slope'] * 1e3:>11.2f}{fit['intercept'] * 1e3:>14.1f}{fit['r2']:>8.4f}")
    return "\n".join(lines)


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def settings_line(args: argparse.Namespace) -> str:
    """What this run used of the settings a user chooses, and what we recommend for them."""
    if args.device.type == "cpu":
        return (f"settings: layout {'channels_last' if args.channels_last else 'NCHW (--no-channels-last)'}, "
                f"{torch.get_num_threads()} threads (torch.get_num_threads(); one per physical core), "
                f"CPU capability {torch.backends.cpu.get_cpu_capability()}. Recommended on CPU: channels_last "
                "(model.to(memory_format=torch.channels_last) and channels-last inputs) and one thread per core")
    return (f"settings: layout {'channels_last' if args.channels_last else 'NCHW (--no-channels-last)'}, "
            f"{args.dtype}. Recommended on GPU: channels_last with bfloat16")


def environment(args: argparse.Namespace) -> dict:
    device = {"type": args.device.type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "cpu": cpu_model_name(),
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.device.type == "cuda":
        device["name"] = torch.cuda.get_device_name(args.device)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "dfs_kernels": dfs_kernels.__version__, "extension_loaded": dfs_kernels.extension_loaded(),
                "cuda": torch.version.cuda}
    try:
        versions["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        versions["triton"] = None
    return {"device": device, "versions": versions}


def plot(record: dict, path_stem: Path) -> list[Path]:
    """Figure 4: stacked forward/backward/other bars per variant and batch size, FPS on a second axis.
    Figure 5 (with a beta sweep): R_measured and R_ideal against beta, FPS on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    runs = record["runs"]
    figure, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4.5), squeeze=False)
    for axis, run in zip(axes[0], runs):
        labels = [label for label, r in run["variants"].items()
                  if "median_step_s" in r and label != DSN_WITHOUT_INPUT_GRADS]
        positions = range(len(labels))
        bottom = [0.0] * len(labels)
        for phase in PHASES:
            heights = [run["variants"][label][f"median_{phase}_s"] * 1e3 for label in labels]
            axis.bar(positions, heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
        axis.set_xticks(positions, labels, rotation=30, ha="right")
        axis.set_title(f"batch {run['batch_size']}")
        axis.set_ylabel("ms per step")
        fps_axis = axis.twinx()
        fps_axis.plot(positions, [run["variants"][label]["fps"] for label in labels], "kD", label="FPS")
        fps_axis.set_ylim(0, 1.15 * max(run["variants"][label]["fps"] for label in labels))
        fps_axis.set_ylabel("FPS")
    handles = axes[0][0].get_legend_handles_labels()[0] + fps_axis.get_legend_handles_labels()[0]
    figure.legend(handles, [*PHASES, "FPS"], loc="lower center", ncol=4)
    figure.suptitle(f"{record['config']['model']} training step on {record['device']['type']}")
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    written.append(path_stem.with_name(path_stem.name + "_steps.png"))
    figure.savefig(written[-1], dpi=120)
    plt.close(figure)

    sweep = record.get("beta_sweep")
    if sweep:
        figure, axis = plt.subplots(figsize=(6, 4.5))
        betas = sorted({entry["beta"] for entry in sweep["dfs"].values()})
        fps_axis = axis.twinx()
        for name in sorted({label.split("@")[0] for label in sweep["dfs"]}):
            entries = [sweep["dfs"][f"{name}@{beta:g}"] for beta in betas if f"{name}@{beta:g}" in sweep["dfs"]]
            entry_betas = [entry["beta"] for entry in entries]
            axis.plot(entry_betas, [entry["r_measured"] for entry in entries], "o-", label=f"{name} R_measured")
            fps = [sweep["variants"][f"{name}@{beta:g}"]["fps"] for beta in entry_betas]
            fps_axis.plot(entry_betas, fps, "x:", label=f"{name} FPS")
        t_dsn, d = sweep["variants"]["dsn"]["median_step_s"], sweep["input_grad_time_s"]
        axis.plot(betas, [(t_dsn - (1 - beta) * d) / t_dsn for beta in betas], "k--", label="R_ideal")
        axis.set_xlabel("beta")
        axis.set_ylabel("T_dfs / T_dsn")
        fps_axis.set_ylabel("FPS")
        axis.legend(loc="upper left")
        fps_axis.legend(loc="lower right")
        axis.set_title(f"{record['config']['model']}, batch {sweep['batch_size']}")
        figure.tight_layout()
        written.append(path_stem.with_name(path_stem.name + "_beta_sweep.png"))
        figure.savefig(written[-1], dpi=120)
        plt.close(figure)
    return written


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormals from small gradients would slow some steps at random
    variants, unavailable = build_variants(args, [args.beta])
    for name, reason in unavailable.items():
        print(f"not benchmarked: backend {name!r}: {reason}")
    runs = []
    steps_per_batch = (args.warmup + args.iterations) * len(variants)
    with _progress(steps_per_batch * len(args.batch_sizes), "steps") as progress:
        for batch_size in args.batch_sizes:
            peaks = run_interleaved(variants, args, batch_size, progress)
            runs.append(summarize(variants, batch_size, peaks))

    sweep = None
    if args.beta_sweep:
        batch_size = max(args.batch_sizes)
        sweep_variants, _ = build_variants(args, list(BETA_SWEEP), include_eager=False)
        with _progress((args.warmup + args.iterations) * len(sweep_variants), "beta sweep") as progress:
            peaks = run_interleaved(sweep_variants, args, batch_size, progress)
        sweep = summarize(sweep_variants, batch_size, peaks)

    config = {key: str(value) if isinstance(value, (Path, torch.device)) else value
              for key, value in vars(args).items()}
    record = {"benchmark": "train_step", "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
              **environment(args), "config": config, "unavailable_backends": unavailable,
              "peak_memory_measure": PEAK_MEMORY_MEASURE,
              "runs": runs, "linear_fit": fit_batch_sizes(runs), "beta_sweep": sweep}
    output = args.output or RESULTS_DIR / (
        f"train_step_{args.model.replace(':', '_')}_{args.device.type}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    record["wall_s"] = time.perf_counter() - started

    device_name = record["device"].get("name", f"{record['device']['threads']} threads")
    print(f"\n{args.model} on {args.device.type} ({device_name}), {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
          f"beta {args.beta}; median of {args.iterations} steps after {args.warmup} warm-up, variants interleaved")
    print(settings_line(args))
    for run in runs:
        print("\n" + format_run(run))
    print("\n" + format_fits(record["linear_fit"]))
    if sweep:
        print("\nbeta sweep\n" + format_run(sweep))
    record["verdict"] = verdict(runs)
    if record["verdict"]:
        print("\n" + record["verdict"])
    output.write_text(json.dumps(record, indent=1))
    print(f"\nwrote {output}")
    if args.plot:
        for path in plot(record, output.with_suffix("")):
            print(f"wrote {path}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return record


def _progress(total: int, description: str):
    if tqdm is not None:
        return tqdm(total=total, desc=description, unit="step", file=sys.stderr)
    return _PlainProgress(total, description)


class _PlainProgress:
    """Progress on stderr every 10% when tqdm is not installed."""

    def __init__(self, total: int, description: str) -> None:
        self.total, self.description, self.done = total, description, 0

    def update(self, count: int) -> None:
        self.done += count
        if self.done * 10 // self.total != (self.done - count) * 10 // self.total:
            print(f"{self.description}: {self.done}/{self.total}", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


if __name__ == "__main__":
    main()
