// The DFS gradients written with differentiable ATen ops: the C++ twin of dfs_kernels/ops/_composite.py.
// A C++ autograd Function's backward runs them when grad mode is on (create_graph=True: double backward,
// gradient penalties, Hessian-vector products), so that autograd records a backward it can differentiate
// to any order. They do the full input-gradient work (DFS's saving is a first-order one); the first
// backward of a training step never runs them.
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace dfs_kernels::composite {

// Channels [0, split) of `head` and [split, C) of `tail` on axis 1, an undefined one read as zeros.
at::Tensor merge_channels(const at::Tensor& head, const at::Tensor& tail, int64_t split);

// grad_pooled [N, C] / (H * W) spread over H and W into channels [Cp, C) of `input_sizes`; zeros on [0, Cp).
at::Tensor exit_avg_pool_backward(const at::Tensor& grad_pooled, c10::SymIntArrayRef input_sizes,
                                  int64_t shared_channels);

// (grad_input, grad_weight, grad_bias) of a partitioned convolution and, with grad_pooled, of its stage's
// exit; an undefined tensor for each gradient not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_grads(
    const at::Tensor& grad_output,   // [N, C_out, H_out, W_out] or undefined (output unused)
    const at::Tensor& grad_pooled,   // [N, C_in] or undefined
    const at::Tensor& input,         // [N, C_in, H, W]
    const at::Tensor& weight,        // [C_out, C_in / groups, kH, kW]
    bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t shared_channels, bool needs_input, bool needs_weight, bool needs_bias);

// (grad_input, grad_weight, grad_bias) of a partitioned linear layer, split on the last axis.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_grads(
    const at::Tensor& grad_output,   // [..., out_features]
    const at::Tensor& input,         // [..., in_features]
    const at::Tensor& weight,        // [out_features, in_features]
    int64_t shared_features, bool needs_input, bool needs_weight, bool needs_bias);

}  // namespace dfs_kernels::composite
