// A convolution's input gradient written by cuDNN straight into a strided view, such as the channel
// slice grad_input[:, a:b] of a larger gradient tensor: the "cudnn" backend's way of producing the shared
// channels' gradient inside the full-size gradient with no temporary and no copy.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace dfs_kernels::cuda {

// grad_input = conv_input_grad(grad_output, weight), written into the given view (no other element of
// its storage is touched). `channels_last` picks the layout cuDNN computes in: that of the tensor the view
// belongs to. Call on grad_input's device; runs on the current stream. Falls back to ATen's
// convolution_backward plus a copy into the view where cuDNN cannot write it in place: cuDNN disabled
// (torch.backends.cudnn.enabled = False), sizes past cuDNN's 32-bit descriptors, or no cuDNN algorithm
// that accepts the view's strides.
void cudnn_input_grad_into(
    const at::Tensor& grad_input,   // [N, C, H, W] view, any non-negative strides; overwritten
    const at::Tensor& grad_output,  // [N, K, H_out, W_out]
    const at::Tensor& weight,       // [K, C / groups, kH, kW]
    at::IntArrayRef stride,         // [2]
    at::IntArrayRef padding,        // [2]
    at::IntArrayRef dilation,       // [2]
    int64_t groups,
    bool channels_last);

}  // namespace dfs_kernels::cuda
