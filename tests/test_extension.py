"""The compiled library: the package without it imports with one clear warning, runs on the reference
backend and refuses an explicit request for the aten backend; a build has it loaded, a CUDA build with a
CUDA kernel for every op; configure says what is missing where CUDA is required but absent."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

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


# Run in a fresh interpreter that loads only the compiled library, so that the ops checked are exactly
# the ones it defines (the Python backends register ops of their own in the same namespace).
REGISTRATIONS_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.ops.load_library(sys.argv[1])
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    ops = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("dfs_kernels::"))
    device_generic = [op for op in ops if has_kernel(op, "CompositeExplicitAutograd")
                      or has_kernel(op, "CompositeImplicitAutograd")]
    with_cuda = [op for op in ops if has_kernel(op, "CUDA")]
    without_cuda = sorted(set(ops) - set(device_generic) - set(with_cuda))
    print(f"{len(ops)} ops: {len(with_cuda)} with a CUDA kernel, {len(device_generic)} device-generic")
    print("missing a CUDA kernel:", " ".join(without_cuda) or "none")
    assert with_cuda and not without_cuda
""")


def test_cuda_build_registers_a_cuda_kernel_for_every_op():
    """A CUDA build must give every op of the library that is not device-generic a CUDA kernel: a binding
    file left out of the build (or cuDNN not found) would otherwise go unnoticed on machines without a
    GPU. Skipped for CPU builds unless DFS_KERNELS_EXPECT_CUDA_BUILD=1 says this build must be one."""
    library = dfs_kernels._library.library_path()
    expected = os.environ.get("DFS_KERNELS_EXPECT_CUDA_BUILD", "0") == "1"
    if not expected and not dfs_kernels._library.has_kernels_for("cuda"):
        pytest.skip("not a CUDA build (DFS_KERNELS_EXPECT_CUDA_BUILD=1 makes this an error)")
    assert library is not None, dfs_kernels._library.load_error()
    result = subprocess.run(
        [sys.executable, "-c", REGISTRATIONS_SCRIPT, library], capture_output=True, text=True, timeout=300
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_configure_says_what_is_missing_where_cuda_is_required(tmp_path):
    """DFS_KERNELS_REQUIRE_CUDA=1 with no usable nvcc (CUDACXX names none) stops at configure, naming what
    is missing: a CPU build of torch, or nvcc where torch is a CUDA build."""
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not on PATH")
    env = dict(os.environ, DFS_KERNELS_REQUIRE_CUDA="1", CUDACXX=str(tmp_path / "no-nvcc"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [cmake, "-S", root, "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython3_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    # The whole reason, with its hint (the reason is passed to CMake's message in pieces).
    missing = ("nvcc was not found (put the CUDA toolkit's bin/ on PATH or set CUDACXX=/path/to/nvcc)"
               if torch.version.cuda else "is not a CUDA build (no lib/libc10_cuda.so)")
    assert result.returncode != 0, result.stdout
    # CMake wraps long messages at a width that depends on the paths in them: compare with spaces collapsed.
    message = " ".join(result.stderr.split())
    assert "DFS_KERNELS_REQUIRE_CUDA is set but" in message and missing in message, result.stderr


@pytest.mark.slow
def test_configure_says_cudnn_is_missing_where_cuda_is_required(tmp_path):
    """With a CUDA torch and nvcc but no cuDNN (the nvidia-cudnn wheel hidden from configure's Python,
    none in the toolkit or CUDNN_ROOT), DFS_KERNELS_REQUIRE_CUDA=1 stops at configure and names cuDNN."""
    cmake, nvcc = shutil.which("cmake"), shutil.which("nvcc")
    if cmake is None or nvcc is None or not torch.version.cuda:
        pytest.skip("needs cmake, nvcc and a CUDA build of torch")
    # A regular package named nvidia on PYTHONPATH shadows the namespace package of the nvidia wheels.
    (tmp_path / "shadow" / "nvidia").mkdir(parents=True)
    (tmp_path / "shadow" / "nvidia" / "__init__.py").write_text("")
    env = {key: value for key, value in os.environ.items() if key != "CUDNN_ROOT"}
    env.update(DFS_KERNELS_REQUIRE_CUDA="1", DFS_KERNELS_CUDA_ARCHS="90", PYTHONPATH=str(tmp_path / "shadow"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [cmake, "-S", root, "-B", str(tmp_path / "build"), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython3_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    if result.returncode == 0 and "cudnn backend ON" in result.stdout:
        pytest.skip("cuDNN is installed outside the nvidia-cudnn wheel (toolkit or system paths)")
    message = " ".join(result.stderr.split())
    assert result.returncode != 0, result.stdout[-3000:]
    assert ("DFS_KERNELS_REQUIRE_CUDA is set but cuDNN was not found (no include/cudnn.h and lib/libcudnn.so* "
            "in the nvidia-cudnn wheel, CUDNN_ROOT or the CUDA toolkit)") in message, result.stderr[-3000:]
