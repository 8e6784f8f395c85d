// Launchers for the CUDA channel-assembly kernels. They take raw pointers, sizes and strides so that
// the .cu files need nothing from torch: the CPU torch wheel's CUDA headers are incomplete, and keeping
// torch out of nvcc's way lets these kernels be compiled (and checked) on machines without a GPU.
// The torch-facing side lives in channel_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../kernel_types.h"

namespace dfs_kernels::cuda {

// out: [N, C, S] (S = H*W) contiguous as NCHW (channels_last == false) or NHWC (true); element_size in bytes (2, 4 or 8).
// Fills output channel c from the segment whose run contains c: source element (n, c - begin + source_channel, s) at
// data + n*stride_n + ch*stride_c + s*stride_s (elements), or zero when data == nullptr. One launch for the whole output.
// Returns cudaErrorInvalidValue for an unsupported element_size, a segment count outside [1, kMaxChannelSegments]
// or a negative size; cudaSuccess without launching when the output is empty.
cudaError_t gather_channels(
    void* out,                          // [N, C, S] NCHW or NHWC, element_size bytes per element
    const ChannelSegments& segments,    // runs of output channels, each from one [N, C_src, S] source or zeros
    int64_t batch,                      // N
    int64_t channels,                   // C
    int64_t spatial,                    // S = H * W
    bool channels_last,                 // layout of `out`: NHWC when true, NCHW otherwise
    int element_size,                   // bytes per element: 2, 4 or 8
    cudaStream_t stream);

// grad_pooled: [N, C] with element strides (grad_stride_n, grad_stride_c), or nullptr. out as above.
// Writes channels [first_channel, C) of out and nothing else:
// out[n, c, s] = grad_pooled != nullptr && c >= shared_channels ? grad_pooled[n, c] / spatial : 0, arithmetic in
// float (double for kFloat64), result rounded to the dtype once. exit_avg_pool_backward writes all of out
// (first_channel = 0); the partitioned convolution's input gradient writes [Cp, C) (first_channel =
// shared_channels = Cp) next to the channels [0, Cp) that cuDNN wrote.
// Returns cudaErrorInvalidValue for a negative size, first_channel outside [0, C] or an unknown kind;
// cudaSuccess without launching when nothing is to be written.
cudaError_t pooled_grad_broadcast(
    void* out,                  // [N, C, S] NCHW or NHWC, dtype `kind`
    const void* grad_pooled,    // [N, C] strided, dtype `kind`; nullptr writes zeros
    int64_t grad_stride_n,      // grad_pooled stride of N, in elements
    int64_t grad_stride_c,      // grad_pooled stride of C, in elements
    int64_t batch,              // N
    int64_t channels,           // C
    int64_t spatial,            // S = H * W
    int64_t first_channel,      // channels [0, first_channel) of `out` are left untouched
    int64_t shared_channels,    // channels [first_channel, shared_channels) of `out` are zero
    bool channels_last,         // layout of `out`: NHWC when true, NCHW otherwise
    FloatKind kind,             // dtype of both `out` and `grad_pooled`
    cudaStream_t stream);

}  // namespace dfs_kernels::cuda
