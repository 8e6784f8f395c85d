// CPU implementations of the channel-assembly ops: one parallel pass over the output, copying whole
// contiguous rows with memcpy where the source allows it and zero-filling the rest.
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../channel_assembly.h"

namespace dfs_kernels {
namespace {

// Aim for about 32 KiB of output per parallel task: small enough to balance, large enough to amortize.
int64_t grain_for(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{32} << 10) / std::max<int64_t>(1, row_bytes));
}

const ChannelSegment& segment_of(const ChannelSegments& segments, int64_t channel) {
  int index = 0;
  while (index + 1 < segments.count && segments.segment[index + 1].begin <= channel) {
    ++index;
  }
  return segments.segment[index];
}

// Copies `count` elements spaced `stride` apart in the source into a contiguous destination run.
void copy_run(char* dst, const char* src, int64_t count, int64_t stride, int64_t element_size) {
  if (stride == 1) {
    std::memcpy(dst, src, count * element_size);
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    std::memcpy(dst + i * element_size, src + i * stride * element_size, element_size);
  }
}

void gather_channels_cpu(const ChannelAssembly& plan) {
  const ChannelSegments& segments = plan.segments;
  const int64_t element_size = plan.output.element_size();
  const int64_t channels = plan.channels, spatial = plan.spatial;
  char* out = static_cast<char*>(plan.output.data_ptr());
  if (plan.output.numel() == 0) {
    return;
  }
  // With one spatial position (tokens [N, T, D] read as [N * T, D, 1, 1], or pooled maps) both layouts
  // are the same memory, and the NHWC loop copies each row's segments as whole runs, where the NCHW
  // loop would copy one element per row (several times slower than an add).
  if (!plan.channels_last && spatial != 1) {
    // NCHW: row (n, c) is `spatial` contiguous output elements, all from one segment.
    const int64_t row_bytes = spatial * element_size;
    at::parallel_for(0, plan.batch * channels, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / channels, c = row % channels;
        const ChannelSegment& seg = segment_of(segments, c);
        char* dst = out + row * row_bytes;
        if (seg.data == nullptr) {
          std::memset(dst, 0, row_bytes);
          continue;
        }
        const int64_t source_channel = c - seg.begin + seg.source_channel;
        const char* src = static_cast<const char*>(seg.data) +
            (n * seg.stride_n + source_channel * seg.stride_c) * element_size;
        copy_run(dst, src, spatial, seg.stride_s, element_size);
      }
    });
    return;
  }
  // NHWC (or spatial 1): row (n, s) is `channels` contiguous output elements, one run per segment.
  const int64_t row_bytes = channels * element_size;
  at::parallel_for(0, plan.batch * spatial, grain_for(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / spatial, s = row % spatial;
      char* dst_row = out + row * row_bytes;
      for (int index = 0; index < segments.count; ++index) {
        const ChannelSegment& seg = segments.segment[index];
        const int64_t run_end = index + 1 < segments.count ? segments.segment[index + 1].begin : channels;
        char* dst = dst_row + seg.begin * element_size;
        if (seg.data == nullptr) {
          std::memset(dst, 0, (run_end - seg.begin) * element_size);
          continue;
        }
        const char* src = static_cast<const char*>(seg.data) +
            (n * seg.stride_n + s * seg.stride_s + seg.source_channel * seg.stride_c) * element_size;
        copy_run(dst, src, run_end - seg.begin, seg.stride_c, element_size);
      }
    }
  });
}

at::Tensor pad_channels_cpu(at::TensorList parts, int64_t channels) {
  ChannelAssembly plan = plan_pad_channels(parts, channels);
  TORCH_CHECK(plan.output.is_cpu(), "pad_channels: parts must be CPU tensors here, got ", plan.output.device());
  gather_channels_cpu(plan);
  return plan.output;
}

at::Tensor merge_channels_cpu(
    const std::optional<at::Tensor>& head,
    const std::optional<at::Tensor>& tail,
    int64_t split) {
  ChannelAssembly plan = plan_merge_channels(head, tail, split);
  TORCH_CHECK(plan.output.is_cpu(), "merge_channels: head and tail must be CPU tensors here, got ",
              plan.output.device());
  gather_channels_cpu(plan);
  return plan.output;
}

// grad_input[n, c, h, w] = c >= shared_channels ? grad_pooled[n, c] / (H * W) : 0, the backward of a
// global average pool whose input gradient is kept only on the referenced channels.
template <typename scalar_t>
void pooled_grad_broadcast_cpu(const at::Tensor& grad_pooled, at::Tensor& out, int64_t shared_channels,
                               bool channels_last) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t batch = out.size(0), channels = out.size(1), spatial = out.size(2) * out.size(3);
  const int64_t stride_n = grad_pooled.stride(0), stride_c = grad_pooled.stride(1);
  const scalar_t* grad = grad_pooled.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const opmath_t area = static_cast<opmath_t>(spatial);
  auto value = [&](int64_t n, int64_t c) {
    return c < shared_channels ? scalar_t(0)
                               : static_cast<scalar_t>(static_cast<opmath_t>(grad[n * stride_n + c * stride_c]) / area);
  };
  if (!channels_last) {
    at::parallel_for(0, batch * channels, grain_for(spatial * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t v = value(row / channels, row % channels);
        std::fill_n(dst + row * spatial, spatial, v);
      }
    });
    return;
  }
  // NHWC: every spatial row of sample n is the same C values; build them once per sample and copy.
  at::parallel_for(0, batch * spatial, grain_for(channels * sizeof(scalar_t)), [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> sample_row(channels);
    int64_t row_sample = -1;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / spatial;
      if (n != row_sample) {
        for (int64_t c = 0; c < channels; ++c) {
          sample_row[c] = value(n, c);
        }
        row_sample = n;
      }
      std::copy_n(sample_row.data(), channels, dst + row * channels);
    }
  });
}

at::Tensor exit_avg_pool_backward_cpu(
    const at::Tensor& grad_pooled,
    c10::SymIntArrayRef input_size,
    int64_t shared_channels,
    bool channels_last) {
  at::Tensor out = empty_pooled_grad_output(grad_pooled, input_size, shared_channels, channels_last);
  if (out.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_pooled.scalar_type(), "exit_avg_pool_backward", [&] {
    pooled_grad_broadcast_cpu<scalar_t>(grad_pooled, out, shared_channels, channels_last);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dfs_kernels, CPU, m) {
  m.impl("pad_channels", &pad_channels_cpu);
  m.impl("merge_channels", &merge_channels_cpu);
  m.impl("exit_avg_pool_backward", &exit_avg_pool_backward_cpu);
}

}  // namespace dfs_kernels
