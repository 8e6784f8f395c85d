"""Timing and memory helpers of the benchmarks.

``PhaseClock`` splits one step into phases: host clock on CPU, CUDA events on GPU (so the phases
are GPU time, not launch time). ``median_ms`` times a kernel call the same way. ``peak_step_memory``
measures the memory one step allocates on top of what was live before it.
"""

from __future__ import annotations

import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import torch


class PhaseClock:
    """``start()``, then ``mark()`` at the end of each phase, then ``durations()`` (seconds per phase,
    synchronizing on GPU). One clock per step."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [self._now()]

    def mark(self) -> None:
        self._marks.append(self._now())

    def durations(self) -> list[float]:
        pairs = zip(self._marks, self._marks[1:])
        if self.cuda:
            self._marks[-1].synchronize()
            return [begin.elapsed_time(end) / 1e3 for begin, end in pairs]
        return [end - begin for begin, end in pairs]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values: list[float]) -> float:
    return statistics.median(values)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones. On GPU
    each call lies between two CUDA events and all calls are queued before one synchronization, so
    the host's launch time hides behind the device's work as in a training loop; host clock on CPU."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return median([start.elapsed_time(end) for start, end in events])


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least squares ``y = intercept + slope * x`` with its R^2; None with fewer than two distinct xs."""
    if len(set(xs)) < 2:
        return None
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    intercept = mean_y - slope * mean_x
    total = sum((y - mean_y) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "r2": 1.0 - residual / total if total > 0 else 1.0}


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated on ``device`` while ``step()`` runs, above what was allocated before it:
    activations saved for backward, gradients and every temporary of forward, backward and optimizer.

    CUDA: the caching allocator's peak statistics. CPU: torch has no allocator statistics there, so
    the step runs once under the profiler with ``profile_memory=True`` and the allocation and free
    events of CPU tensors are replayed in time order. Returns None if the profiler records none.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    changes = sorted(_cpu_allocation_events(profiler.profiler.kineto_results.experimental_event_tree()))
    if not changes:
        return None
    live = peak = 0
    for _, size in changes:
        live += size
        peak = max(peak, live)
    return peak


def _cpu_allocation_events(roots) -> list[tuple[int, int]]:
    """(time ns, bytes: positive for an allocation, negative for a free) of CPU tensors in a profiler tree."""
    allocation = torch._C._profiler._EventType.Allocation
    events, pending = [], list(roots)
    while pending:
        node = pending.pop()
        pending.extend(node.children)
        kind, fields = node.typed
        if kind == allocation and fields.device.type == "cpu":
            events.append((node.start_time_ns, fields.alloc_size))
    return events
