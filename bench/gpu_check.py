"""GPU validation in one budgeted run: build, correctness on CUDA, kernel table and training step.

    python bench/gpu_check.py OUT_DIR                 # on the GPU machine, from the repository root
    python bench/gpu_check.py OUT_DIR --dry-run       # every phase on CPU at tiny sizes (CI)

Five phases, each in a subprocess with its own time limit (``--deadline``, default 540 s, shrinks
the later phases' limits to what is left), so that a slow or failing phase is reported and the run
goes on; a phase saves its figures as it goes, so one stopped by its limit still reports what it
measured:

- ``build``: ``pip install --no-build-isolation --no-deps -e .`` with ``MAX_JOBS`` = CPU cores
  (``--no-build`` or the dry run skip it), then the environment: device, versions, which backends
  can run and why the others cannot.
- ``correctness``: every backend available on the device (Triton with one configuration per kernel,
  ``DFS_KERNELS_TRITON_CONFIGS=1``, so each specialization compiles once) against
  ``dfs_kernels.reference`` with the tolerances of ``dfs_kernels.testing``: float32, TF32,
  bfloat16, NCHW and channels-last, stride 2, groups, Cp at 0 / 1 / Cin-1 / Cin (a sampled grid:
  each convolution sees every Cp), the fused stage, reroute and exit pooling, CUDA-graph capture and
  ``torch.compile(fullgraph=True)``.
- ``kernels``: ``bench_triton_kernels.bench_shape`` on the convolutions of VGG7-64 and ResNet-18
  (CIFAR, batch 256), bfloat16 channels-last, then TF32 while time is left: forward, shared-only
  input gradient and weight gradient of each backend against cuDNN's full convolution.
- ``host_overhead``: the tiny shapes of ``bench_host_overhead.py`` (PartitionedConv2d, PartitionedLinear,
  reroute against their PyTorch counterparts), fwd+bwd and no-grad forward, eager and replayed from a
  CUDA graph: the microseconds per call that the host adds.
- ``train_step``: ``train_step.main`` for VGG7-64 and ResNet-18 at batch 256, bfloat16, channels-last:
  dsn, dfs_eager and dfs on each backend, with R_ideal, R_measured, FPS gain and peak memory.

OUT_DIR receives ``gpu_check.json`` (device, versions, per-phase status, times and every figure),
one log per phase and two PNGs (kernel table, training step). The dry run runs the same code on CPU
(Triton under its interpreter, float16 where the GPU run uses bfloat16, which the interpreter lacks).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PHASES = ("build", "correctness", "kernels", "host_overhead", "train_step")
# Seconds per phase, before the overall deadline shrinks them (a phase never gets more than is left).
PHASE_LIMITS_S = {"build": 150, "correctness": 150, "kernels": 150, "host_overhead": 40, "train_step": 160}
DRY_RUN_LIMITS_S = {"build": 60, "correctness": 120, "kernels": 90, "host_overhead": 60, "train_step": 120}
RESULT_NAME = "gpu_check.json"
MODELS = ("vgg7", "resnet18")


# ------------------------------------------------------------------------------------------ the driver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where gpu_check.json, the logs and the PNGs go")
    parser.add_argument("--dry-run", action="store_true", help="every phase on CPU at tiny sizes")
    parser.add_argument("--deadline", type=float, default=540.0, help="seconds for the whole run (default 540)")
    parser.add_argument("--no-build", action="store_true", help="skip pip install (the package is built)")
    parser.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS",
                        help="a phase's own time limit instead of the default (repeatable)")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # one phase, in a subprocess
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.phase:
        return run_phase(args)
    return drive(args)


def drive(args: argparse.Namespace) -> int:
    started = time.monotonic()
    limits = dict(DRY_RUN_LIMITS_S if args.dry_run else PHASE_LIMITS_S)
    for item in args.limit:
        phase, _, seconds = item.partition("=")
        if phase not in PHASES:
            raise SystemExit(f"--limit: phase must be one of {PHASES}, got {phase!r}")
        try:
            limits[phase] = float(seconds)
        except ValueError:
            raise SystemExit(f"--limit {item}: the seconds must be a number, got {seconds!r}") from None
        if not limits[phase] >= 0:
            raise SystemExit(f"--limit {item}: the seconds must be >= 0, got {seconds!r}")
    result = {
        "tool": "bench/gpu_check.py", "dry_run": args.dry_run,
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "deadline_s": args.deadline,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count()},
        "phases": {},
    }
    for phase in PHASES:
        left = args.deadline - (time.monotonic() - started)
        limit = min(limits[phase], left)
        if limit < 5:
            reason = (f"its limit ({limits[phase]:g} s) is under 5 s" if limits[phase] < 5
                      else "no time left before the deadline")
            result["phases"][phase] = {"status": "skipped", "reason": reason}
        else:
            result["phases"][phase] = run_subprocess_phase(args, phase, limit)
        entry = result["phases"][phase]
        print(f"gpu_check: {phase:12s} {entry['status']:8s} {entry.get('seconds', 0):6.1f} s", flush=True)
        if phase == "build":
            result["environment"] = entry.pop("environment", None)
        write_json(args.out_dir / RESULT_NAME, result)
    result["wall_s"] = time.monotonic() - started
    result["files"] = sorted(path.name for path in args.out_dir.iterdir() if path.name != RESULT_NAME
                             and not path.name.startswith("."))
    write_json(args.out_dir / RESULT_NAME, result)
    print(f"gpu_check: wrote {args.out_dir / RESULT_NAME} in {result['wall_s']:.0f} s")
    return 0 if all(entry["status"] == "passed" for entry in result["phases"].values()) else 1


def run_subprocess_phase(args: argparse.Namespace, phase: str, limit: float) -> dict:
    """Runs ``phase`` in its own process group, killed (with whatever it started: compile workers,
    the build) when ``limit`` seconds have passed. Its figures come from the file it keeps saving."""
    partial = args.out_dir / f".{phase}.json"
    partial.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_DIR), os.environ.get("PYTHONPATH")])),
               PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["TRITON_INTERPRET"] = "1"
    if phase == "correctness":
        env["DFS_KERNELS_TRITON_CONFIGS"] = "1"
    command = [sys.executable, str(Path(__file__).resolve()), str(args.out_dir), "--phase", phase,
               "--deadline", f"{limit:.0f}"]
    command += ["--dry-run"] * args.dry_run + ["--no-build"] * args.no_build
    begin = time.monotonic()
    with open(args.out_dir / f"{phase}.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_DIR,
                                   start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            timed_out = True
    entry = {"seconds": time.monotonic() - begin, "limit_s": limit, "returncode": returncode, "log": f"{phase}.log"}
    if partial.exists():
        entry.update(json.loads(partial.read_text()))
        partial.unlink()
    failed = [check["name"] for check in entry.get("checks", []) if check["status"] == "failed"]
    if timed_out:
        entry["status"] = "timeout"
    elif returncode != 0 or failed:
        entry["status"] = "failed"
    else:
        entry["status"] = "passed"
    if failed:
        entry["failed_checks"] = failed
    return entry


def write_json(path: Path, record: dict) -> None:
    """Writes atomically: a reader (or a kill) never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(record, indent=1, default=str))
    temporary.replace(path)


