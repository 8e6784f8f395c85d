// The partitioned convolution on ATen (oneDNN on CPU, cuDNN on CUDA): the forward is one ordinary
// convolution over every input channel; the input gradient is computed for the shared channels only
// and written, with the referenced channels zeroed, by the device's pad_channels kernel.
#include "partitioned_conv2d.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dfs_kernels {
namespace {

void check_shared_channels(int64_t shared_channels, int64_t in_channels, const char* op) {
  TORCH_CHECK(0 <= shared_channels && shared_channels <= in_channels, op,
              ": shared_channels must be in [0, in_channels=", in_channels, "], got ", shared_channels);
}

// The input gradient of a convolution whose input has `input_sizes` in `memory_format`.
at::Tensor input_grad_of(
    const at::Tensor& grad_output, at::IntArrayRef input_sizes, at::MemoryFormat memory_format,
    const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  // ATen reads only the shape and memory format of the input for the input gradient, but first makes
  // the input contiguous: handed a channel slice of x, it would copy that slice (up to 4 ms of a VGG7
  // step's 30 ms layer on one CPU thread). An uninitialized tensor of the slice's shape is never read.
  const at::Tensor input_shape = at::empty(input_sizes, grad_output.options().memory_format(memory_format));
  // A weight cut along its input channels is strided; oneDNN runs much slower on it (about 1.6x for a
  // VGG layer on CPU) than on a dense copy, which costs next to nothing.
  return std::get<0>(at::convolution_backward(
      grad_output, input_shape, weight.contiguous(weight.suggest_memory_format()), /*bias_sizes=*/std::nullopt,
      stride, padding, dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {true, false, false}));
}

at::Tensor exit_avg_pool_backward(const at::Tensor& grad_pooled, c10::SymIntArrayRef input_size,
                                  int64_t shared_channels, bool channels_last) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfs_kernels::exit_avg_pool_backward", "")
                       .typed<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, int64_t, bool)>();
  return op.call(grad_pooled, input_size, shared_channels, channels_last);
}

at::Tensor pad_channels(at::TensorList parts, int64_t channels) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfs_kernels::pad_channels", "")
                       .typed<at::Tensor(at::TensorList, int64_t)>();
  return op.call(parts, channels);
}

// dL/dx for x = [x+, sg(x-)]: the input gradient of the convolution restricted to the Cp shared
// channels; on the referenced channels, the exit's pooled gradient spread over H * W when given (a
// DFS stage, where the exit reads [sg(x+), x-] of the same x), else zeros. The convolution's work for
// the referenced channels is never done.
at::Tensor partitioned_conv2d_input_grad(
    const at::Tensor& grad_output,                 // [N, C_out, H_out, W_out]
    const at::Tensor& input,                       // [N, C_in, H, W]; only its shape and memory format are read
    const at::Tensor& weight,                      // [C_out, C_in / groups, kH, kW]
    at::IntArrayRef stride,                        // [2]
    at::IntArrayRef padding,                       // [2]
    at::IntArrayRef dilation,                      // [2]
    int64_t groups,
    int64_t shared_channels,                       // Cp in [0, C_in]
    const std::optional<at::Tensor>& grad_pooled) {  // [N, C_in] or None
  const int64_t in_channels = input.size(1);
  check_input_grad_arguments(in_channels, weight.size(0), groups, shared_channels, "partitioned_conv2d_input_grad");
  const at::MemoryFormat memory_format = input.suggest_memory_format();
  if (shared_channels == in_channels) {  // the exit, if any, references no channel
    return input_grad_of(grad_output, input.sizes(), memory_format, weight, stride, padding, dilation, groups)
        .contiguous(memory_format);
  }
  const bool has_pooled = grad_pooled.has_value() && grad_pooled->defined();
  if (shared_channels == 0) {  // no convolution gradient at all: only the exit's, if any
    return has_pooled ? exit_avg_pool_backward(*grad_pooled, input.sym_sizes(), 0,
                                               memory_format == at::MemoryFormat::ChannelsLast)
                      : at::zeros_like(input, memory_format);
  }
  std::vector<at::Tensor> parts;
  for (const InputGradPart& part : shared_input_grad_parts(in_channels, weight.size(0), groups, shared_channels)) {
    std::vector<int64_t> part_sizes = input.sizes().vec();
    part_sizes[1] = part.in_count;
    parts.push_back(input_grad_of(
        grad_output.narrow(1, part.out_begin, part.out_count), part_sizes, memory_format,
        weight.narrow(0, part.out_begin, part.out_count).narrow(1, 0, part.weight_in_count), stride, padding,
        dilation, part.groups));
  }
  if (has_pooled) {
    // d mean / dx = 1 / (H * W) everywhere: a [N, C - Cp] tensor broadcast over H and W with stride 0,
    // which the gather reads like any other source.
    const int64_t batch = input.size(0), height = input.size(2), width = input.size(3);
    const int64_t referenced = in_channels - shared_channels;
    parts.push_back(grad_pooled->narrow(1, shared_channels, referenced)
                        .div(static_cast<double>(height * width))
                        .view({batch, referenced, 1, 1})
                        .expand({batch, referenced, height, width}));
  }
  return pad_channels(parts, in_channels).contiguous(memory_format);
}

at::Tensor exit_avg_pool(const at::Tensor& input, int64_t shared_channels) {
  TORCH_CHECK(input.dim() == 4, "exit_avg_pool: input must be [N, C, H, W], got ", input.dim(), " dimensions");
  check_shared_channels(shared_channels, input.size(1), "exit_avg_pool");
  return input.mean({2, 3});
}

}  // namespace

at::Tensor partitioned_conv2d(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shared_channels) {
  check_shared_channels(shared_channels, input.size(1), "partitioned_conv2d");
  return at::convolution(input, weight, bias, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups);
}

std::tuple<at::Tensor, at::Tensor> partitioned_conv2d_with_exit_pool(
    const at::Tensor& input,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shared_channels) {
  return {partitioned_conv2d(input, weight, bias, stride, padding, dilation, groups, shared_channels),
          input.mean({2, 3})};
}

void check_input_grad_arguments(int64_t in_channels, int64_t out_channels, int64_t groups,
                                int64_t shared_channels, const char* op) {
  check_shared_channels(shared_channels, in_channels, op);
  TORCH_CHECK(groups > 0 && in_channels % groups == 0 && out_channels % groups == 0, op, ": groups=", groups,
              " must divide C_in=", in_channels, " and C_out=", out_channels);
}

std::vector<InputGradPart> shared_input_grad_parts(int64_t in_channels, int64_t out_channels, int64_t groups,
                                                   int64_t shared_channels) {
  const int64_t group_in = in_channels / groups, group_out = out_channels / groups;
  const int64_t full_groups = shared_channels / group_in, partial = shared_channels % group_in;
  std::vector<InputGradPart> parts;
  if (full_groups > 0) {
    parts.push_back({0, full_groups * group_in, 0, full_groups * group_out, group_in, full_groups});
  }
  if (partial > 0) {
    parts.push_back({full_groups * group_in, partial, full_groups * group_out, group_out, partial, /*groups=*/1});
  }
  return parts;
}

TORCH_LIBRARY_IMPL(dfs_kernels, CompositeExplicitAutograd, m) {
  m.impl("partitioned_conv2d", &partitioned_conv2d);
  m.impl("partitioned_conv2d_input_grad", &partitioned_conv2d_input_grad);
  m.impl("partitioned_conv2d_with_exit_pool", &partitioned_conv2d_with_exit_pool);
  m.impl("exit_avg_pool", &exit_avg_pool);
}

}  // namespace dfs_kernels
