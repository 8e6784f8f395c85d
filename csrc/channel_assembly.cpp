#include "channel_assembly.h"

#include <string>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace dfs_kernels {
namespace {

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Makes `t` addressable as (N, C, S) with S = H * W, copying only when H and W cannot be flattened
// into one stride (rare: the sources here are gradients that ATen or these ops produced).
at::Tensor flattenable(const at::Tensor& t, bool channels_last) {
  const int64_t height = t.size(2), width = t.size(3);
  if (height == 1 || width == 1 || t.stride(2) == width * t.stride(3)) {
    return t;
  }
  return t.contiguous(format_of(channels_last));
}

ChannelSegment segment_from(const at::Tensor& t, int64_t begin, int64_t source_channel) {
  const bool height_only = t.size(3) == 1;  // then S walks H
  return ChannelSegment{
      t.data_ptr(), begin, source_channel, t.stride(0), t.stride(1), height_only ? t.stride(2) : t.stride(3)};
}

ChannelSegment zero_segment(int64_t begin) {
  return ChannelSegment{nullptr, begin, 0, 0, 0, 0};
}

void check_feature_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, name, " must be a 4-D [N, C, H, W] tensor, got ", t.dim(), " dimensions");
}

void check_like(const at::Tensor& t, const at::Tensor& first, const char* name) {
  TORCH_CHECK(
      t.dtype() == first.dtype() && t.device() == first.device(),
      name, " must match the first source's dtype ", first.dtype(), " and device ", first.device(),
      ", got ", t.dtype(), " on ", t.device());
  TORCH_CHECK(
      t.size(0) == first.size(0) && t.size(2) == first.size(2) && t.size(3) == first.size(3),
      name, " must have the first source's N, H, W = ", first.size(0), ", ", first.size(2), ", ",
      first.size(3), ", got sizes ", t.sizes());
}

ChannelAssembly allocate(const at::Tensor& like, int64_t channels) {
  ChannelAssembly plan;
  plan.channels_last = is_channels_last(like);
  plan.batch = like.size(0);
  plan.channels = channels;
  plan.spatial = like.size(2) * like.size(3);
  plan.output = at::empty(
      {like.size(0), channels, like.size(2), like.size(3)},
      like.options().memory_format(format_of(plan.channels_last)));
  plan.segments.count = 0;
  return plan;
}

void add_segment(ChannelAssembly& plan, const ChannelSegment& segment) {
  TORCH_INTERNAL_ASSERT(plan.segments.count < kMaxChannelSegments);
  plan.segments.segment[plan.segments.count++] = segment;
}

}  // namespace

ChannelAssembly plan_pad_channels(at::TensorList parts, int64_t channels) {
  TORCH_CHECK(!parts.empty() && parts.size() < static_cast<size_t>(kMaxChannelSegments),
              "pad_channels: parts must hold between 1 and ", kMaxChannelSegments - 1, " tensors, got ",
              parts.size());
  const at::Tensor& first = parts[0];
  check_feature_map(first, "pad_channels: parts[0]");
  ChannelAssembly plan = allocate(first, channels);
  int64_t filled = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const at::Tensor& part = parts[i];
    const std::string name = "pad_channels: parts[" + std::to_string(i) + "]";
    check_feature_map(part, name.c_str());
    check_like(part, first, name.c_str());
    if (part.size(1) == 0) {
      continue;
    }
    at::Tensor source = flattenable(part, plan.channels_last);
    add_segment(plan, segment_from(source, filled, 0));
    plan.sources.push_back(source);
    filled += part.size(1);
  }
  TORCH_CHECK(filled <= channels, "pad_channels: channels must be at least the parts' total ", filled,
              ", got ", channels);
  if (filled < channels || plan.segments.count == 0) {
    add_segment(plan, zero_segment(filled));
  }
  return plan;
}

ChannelAssembly plan_merge_channels(
    const std::optional<at::Tensor>& head,
    const std::optional<at::Tensor>& tail,
    int64_t split) {
  const bool has_head = head.has_value() && head->defined();
  const bool has_tail = tail.has_value() && tail->defined();
  TORCH_CHECK(has_head || has_tail, "merge_channels: at least one of head and tail must be given");
  const at::Tensor& first = has_head ? *head : *tail;
  check_feature_map(first, has_head ? "merge_channels: head" : "merge_channels: tail");
  if (has_head && has_tail) {
    check_like(*tail, first, "merge_channels: tail");
    TORCH_CHECK(tail->size(1) == first.size(1), "merge_channels: tail must have head's ", first.size(1),
                " channels, got ", tail->size(1));
  }
  const int64_t channels = first.size(1);
  TORCH_CHECK(0 <= split && split <= channels, "merge_channels: split must be in [0, ", channels, "], got ",
              split);
  ChannelAssembly plan = allocate(first, channels);
  if (split > 0) {
    if (has_head) {
      at::Tensor source = flattenable(*head, plan.channels_last);
      add_segment(plan, segment_from(source, 0, 0));
      plan.sources.push_back(source);
    } else {
      add_segment(plan, zero_segment(0));
    }
  }
  if (split < channels) {
    if (has_tail) {
      at::Tensor source = flattenable(*tail, plan.channels_last);
      add_segment(plan, segment_from(source, split, split));
      plan.sources.push_back(source);
    } else {
      add_segment(plan, zero_segment(split));
    }
  }
  if (plan.segments.count == 0) {  // C == 0: nothing to write
    add_segment(plan, zero_segment(0));
  }
  return plan;
}

at::Tensor empty_pooled_grad_output(
    const at::Tensor& grad_pooled,
    c10::SymIntArrayRef input_size,
    int64_t shared_channels,
    bool channels_last) {
  TORCH_CHECK(input_size.size() == 4, "exit_avg_pool_backward: input_size must be [N, C, H, W], got ",
              input_size.size(), " entries");
  const auto size = C10_AS_INTARRAYREF_SLOW(input_size);
  TORCH_CHECK(grad_pooled.dim() == 2 && grad_pooled.size(0) == size[0] && grad_pooled.size(1) == size[1],
              "exit_avg_pool_backward: grad_pooled must be [N, C] = [", size[0], ", ", size[1], "], got ",
              grad_pooled.sizes());
  TORCH_CHECK(0 <= shared_channels && shared_channels <= size[1],
              "exit_avg_pool_backward: shared_channels must be in [0, ", size[1], "], got ", shared_channels);
  TORCH_CHECK(at::isFloatingType(grad_pooled.scalar_type()),
              "exit_avg_pool_backward: grad_pooled must be floating point, got ", grad_pooled.scalar_type());
  return at::empty(size, grad_pooled.options().memory_format(format_of(channels_last)));
}

FloatKind float_kind(c10::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return FloatKind::kFloat32;
    case at::kDouble:
      return FloatKind::kFloat64;
    case at::kHalf:
      return FloatKind::kFloat16;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      TORCH_CHECK(false, "dfs_kernels: unsupported dtype ", dtype,
                  "; expected float32, float64, float16 or bfloat16");
  }
}

}  // namespace dfs_kernels
