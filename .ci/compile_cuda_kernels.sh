#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc alone (no torch) for sm_80 and sm_90, with warnings, register
# spills and local memory as errors: checks that the library build (.ci/run's oldest leg, which compiles
# and links the kernels with the C++ bindings and the cuDNN backend against a CUDA torch) does not make.
# Objects go to a temporary directory and are discarded.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda_kernels: nvcc not found on PATH; skipping the CUDA kernel compile check"
  exit 0
fi

shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "compile_cuda_kernels: no csrc/cuda/*.cu files; nothing to compile"
  exit 0
fi

out_dir="$(mktemp -d)"
trap 'rm -rf "$out_dir"' EXIT

flags=(
  -std=c++17 -O2 -I csrc
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  # nvcc's own diagnostics, including opt-in ones, as errors. Not -Wmissing-launch-bounds: nvcc 13.0
  # reports it for every template kernel even when __launch_bounds__ is given.
  -Wdefault-stream-launch -Wreorder --Werror all-warnings
  # Host compiler on the host side of the .cu files.
  -Xcompiler -Wall,-Wextra,-Werror
  # Spills or local memory in a kernel (e.g. a parameter struct indexed at run time) are errors too.
  -Xptxas -warn-spills,-warn-lmem-usage,-Werror
)

echo "compile_cuda_kernels: $(nvcc --version | tail -n 1)"
for src in "${sources[@]}"; do
  obj="$out_dir/$(basename "${src%.cu}").o"
  echo "compile_cuda_kernels: nvcc -c $src"
  nvcc "${flags[@]}" -c "$src" -o "$obj"
done
echo "compile_cuda_kernels: ${#sources[@]} file(s) compiled"
