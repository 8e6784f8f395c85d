"""The package without its compiled library: it imports with one clear warning, runs on the
reference backend, and refuses an explicit request for the aten backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import dfs_kernels

SCRIPT = textwrap.dedent("""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import dfs_kernels
    messages = [str(w.message) for w in caught if "compiled ops library" in str(w.message)]
    assert len(messages) == 1, messages
    assert "DFS_KERNELS_DISABLE_EXTENSION" in messages[0]
    import torch
    assert not dfs_kernels.extension_loaded()
    assert dfs_kernels.available_backends() == ["reference"], dfs_kernels.available_backends()
    assert dfs_kernels.resolve_backend("auto") == "reference"
    conv = dfs_kernels.PartitionedConv2d(6, 4, 3, padding=1)
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    conv(x).sum().backward()
    assert x.grad[:, 3:].abs().max() == 0 and x.grad[:, :3].abs().max() > 0
    try:
        dfs_kernels.PartitionedConv2d(6, 4, 3, backend="aten")(x)
    except dfs_kernels.BackendUnavailableError as error:
        assert "not loaded" in str(error), error
    else:
        raise AssertionError("an explicit aten request fell back")
    print("ok")
""")


@pytest.mark.slow
def test_works_without_compiled_library():
    env = dict(os.environ, DFS_KERNELS_DISABLE_EXTENSION="1")
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_library_loaded_in_this_build():
    """In a build made by setup.py or CMake the library must load; a silent fallback would hide a
    broken build behind the reference backend."""
    if os.environ.get("DFS_KERNELS_EXPECT_EXTENSION", "1") == "0":
        pytest.skip("DFS_KERNELS_EXPECT_EXTENSION=0")
    assert dfs_kernels.extension_loaded(), dfs_kernels._library.load_error()
    assert "aten" in dfs_kernels.available_backends("cpu")
