// The partitioned linear layer's ATen implementation, shared by the "aten" ops (CompositeExplicitAutograd,
// partitioned_linear.cpp) and the "cudnn" backend's CUDA binding (cuda/partitioned_linear_cuda.cpp).
#pragma once

#include <optional>

#include <ATen/ATen.h>

namespace dfs_kernels {

// linear(input, weight, bias): the forward is ATen's GEMM over every input feature.
at::Tensor partitioned_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t shared_features);

// dL/dx for x = [x+, sg(x-)] split on its last axis: grad_output @ weight[:, :Cp] written by the GEMM
// straight into features [0, Cp) of the full [..., in_features] gradient, zeros in [Cp, in_features).
at::Tensor partitioned_linear_input_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& weight, int64_t shared_features);

}  // namespace dfs_kernels