# ----------------------------------------------------------------------------------------- the phases


class PhaseRecord(dict):
    """What a phase reports: saved after every change, so that a phase killed by its limit still
    reports what it did. ``check(name)`` times one check and records its outcome."""

    def __init__(self, path: Path) -> None:
        super().__init__(checks=[])
        self.path = path

    def save(self) -> None:
        write_json(self.path, self)

    @contextlib.contextmanager
    def check(self, name: str, **details):
        entry = {"name": name, **details, "status": "passed"}
        begin = time.monotonic()
        try:
            yield entry
        except SkipCheck as reason:
            entry.update(status="skipped", reason=str(reason))
        except Exception as error:  # noqa: BLE001  (a failing check is reported, the others go on)
            entry.update(status="failed", error=f"{type(error).__name__}: {error}"[:2000])
            traceback.print_exc()
        entry["seconds"] = round(time.monotonic() - begin, 3)
        print(f"{entry['status']:7s} {name} ({entry['seconds']:.1f} s)" + (f": {entry.get('error', '')}" if
              entry["status"] == "failed" else ""), flush=True)
        self["checks"].append(entry)
        self.save()


class SkipCheck(Exception):
    """A check that cannot run here (e.g. CUDA graphs on CPU)."""


def run_phase(args: argparse.Namespace) -> int:
    record = PhaseRecord(args.out_dir / f".{args.phase}.json")
    record.save()
    phase = {"build": phase_build, "correctness": phase_correctness, "kernels": phase_kernels,
             "host_overhead": phase_host_overhead, "train_step": phase_train_step}[args.phase]
    phase(record, args)
    record.save()
    return 0


