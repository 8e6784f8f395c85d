"""Build and install dfs_kernels; the compiled ops (dfs_kernels/_C) are built by CMakeLists.txt.

Environment:
  DFS_KERNELS_SKIP_CUDA_BUILD=1   build the CPU ops only, even where nvcc and a CUDA torch are present
  DFS_KERNELS_REQUIRE_CUDA=1      fail unless the CUDA kernels and the cuDNN backend are built, saying what is missing
  DFS_KERNELS_CUDA_ARCHS="80;90"  CUDA architectures (default covers A100 and H100/H200)
  CUDNN_ROOT=/path                cuDNN (include/cudnn.h, lib/libcudnn.so*) for the "cudnn" backend, when it is
                                  neither in the nvidia-cudnn wheel torch depends on nor in the CUDA toolkit
  MAX_JOBS=N                      parallel compile jobs
Install with --no-build-isolation so that the build uses the torch already installed (an isolated
build would fetch a second, CUDA-enabled torch).
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # the build-time torch is the runtime torch (no build isolation)

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        # One CMake tree per torch installation: CMake caches what it found (torch's libraries, CUDA,
        # cuDNN), so a tree configured for another environment's torch must not be reused.
        torch_dir = Path(torch.__file__).resolve().parent
        torch_key = hashlib.sha256(str(torch_dir).encode()).hexdigest()[:8]
        build_dir = Path(self.build_temp).resolve() / f"cmake-torch{torch.__version__}-{torch_key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake",
            "-S", str(ROOT),
            "-B", str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DDFS_KERNELS_OUTPUT_DIR={build_dir / 'lib'}",
        ]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_dir / "lib" / "_C.so", target)


setup(
    ext_modules=[CMakeExtension("dfs_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
)
