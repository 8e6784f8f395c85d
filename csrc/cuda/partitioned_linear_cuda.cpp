// The "cudnn" backend's partitioned linear layer (dfs_kernels::cudnn_partitioned_linear*), for CUDA tensors.
// The forward and the input gradient are cuBLAS GEMMs through ATen: the input gradient's GEMM writes the
// [M, Cp] slice of the full [M, in_features] gradient in place (cuBLAS takes its leading dimension,
// in_features), on the current stream, and the referenced features [Cp, in) are zeroed; no temporary,
// no copy. The ATen implementation (../partitioned_linear.cpp) already does exactly this on any device;
// this binding sets the device guard.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../partitioned_linear.h"

namespace dfs_kernels {
namespace {

// ATen's mm checks that grad_output and weight are on input's device.
at::Tensor partitioned_linear_input_grad_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                              const at::Tensor& weight, int64_t shared_features) {
  TORCH_CHECK(input.is_cuda(), "cudnn_partitioned_linear_input_grad: input must be a CUDA tensor, got one on ",
              input.device());
  const c10::cuda::CUDAGuard guard(input.device());
  return partitioned_linear_input_grad(grad_output, input, weight, shared_features);
}

}  // namespace

// The forward op is the "aten" one under the cudnn backend's name: its registered autograd formula
// (dfs_kernels/ops/partitioned_linear.py) routes the backward to the kernel above.
TORCH_LIBRARY_IMPL(dfs_kernels, CUDA, m) {
  m.impl("cudnn_partitioned_linear", TORCH_FN(partitioned_linear));
  m.impl("cudnn_partitioned_linear_input_grad", TORCH_FN(partitioned_linear_input_grad_cuda));
}

}  // namespace dfs_kernels
