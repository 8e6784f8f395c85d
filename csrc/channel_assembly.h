// Host-side planning of the channel-assembly ops, shared by the CPU and CUDA implementations:
// validates the sources, allocates the output in the sources' memory format and describes, as
// ChannelSegments, which source (or zero) fills each run of output channels.
#pragma once

#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

#include "kernel_types.h"

namespace dfs_kernels {

struct ChannelAssembly {
  at::Tensor output;         // [N, C, H, W], contiguous as NCHW or as channels_last
  ChannelSegments segments;  // runs that fill `output`; sources stay alive in `sources`
  std::vector<at::Tensor> sources;
  int64_t batch;             // N
  int64_t channels;          // C
  int64_t spatial;           // H * W
  bool channels_last;
};

// output = cat(parts, dim=1) followed by zeros up to `channels` channels.
ChannelAssembly plan_pad_channels(at::TensorList parts, int64_t channels);

// output[:, :split] = head[:, :split], output[:, split:] = tail[:, split:]; a missing source reads as zeros.
ChannelAssembly plan_merge_channels(
    const std::optional<at::Tensor>& head,
    const std::optional<at::Tensor>& tail,
    int64_t split);

// Validated output of exit_avg_pool_backward: [N, C, H, W] from input_size, in the requested format.
at::Tensor empty_pooled_grad_output(
    const at::Tensor& grad_pooled,
    c10::SymIntArrayRef input_size,
    int64_t shared_channels,
    bool channels_last);

FloatKind float_kind(c10::ScalarType dtype);

}  // namespace dfs_kernels