def phase_build(record: PhaseRecord, args: argparse.Namespace) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(REPO_DIR)]
    record["command"] = " ".join(command)
    record["max_jobs"] = os.cpu_count()
    with record.check("build") as entry:
        entry["built"] = False
        if args.dry_run or args.no_build:
            raise SkipCheck("dry run: the package is used in place" if args.dry_run else "--no-build")
        # Its own limit, under the phase's: a hung build leaves time to record the environment.
        subprocess.run(command, check=True, timeout=max(args.deadline - 20, 10), cwd=REPO_DIR,
                       env=dict(os.environ, MAX_JOBS=str(os.cpu_count())))
        entry["built"] = True
    with record.check("environment") as entry:
        # This process imports the package only now, so it loads the library just built.
        record["environment"] = environment(args.dry_run)
        entry["backends"] = record["environment"]["backends"]
        if not args.dry_run and not record["environment"]["device"]["cuda"]:
            raise RuntimeError("CUDA is not available")


def environment(dry_run: bool) -> dict:
    """Device, versions and which backends run on the checked device (with why the others cannot)."""
    import importlib.metadata

    import torch

    import dfs_kernels

    device = "cpu" if dry_run else "cuda"
    info = {"device": {"checked": device, "cuda": torch.cuda.is_available(), "cpu_count": os.cpu_count()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "dfs_kernels": dfs_kernels.__version__,
                         "extension_loaded": dfs_kernels.extension_loaded()}}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info["device"].update(name=properties.name, capability=f"{properties.major}.{properties.minor}",
                              memory_gib=round(properties.total_memory / 2**30, 1),
                              multiprocessors=properties.multi_processor_count)
        info["versions"]["cudnn"] = torch.backends.cudnn.version()
        info["versions"]["driver"] = _nvidia_smi_driver()
    for package in ("triton", "numpy"):
        try:
            info["versions"][package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info["versions"][package] = None
    info["backends"] = dfs_kernels.available_backends(device, include_interpreted=True)
    info["unavailable"] = {name: dfs_kernels.unavailable_reason(name, device)
                           for name in dfs_kernels.BACKENDS if name not in info["backends"]}
    return info


def _nvidia_smi_driver() -> str | None:
    try:
        output = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return output.strip().splitlines()[0] if output.strip() else None


# --- correctness ------------------------------------------------------------------------------------

# (name, kernel, stride, padding, groups): stride 2, a 1x1 downsample and groups.
CONVS = [("k3", 3, 1, 1, 1), ("k3-stride2", 3, 2, 1, 1), ("k1-stride2", 1, 2, 0, 1), ("k3-groups2", 3, 1, 1, 2)]


def phase_correctness(record: PhaseRecord, args: argparse.Namespace) -> None:
    import torch

    import dfs_kernels

    device = torch.device("cpu" if args.dry_run else "cuda")
    backends = [name for name in dfs_kernels.available_backends(device, include_interpreted=True) if name != "reference"]
    half = torch.float16 if args.dry_run else torch.bfloat16  # the Triton interpreter has no bfloat16
    precisions = [("float32", torch.float32, False), ("tf32", torch.float32, True), (str(half).split(".")[1], half, False)]
    # Small maps (the interpreter runs every program in Python), several tiles wide on a GPU.
    batch, c_in, c_out, size = (2, 6, 4, (7, 6)) if args.dry_run else (4, 48, 40, (15, 13))
    record.update(device=str(device), backends=backends, shape=dict(batch=batch, c_in=c_in, c_out=c_out, size=size))
    cases = list(itertools.product(backends, precisions, ("contiguous", "channels_last"), CONVS))
    if args.dry_run:
        cases = cases[::3]
    cps = [0, 1, c_in - 1, c_in]
    for index, (backend, (label, dtype, tf32), layout, conv) in enumerate(cases):
        name, k, stride, padding, groups = conv
        cp = cps[(index // len(CONVS) + CONVS.index(conv)) % len(cps)]  # each convolution sees every Cp
        with record.check(f"conv {backend} {label} {layout} {name} cp={cp}", backend=backend):
            check_conv(backend, device, dtype, tf32, layout, (batch, c_in, c_out, size, k, stride, padding, groups), cp)
    for backend, (label, dtype, tf32) in itertools.product(backends, precisions):
        layout = "channels_last" if label != "float32" else "contiguous"
        with record.check(f"fused stage {backend} {label} {layout}", backend=backend):
            check_fused_stage(backend, device, dtype, tf32, layout, (batch, c_in, c_out, size), c_in // 2)
    for backend in backends:
        for cp in (0, c_in // 2, c_in):
            with record.check(f"reroute and exit pool {backend} cp={cp}", backend=backend):
                check_referencing(backend, device, (batch, c_in, *size), cp)
    for backend in backends:
        with record.check(f"cuda graph {backend}", backend=backend):
            check_cuda_graph(backend, device, (batch, c_in, c_out, size))
        with record.check(f"torch.compile fullgraph {backend}", backend=backend):
            check_compile(backend, device, (batch, c_in, c_out, size), dry_run=args.dry_run)
    checks = record["checks"]
    record["summary"] = {status: sum(check["status"] == status for check in checks)
                         for status in ("passed", "failed", "skipped")}


@contextlib.contextmanager
def _tf32(enabled: bool):
    import torch

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _leaves(shapes, dtype, device, layout):
    import torch

    generator = torch.Generator().manual_seed(0)
    leaves = []
    for shape in shapes:
        tensor = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
        if layout == "channels_last" and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        leaves.append(tensor.requires_grad_())
    return leaves


def _compare(actual_fn, expected_fn, leaves, tolerance_key, tf32: bool) -> None:
    """Forward and every leaf's gradient of ``actual_fn`` (TF32 as asked) against ``expected_fn``
    (the oracle, TF32 off) under the same random cotangents."""
    import torch

    from dfs_kernels.testing import assert_close

    def run(fn, allow_tf32):
        clones = [leaf.detach().clone().requires_grad_() for leaf in leaves]
        with _tf32(allow_tf32):
            outputs = fn(*clones)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            generator = torch.Generator().manual_seed(1)
            cotangents = [torch.randn(out.shape, generator=generator).to(out.device, out.dtype) for out in outputs]
            torch.autograd.backward(outputs, cotangents)
        return outputs, [clone.grad for clone in clones]

    actual_out, actual_grads = run(actual_fn, tf32)
    expected_out, expected_grads = run(expected_fn, False)
    for index, (a, e) in enumerate(zip(actual_out, expected_out)):
        assert_close(a, e, name=f"output {index}", dtype=tolerance_key)
    for index, (leaf, a, e) in enumerate(zip(leaves, actual_grads, expected_grads)):
        assert_close(a, e, name=f"gradient of leaf {index}", dtype=tolerance_key, like=leaf)


def _tolerance_key(dtype, tf32: bool):
    return "tf32" if tf32 else dtype


def check_conv(backend, device, dtype, tf32, layout, shape, cp) -> None:
    from dfs_kernels import functional, reference

    batch, c_in, c_out, size, k, stride, padding, groups = shape
    leaves = _leaves([(batch, c_in, *size), (c_out, c_in // groups, k, k), (c_out,)], dtype, device, layout)
    conv = dict(stride=stride, padding=padding, groups=groups)
    _compare(lambda x, w, b: functional.partitioned_conv2d(x, w, b, **conv, shared_channels=cp, backend=backend),
             lambda x, w, b: reference.partitioned_conv2d(x, w, b, **conv, shared_channels=cp),
             leaves, _tolerance_key(dtype, tf32), tf32)


def check_fused_stage(backend, device, dtype, tf32, layout, shape, cp) -> None:
    from dfs_kernels import functional, reference

    batch, c_in, c_out, size = shape
    leaves = _leaves([(batch, c_in, *size), (c_out, c_in, 3, 3), (c_out,)], dtype, device, layout)
    _compare(lambda x, w, b: functional.partitioned_conv2d_with_exit_pool(x, w, b, 1, 1, shared_channels=cp,
                                                                          backend=backend),
             lambda x, w, b: reference.partitioned_conv2d_with_exit_pool(x, w, b, 1, 1, shared_channels=cp),
             leaves, _tolerance_key(dtype, tf32), tf32)


def check_referencing(backend, device, shape, cp) -> None:
    import torch

    from dfs_kernels import functional, reference

    def split_and_pool(module, **kwargs):
        def run(x):
            backbone, exit_view = module.reroute(x, cp, **kwargs)
            return backbone * 2, exit_view * 3, module.exit_avg_pool(x, cp, **kwargs)
        return run

    leaves = _leaves([shape], torch.float32, device, "channels_last")
    _compare(split_and_pool(functional, backend=backend), split_and_pool(reference), leaves, torch.float32, False)


def check_cuda_graph(backend, device, shape) -> None:
    """Forward and backward of a DFS stage captured in one CUDA graph, replayed on new inputs."""
    import torch

    from dfs_kernels import functional
    from dfs_kernels.testing import assert_close

    if device.type != "cuda":
        raise SkipCheck("CUDA graphs need a CUDA device")
    batch, c_in, c_out, size = shape
    x, w, b = _leaves([(batch, c_in, *size), (c_out, c_in, 3, 3), (c_out,)], torch.float32, device, "channels_last")
    dy = torch.randn(batch, c_out, *size, device=device)

    def step():
        out, pooled = functional.partitioned_conv2d_with_exit_pool(x, w, b, 1, 1, shared_channels=c_in // 2,
                                                                   backend=backend)
        return (out, pooled, *torch.autograd.grad((out, pooled.sum()), (x, w, b), (dy, None)))

    graph, captured = capture(step)
    with torch.no_grad():
        for tensor in (x, w, b):
            tensor.copy_(torch.randn_like(tensor))
    graph.replay()
    torch.cuda.synchronize()
    for index, (replayed, eager) in enumerate(zip(captured, step())):
        assert_close(replayed, eager, name=f"replayed output {index}", dtype=torch.float32)


def capture(fn):
    """(CUDA graph of one call of ``fn``, the outputs it captured), after a warm-up (autotuning,
    allocations, gradients' first creation) on a side stream, off the capture."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured


def check_compile(backend, device, shape, *, dry_run: bool) -> None:
    """A stage of every op under ``torch.compile(fullgraph=True)`` (inductor on GPU; AOTAutograd
    without code generation in the dry run), against the oracle."""
    import torch

    from dfs_kernels import functional, reference

    if dry_run and backend == "triton":
        raise SkipCheck("the Triton interpreter runs kernels on the host, which tracing with fake tensors cannot")
    batch, c_in, c_out, size = shape
    cp = c_in // 2

    def stage(module, **kwargs):
        def run(x, w, b):
            out, pooled = module.partitioned_conv2d_with_exit_pool(x, w, b, 1, 1, shared_channels=cp, **kwargs)
            backbone, exit_view = module.reroute(out, c_out // 2, **kwargs)
            # The weight's first c_out input channels serve again (c_out <= c_in), with stride 2.
            second = module.partitioned_conv2d(backbone, w[:, :c_out], None, 2, 1, shared_channels=c_out // 2, **kwargs)
            return second, pooled, module.exit_avg_pool(exit_view, c_out // 2, **kwargs)
        return run

    torch._dynamo.reset()
    compiled = torch.compile(stage(functional, backend=backend), fullgraph=True,
                             backend="aot_eager" if dry_run else "inductor")
    leaves = _leaves([(batch, c_in, *size), (c_out, c_in, 3, 3), (c_out,)], torch.float32, device, "channels_last")
    _compare(compiled, stage(reference), leaves, torch.float32, False)


# --- kernel table -----------------------------------------------------------------------------------


def kernel_shapes(dry_run: bool) -> list[tuple]:
    """The convolutions of VGG7-64 and ResNet-18 (CIFAR, batch 256); in the dry run a few of them
    shrunk (batch 2, channels / 16, maps / 4)."""
    import bench_triton_kernels

    shapes = [shape for model in MODELS for shape in bench_triton_kernels.SHAPES[model]]
    if not dry_run:
        return shapes
    small = []
    for name, _, cin, cout, size, k, stride, padding in shapes:
        if name in ("vgg7.conv2", "vgg7.conv3", "resnet18.layer2.down3x3", "resnet18.layer2.down1x1"):
            small.append((name, 2, max(cin // 16, 4), max(cout // 16, 4), max(size // 4, 4), k, stride, padding))
    return small


def phase_kernels(record: PhaseRecord, args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(BENCH_DIR))
    import bench_triton_kernels

    device = torch.device("cpu" if args.dry_run else "cuda")
    backends = bench_triton_kernels.benchmarked_backends(device)
    modes = ["fp32"] if args.dry_run else ["bf16", "tf32"]  # the interpreter has no bfloat16
    repeats = (1, 2) if args.dry_run else (10, 40)
    record.update(device=str(device), backends=backends, modes=modes, beta=bench_triton_kernels.BETA,
                  timing=f"median of {repeats[1]} calls after {repeats[0]} warm-up, CUDA events on GPU", rows=[])
    for mode, shape in itertools.product(modes, kernel_shapes(args.dry_run)):
        with record.check(f"{mode} {shape[0]}", mode=mode):
            record["rows"].extend(bench_triton_kernels.bench_shape(shape, mode, backends, False, device=device,
                                                                   repeats=repeats))
            record["summary"] = kernel_summary(record["rows"])
            if device.type == "cuda":
                torch.cuda.empty_cache()
    with record.check("plot"):
        record["plot"] = plot_kernels(record["rows"], args.out_dir / "kernels.png")


def kernel_summary(rows: list[dict]) -> dict:
    """Per mode, op and backend: the geometric mean over shapes of time / cuDNN's time, the worst
    shape's ratio and its largest error against cuDNN."""
    import math

    baseline = {(row["mode"], row["shape"], row["op"]): row["ms"] for row in rows
                if row["variant"] in ("cudnn", "cudnn-full")}
    ratios: dict = {}
    for row in rows:
        if row["variant"] in ("cudnn", "cudnn-full") or row["op"] == "stage":
            continue
        key = (row["mode"], row["op"], row["variant"])
        ratios.setdefault(key, []).append((row["ms"] / baseline[(row["mode"], row["shape"], row["op"])],
                                           row["max_rel_error_vs_cudnn"]))
    summary = {}
    for (mode, op, variant), values in ratios.items():
        summary.setdefault(mode, {}).setdefault(op, {})[variant] = {
            "geomean_vs_cudnn": math.exp(sum(math.log(ratio) for ratio, _ in values) / len(values)),
            "worst_vs_cudnn": max(ratio for ratio, _ in values),
            "max_rel_error": max((error for _, error in values if error is not None), default=None),
            "shapes": len(values)}
    return summary


def plot_kernels(rows: list[dict], path: Path) -> str:
    """Time / cuDNN's per shape: one panel per mode and op, one bar per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(row["mode"] for row in rows))
    ops = ("forward", "input_grad", "weight_grad")
    figure, axes = plt.subplots(len(modes), len(ops), figsize=(15, 4 * len(modes)), squeeze=False)
    baseline = {(row["mode"], row["shape"], row["op"]): row["ms"] for row in rows
                if row["variant"] in ("cudnn", "cudnn-full")}
    for axis_row, mode in zip(axes, modes):
        for axis, op in zip(axis_row, ops):
            selected = [row for row in rows if row["mode"] == mode and row["op"] == op
                        and row["variant"] not in ("cudnn", "cudnn-full")]
            shapes = list(dict.fromkeys(row["shape"] for row in selected))
            variants = list(dict.fromkeys(row["variant"] for row in selected))
            width = 0.8 / max(len(variants), 1)
            for index, variant in enumerate(variants):
                values = {row["shape"]: row["ms"] / baseline[(mode, row["shape"], op)]
                          for row in selected if row["variant"] == variant}
                axis.bar([i + index * width for i in range(len(shapes))], [values.get(s, 0) for s in shapes],
                         width, label=variant)
            axis.axhline(1.0, color="k", linewidth=0.8)
            if op == "input_grad":
                axis.axhline(0.55, color="r", linestyle="--", linewidth=0.8, label="target 0.55")
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], shapes, rotation=45, ha="right",
                            fontsize=7)
            axis.set_title(f"{mode} {op}: time / cuDNN full")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path.name


# --- host overhead ----------------------------------------------------------------------------------


def phase_host_overhead(record: PhaseRecord, args: argparse.Namespace) -> None:
    """Per call, the DFS modules and reroute against their PyTorch counterparts at the tiny shapes of
    bench/bench_host_overhead.py, where a call is almost all host work: eager (what the host adds) and
    replayed from a CUDA graph (what is left without the host)."""
    sys.path.insert(0, str(BENCH_DIR))
    import torch

    import bench_host_overhead as overhead

    device = torch.device("cpu" if args.dry_run else "cuda")
    rounds, calls = (1, 3) if args.dry_run else (5, 200)
    record.update(device=device.type, rows=[])
    for case in (case for case in overhead.CASES if case.tiny):
        x = torch.randn(case.shape, device=device)
        impls = case.build(device)
        for phase in overhead.PHASES:
            fns = {name: overhead.call(fn, x, phase) for name, fn in impls.items()}
            for mode in ("eager", "cuda graph"):
                with record.check(f"host overhead {case.name} {phase} {mode}"):
                    if mode == "cuda graph":
                        if device.type != "cuda":
                            raise SkipCheck("CUDA graphs need a CUDA device")
                        fns = {name: capture(fn)[0].replay for name, fn in fns.items()}
                    best = overhead.measure_pair(fns, rounds, calls, device)
                    record["rows"].append({"case": case.name, "shape": list(case.shape), "phase": phase,
                                           "mode": mode, "pytorch_us": best["pytorch"], "dfs_us": best["dfs"]})


# --- training step ----------------------------------------------------------------------------------


def phase_train_step(record: PhaseRecord, args: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    import train_step

    if args.dry_run:
        options = ["--device", "cpu", "--batch-sizes", "2", "--dtype", "float32", "--warmup", "0", "--iterations", "1"]
    else:
        options = ["--device", "cuda", "--batch-sizes", "256", "--dtype", "bfloat16", "--warmup", "5",
                   "--iterations", "20"]
    options += ["--channels-last", "--beta", "0.5"]
    record.update(options=" ".join(options), models={})
    for model in MODELS:
        with record.check(f"train_step {model}"):
            output = args.out_dir / f".train_step_{model}.json"
            try:
                full = train_step.main(["--model", model, *options, "--output", str(output)])
            finally:
                output.unlink(missing_ok=True)
            record["models"][model] = train_step_summary(full)
            failed = {label: variant["error"] for label, variant in record["models"][model]["variants"].items()
                      if variant.get("error")}
            if failed:
                raise RuntimeError(f"variants failed: {failed}")
    with record.check("plot"):
        record["plot"] = plot_train_step(record["models"], args.out_dir / "train_step.png")


def train_step_summary(full: dict) -> dict:
    """The figures of one train_step record (its raw per-step timings left out)."""
    run = full["runs"][0]
    variants = {}
    for label, variant in run["variants"].items():
        variants[label] = {key: variant.get(key) for key in
                           ("median_forward_s", "median_backward_s", "median_other_s", "median_step_s", "fps",
                            "peak_memory_bytes", "error")}
    dsn_fps = variants["dsn"].get("fps")
    dfs = {}
    for label, entry in (run.get("dfs") or {}).items():
        fps = variants[label].get("fps")
        dfs[label] = {"r_ideal": entry["r_ideal"], "r_measured": entry["r_measured"],
                      "r_measured_paired": entry["r_measured_paired"], "saving_realized": entry["saving_realized"],
                      "fps_gain_vs_dsn": fps / dsn_fps - 1 if fps and dsn_fps else None,
                      "peak_memory_vs_dsn": (variants[label]["peak_memory_bytes"] / variants["dsn"]["peak_memory_bytes"]
                                             if variants[label].get("peak_memory_bytes")
                                             and variants["dsn"].get("peak_memory_bytes") else None)}
    return {"batch_size": run["batch_size"], "input_grad_time_s": run.get("input_grad_time_s"), "variants": variants,
            "dfs": dfs, "unavailable_backends": full.get("unavailable_backends"), "wall_s": full.get("wall_s")}


def plot_train_step(models: dict, path: Path) -> str:
    """Step time per variant (bars) with FPS gain over dsn, and R_measured beside R_ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, (model, summary) in zip(axes[0], models.items()):
        labels = [label for label, v in summary["variants"].items() if v.get("median_step_s")]
        axis.bar(labels, [summary["variants"][label]["median_step_s"] * 1e3 for label in labels], color="tab:blue")
        for index, label in enumerate(labels):
            entry = summary["dfs"].get(label)
            if entry:
                gain = entry["fps_gain_vs_dsn"]
                axis.annotate(f"R {entry['r_measured']:.2f} (ideal {entry['r_ideal']:.2f})"
                              + (f"\nFPS {gain * 100:+.0f}%" if gain is not None else ""),
                              (index, summary["variants"][label]["median_step_s"] * 1e3), ha="center",
                              va="bottom", fontsize=7)
        axis.set_ylabel("ms per step (median)")
        axis.set_title(f"{model}, batch {summary['batch_size']}")
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path.name


if __name__ == "__main__":
    sys.exit(main())
