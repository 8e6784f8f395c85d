// The partitioned convolution's pieces shared by the "aten" ops (partitioned_conv2d.cpp) and the "cudnn"
// backend's ops (cuda/partitioned_conv2d_cuda.cpp): the same forward, the same argument checks, and the
// same decomposition of the shared channels' input gradient into convolutions over whole channel runs.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace dfs_kernels {

// conv2d over every input channel: referencing changes only the backward, and the forward of
// [x+, sg(x-)] is x itself.
at::Tensor partitioned_conv2d(
    const at::Tensor& input,                // [N, C_in, H, W]
    const at::Tensor& weight,               // [C_out, C_in / groups, kH, kW]
    const std::optional<at::Tensor>& bias,  // [C_out] or None
    at::IntArrayRef stride,                 // [2]
    at::IntArrayRef padding,                // [2]
    at::IntArrayRef dilation,               // [2]
    int64_t groups,
    int64_t shared_channels);               // Cp in [0, C_in]

// (partitioned_conv2d(input, ...), mean of input over H and W): a DFS stage's forward.
std::tuple<at::Tensor, at::Tensor> partitioned_conv2d_with_exit_pool(
    const at::Tensor& input,                // [N, C_in, H, W]
    const at::Tensor& weight,               // [C_out, C_in / groups, kH, kW]
    const std::optional<at::Tensor>& bias,  // [C_out] or None
    at::IntArrayRef stride,                 // [2]
    at::IntArrayRef padding,                // [2]
    at::IntArrayRef dilation,               // [2]
    int64_t groups,
    int64_t shared_channels);               // Cp in [0, C_in]

// Checks Cp against C_in and that groups divides both channel counts; `op` names the caller.
void check_input_grad_arguments(int64_t in_channels, int64_t out_channels, int64_t groups,
                                int64_t shared_channels, const char* op);

// One convolution of the shared channels' input gradient: input channels [in_begin, in_begin + in_count)
// receive the gradient of output channels [out_begin, out_begin + out_count) through the weight slice
// weight[out_begin : out_begin + out_count, :weight_in_count], with `groups` groups.
struct InputGradPart {
  int64_t in_begin;
  int64_t in_count;
  int64_t out_begin;
  int64_t out_count;
  int64_t weight_in_count;
  int64_t groups;
};

// The convolutions that together give the input gradient of channels [0, shared_channels) and of no
// other channel. With groups, input channel c belongs to group c / (C_in / groups): the shared
// channels cover some whole groups, which one grouped convolution handles, and the first channels of
// the next group, which a convolution on that group's output channels with its weight cut to those
// input channels handles. Dense and depthwise convolutions always give a single part.
std::vector<InputGradPart> shared_input_grad_parts(int64_t in_channels, int64_t out_channels, int64_t groups,
                                                   int64_t shared_channels);

}  // namespace dfs_kernels
