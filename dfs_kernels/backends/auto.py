"""``backend="auto"`` by measurement, where several backends can run a call (CUDA, with those of
"aten", "cudnn" and "triton" that are available): per call key (op, device, dtype, memory format,
shapes, arguments, which inputs need gradients) the candidates are timed once on clones of the
arguments (forward, plus backward when an input needs a gradient) and the fastest is used from then
on. The choices are cached for the process (``auto_choices()`` shows them) and, when ``DFS_KERNELS_AUTOTUNE_CACHE`` names a JSON file, on disk.
A candidate must beat the first ("aten") by more than ``AUTO_MARGIN`` to replace it, so "auto" is
never slower than "aten" beyond measurement noise.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import types
from collections.abc import Callable

import torch

logger = logging.getLogger("dfs_kernels")

# How this module reaches the registry (dfs_kernels.backends), which imports it: set by ``connect``.
_registry = types.SimpleNamespace(
    implementation=None,  # (backend name, device type) -> backend namespace
    candidates=None,  # device type -> names "auto" chooses among
)


def connect(*, implementation: Callable[[str, str], object], candidates: Callable[[str], list[str]]) -> None:
    _registry.implementation = implementation
    _registry.candidates = candidates


AUTO_MARGIN = 0.03
"""A candidate replaces "aten" only when measured faster by more than this fraction."""

_AUTO_CACHE: dict[tuple, str] = {}  # call key -> chosen backend, for the process
_AUTO_TIMINGS: dict[tuple, dict[str, float]] = {}  # call key -> seconds per candidate, as measured
_DISK_CACHE_LOADED: list[str] = []  # paths already read


def auto_choices() -> dict[tuple, dict[str, object]]:
    """What ``"auto"`` chose so far in this process: call key -> {"backend": name, "seconds":
    {candidate: measured median}} ("seconds" is empty when the choice came from the disk cache)."""
    return {key: {"backend": name, "seconds": dict(_AUTO_TIMINGS.get(key, {}))} for key, name in _AUTO_CACHE.items()}


def _argument_key(value) -> object:
    if isinstance(value, torch.Tensor):
        if value.is_contiguous():
            layout = "nchw"
        elif value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last):
            layout = "nhwc"
        else:
            layout = "strided"
        return (tuple(value.shape), value.dtype, layout, value.requires_grad)
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def _call_key(op: str, args: tuple) -> tuple:
    """(op, device type, device index, one key per argument): everything that changes which backend
    is fastest. Plain tuples of ints and strings, so a cached choice is a dict lookup that
    torch.compile traces."""
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    return (op, device.type, device.index) + tuple(_argument_key(a) for a in args)


def _disk_key(key: tuple) -> str:
    # On disk the key also names the GPU and the software, which the process key need not.
    device_name = torch.cuda.get_device_name(key[2]) if key[1] == "cuda" else key[1]
    return repr((device_name, torch.__version__) + key)


def _cuda_timer(fn: Callable[[], None], device: torch.device) -> float:
    """Median seconds of ``fn`` on the GPU: CUDA events around each run, after a warm-up that also
    lets Triton compile and autotune its kernels for this shape."""
    with torch.cuda.device(device):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


_STORED_CHOICES: dict[str, str] = {}  # disk key -> backend, as read from the disk cache


def _disk_cache_path() -> str | None:
    return os.environ.get("DFS_KERNELS_AUTOTUNE_CACHE") or None


def _load_disk_cache() -> None:
    path = _disk_cache_path()
    if path is None or path in _DISK_CACHE_LOADED:
        return
    _DISK_CACHE_LOADED.append(path)
    try:
        with open(path) as file:
            stored = json.load(file)
    except (OSError, ValueError):
        return
    _STORED_CHOICES.update(stored if isinstance(stored, dict) else {})


def _save_disk_cache() -> None:
    path = _disk_cache_path()
    if path is None:
        return
    try:
        with open(path) as file:
            stored = json.load(file)
        stored = stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        stored = {}
    stored.update({_disk_key(key): name for key, name in _AUTO_CACHE.items()})
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(stored, file, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        logger.warning("could not write the backend='auto' cache %s: %s", path, error)


class MeasuredAuto:
    """The ``"auto"`` backend where several candidates can run: each call is dispatched to the
    candidate measured fastest for its key; the first call of a key measures every candidate on
    clones of its arguments (forward, plus backward when an input needs a gradient).

    ``timer(fn, device) -> seconds`` is injectable (tests); the default uses CUDA events. Under
    ``torch.compile`` nothing is measured: a key not yet measured in eager mode uses the first
    candidate ("aten").
    """

    name = "auto"

    def __init__(self, candidates: list[str] | None = None, *, device_type: str = "cuda",
                 timer: Callable[[Callable[[], None], torch.device], float] | None = None,
                 margin: float = AUTO_MARGIN) -> None:
        self._candidates = None if candidates is None else list(candidates)
        self.device_type = device_type
        self.timer = timer or _cuda_timer
        self.margin = margin

    @property
    def candidates(self) -> list[str]:
        """The given candidates, or those of ``device_type`` (``_auto_candidates``) when none were."""
        return self._candidates if self._candidates is not None else _registry.candidates(self.device_type)

    def _choose(self, op: str, args: tuple) -> str:
        if len(self.candidates) == 1:
            return self.candidates[0]
        key = _call_key(op, args)
        choice = _AUTO_CACHE.get(key)
        if choice is not None and choice in self.candidates:
            return choice
        if torch.compiler.is_compiling():  # nothing is measured while tracing
            return self.candidates[0]
        _load_disk_cache()
        choice = _STORED_CHOICES.get(_disk_key(key)) if _STORED_CHOICES else None
        if choice in self.candidates:
            _AUTO_CACHE[key] = choice
            return choice
        choice = self._measure(op, args, key)
        _save_disk_cache()
        return choice

    def _measure(self, op: str, args: tuple, key: tuple) -> str:
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        timings = {}
        for name in self.candidates:
            try:
                timings[name] = self.timer(_workload(_registry.implementation(name, device.type), op, args), device)
            except Exception as error:  # a candidate that cannot run this call is not a candidate
                logger.warning("backend='auto': %r failed on %s: %s", name, op, error)
        if not timings:
            raise RuntimeError(f"backend='auto': no candidate among {self.candidates} ran {op}")
        baseline = self.candidates[0] if self.candidates[0] in timings else min(timings, key=timings.get)
        fastest = min(timings, key=timings.get)
        choice = fastest if timings[fastest] < (1.0 - self.margin) * timings[baseline] else baseline
        _AUTO_CACHE[key] = choice
        _AUTO_TIMINGS[key] = timings
        logger.info("backend='auto' chose %r for %s (seconds: %s)", choice, key, timings)
        return choice

    def _dispatch(self, op: str, *args):
        name = self._choose(op, args)
        return getattr(_registry.implementation(name, _first_device_type(args)), op)(*args)

    def partitioned_conv2d(self, input, weight, bias, stride, padding, dilation, groups, shared_channels):
        return self._dispatch("partitioned_conv2d", input, weight, bias, stride, padding, dilation, groups,
                              shared_channels)

    def partitioned_conv2d_with_exit_pool(self, input, weight, bias, stride, padding, dilation, groups,
                                          shared_channels):
        return self._dispatch("partitioned_conv2d_with_exit_pool", input, weight, bias, stride, padding, dilation,
                              groups, shared_channels)

    def reroute(self, x, shared_channels, dim=1):
        return self._dispatch("reroute", x, shared_channels, dim)

    def exit_reference(self, x, shared_channels, dim=1):
        return self._dispatch("exit_reference", x, shared_channels, dim)

    def exit_avg_pool(self, x, shared_channels, dim=1):
        return self._dispatch("exit_avg_pool", x, shared_channels, dim)

    def partitioned_linear(self, input, weight, bias, shared_features):
        return self._dispatch("partitioned_linear", input, weight, bias, shared_features)


def _first_device_type(args: tuple) -> str:
    return next(a for a in args if isinstance(a, torch.Tensor)).device.type


def _workload(backend, op: str, args: tuple) -> Callable[[], None]:
    """One call of ``op`` on ``backend`` with clones of ``args``, and its backward with fixed random
    cotangents when an input requires a gradient."""
    clones = tuple(
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args
    )
    leaves = [a for a in clones if isinstance(a, torch.Tensor) and a.requires_grad]
    fn = getattr(backend, op)
    cotangents: list[torch.Tensor] = []

    def run() -> None:
        outputs = fn(*clones)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if not leaves:
            return
        if not cotangents:
            cotangents.extend(torch.randn_like(out) for out in outputs)
        torch.autograd.grad(outputs, leaves, cotangents, allow_unused=True)

    return run
