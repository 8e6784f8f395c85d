"""Training runs in child processes, for the tests that compare one process with several: one process,
``torchrun`` on this machine, and two torchrun "nodes" meeting at a c10d rendezvous. Every launch runs
once, except for the abort at exit described at ``ABORT_AT_EXIT``. All traffic stays on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_FLOAT64 = (
    "import json, sys, torch\n"
    "from dfs_kernels.training.trainer import TrainConfig, train\n"
    "torch.set_default_dtype(torch.float64)\n"
    "train(TrainConfig(**json.loads(sys.argv[1])))\n"
)
TIMEOUT = 300
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, GLOO_SOCKET_IFNAME="lo")
"""One thread per process (the machine's cores are shared by the processes) and Gloo on loopback."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    """torchrun starting ``processes`` processes on this machine (its own store on a free loopback port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(processes),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--local-addr", "127.0.0.1"]


ABORT_AT_EXIT = "terminate called without an active exception"
"""How a torchrun child that finished its work sometimes dies as its interpreter shuts down (SIGABRT in
torch's C++ runtime, after ``destroy_process_group``): not understood yet, so a launch that fails only that
way is run once more. Any other failure, and every numeric check, fails the test."""


def train_float64(script_dir, fields: dict, *, processes: int = 1, nodes: int = 1) -> None:
    """Trains ``TrainConfig(**fields)`` with float64 as the default dtype: in this process's interpreter
    (``processes=1``), under torchrun (``processes`` on one node), or as ``nodes`` torchrun launches of one
    process each that meet at a c10d rendezvous on 127.0.0.1 (each a "machine" of a multi-node job)."""
    script = script_dir / "train_float64.py"
    script.write_text(TRAIN_FLOAT64)
    arguments = [str(script), json.dumps(fields)]
    for attempt in range(2):
        failures = _launch(script_dir, arguments, processes, nodes)
        if not failures or attempt or not all(ABORT_AT_EXIT in stderr for _, stderr in failures):
            break
    for what, stderr in failures:
        raise AssertionError(f"{what} failed:\n{stderr[-3000:]}")


def _launch(script_dir, arguments: list[str], processes: int, nodes: int) -> list[tuple[str, str]]:
    """Runs one launch; returns (what, stderr) of each process or node that failed."""
    if nodes > 1:  # the c10d rendezvous numbers the nodes (--node-rank is for static rendezvous only)
        endpoint = f"127.0.0.1:{free_port()}"
        logs = [script_dir / f"node{node}.stderr" for node in range(nodes)]
        launches = []
        try:
            for log in logs:
                with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall its node
                    launches.append(subprocess.Popen(
                        [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nodes), "--nproc-per-node",
                         "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "test",
                         "--local-addr", "127.0.0.1", *arguments],
                        stdout=subprocess.DEVNULL, stderr=stderr, cwd=ROOT, env=ENV))
            returncodes = [launch.wait(TIMEOUT) for launch in launches]
        finally:
            for launch in launches:
                launch.kill()
        return [(f"node {node} (exit status {code})", log.read_text())
                for node, (code, log) in enumerate(zip(returncodes, logs)) if code != 0]
    launcher = torchrun(processes) if processes > 1 else [sys.executable]
    done = subprocess.run([*launcher, *arguments], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT, env=ENV)
    return [] if done.returncode == 0 else [(f"{' '.join(launcher[-6:])} (exit status {done.returncode})", done.stderr)]


def largest_relative_difference(a, b) -> float:
    """The largest, over pairs of tensors, of max |x - y| / max |x|."""
    return max(float((x - y).abs().max() / x.abs().max().clamp_min(1e-300)) for x, y in zip(a, b, strict=True))
