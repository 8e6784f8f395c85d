"""The Triton GEMM kernels compiled for sm_90 (no GPU needed: Triton's bundled ptxas): every default
configuration is free of register spills and its K loop is software-pipelined (asynchronous copies
into multi-buffered shared memory, deeper with num_stages). See tests/triton_compile_check.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_default_configurations_pipeline_without_spills():
    pytest.importorskip("triton")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_compile_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, script, "--pipelining", "--arch", "90"], env=env, capture_output=True,
                            text=True, timeout=900)
    if result.returncode == 3:
        pytest.skip(result.stdout.strip())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert "FAILED" not in result.stdout
    for kernel in ("conv_forward_pooled", "conv_input_grad fill", "conv_input_grad ", "linear_input_grad"):
        assert f" {kernel}" in result.stdout, kernel  # each kernel with a branch at its K loop was checked
