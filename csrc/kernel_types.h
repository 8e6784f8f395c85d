// Plain descriptions of the channel-assembly work, shared by the CPU kernels and the CUDA kernels.
// This header includes nothing from torch so that the .cu files can be compiled by nvcc alone
// (the CPU torch wheel lacks the CUDA parts of its headers, so CI compiles the kernels without torch).
#pragma once

#include <cstdint>

namespace dfs_kernels {

// The most runs one channel assembly may have: pad_channels takes up to three parts plus the zero
// tail (the partitioned convolution passes at most two), merge_channels uses two.
constexpr int kMaxChannelSegments = 4;

// A run of output channels [begin, next segment's begin) read from one source tensor, or zero-filled
// when `data` is null. Sources are addressed in elements over (N, C, S) with S = H * W flattened.
struct ChannelSegment {
  const void* data;        // source base pointer, already offset to the source's [0, 0, 0]; nullptr = zeros
  int64_t begin;           // first output channel of the run
  int64_t source_channel;  // source channel that lands on output channel `begin`
  int64_t stride_n;        // source stride of the batch dimension, in elements
  int64_t stride_c;        // source stride of the channel dimension, in elements
  int64_t stride_s;        // source stride of the flattened spatial dimension, in elements
};

// Runs in increasing `begin` order; segment[0].begin == 0 and the last run ends at the output's C.
struct ChannelSegments {
  ChannelSegment segment[kMaxChannelSegments];
  int count;
};

// The floating types the arithmetic kernels are instantiated for.
enum class FloatKind : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

}  // namespace dfs_kernels
