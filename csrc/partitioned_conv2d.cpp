// The partitioned convolution on ATen (oneDNN on CPU, cuDNN on CUDA): the forward is one ordinary
// convolution over every input channel; the input gradient is computed for the shared channels only
// and written, with the referenced channels zeroed, by the device's pad_channels kernel.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace dfs_kernels {
namespace {

void check_shared_channels(int64_t shared_channels, int64_t in_channels, const char* op) {
  TORCH_CHECK(0 <= shared_channels && shared_channels <= in_channels, op,
              ": shared_channels must be in [0, in_channels=", in_channels, "], got ", shared_channels);
}

at::Tensor partitioned_conv2d(
    const at::Tensor& input,                // [N, C_in, H, W]
    const at::Tensor& weight,               // [C_out, C_in / groups, kH, kW]
    const std::optional<at::Tensor>& bias,  // [C_out] or None
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shared_channels) {
  check_shared_channels(shared_channels, input.size(1), "partitioned_conv2d");
  // Referencing changes only the backward: the forward of [x+, sg(x-)] is x itself.
  return at::convolution(input, weight, bias, stride, padding, dilation, /*transposed=*/false,
                         /*output_padding=*/{0, 0}, groups);
}

at::Tensor input_grad_of(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  // ATen reads only the shape and memory format of `input` for the input gradient.
  return std::get<0>(at::convolution_backward(
      grad_output, input, weight, /*bias_sizes=*/std::nullopt, stride, padding, dilation,
      /*transposed=*/false, /*output_padding=*/{0, 0}, groups, {true, false, false}));
}

at::Tensor pad_channels(at::TensorList parts, int64_t channels) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dfs_kernels::pad_channels", "")
                       .typed<at::Tensor(at::TensorList, int64_t)>();
  return op.call(parts, channels);
}

// dL/dx for x = [x+, sg(x-)]: the input gradient of the convolution restricted to the Cp shared
// channels, zeros on the referenced ones. The work for the referenced channels is never done.
//
// With groups, input channel c belongs to group c / (C_in / groups). The shared channels cover
// `full_groups` whole groups, which one grouped call handles, and the first `partial` channels of the
// next group, which a call on that group's output channels with its weight cut to `partial` input
// channels handles. Depthwise convolutions always fall in the first case.
at::Tensor partitioned_conv2d_input_grad(
    const at::Tensor& grad_output,  // [N, C_out, H_out, W_out]
    const at::Tensor& input,        // [N, C_in, H, W]; only its shape and memory format are read
    const at::Tensor& weight,       // [C_out, C_in / groups, kH, kW]
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups,
    int64_t shared_channels) {
  const int64_t in_channels = input.size(1);
  check_shared_channels(shared_channels, in_channels, "partitioned_conv2d_input_grad");
  TORCH_CHECK(groups > 0 && in_channels % groups == 0 && weight.size(0) % groups == 0,
              "partitioned_conv2d_input_grad: groups=", groups, " must divide C_in=", in_channels,
              " and C_out=", weight.size(0));
  if (shared_channels == in_channels) {
    return input_grad_of(grad_output, input, weight, stride, padding, dilation, groups);
  }
  const int64_t group_in = in_channels / groups, group_out = weight.size(0) / groups;
  const int64_t full_groups = shared_channels / group_in, partial = shared_channels % group_in;
  std::vector<at::Tensor> parts;
  if (full_groups > 0) {
    parts.push_back(input_grad_of(
        grad_output.narrow(1, 0, full_groups * group_out), input.narrow(1, 0, full_groups * group_in),
        weight.narrow(0, 0, full_groups * group_out), stride, padding, dilation, full_groups));
  }
  if (partial > 0) {
    parts.push_back(input_grad_of(
        grad_output.narrow(1, full_groups * group_out, group_out), input.narrow(1, full_groups * group_in, partial),
        weight.narrow(0, full_groups * group_out, group_out).narrow(1, 0, partial), stride, padding, dilation,
        /*groups=*/1));
  }
  if (parts.empty()) {  // shared_channels == 0: the whole gradient is zero
    return at::zeros_like(input, input.suggest_memory_format());
  }
  return pad_channels(parts, in_channels);
}

at::Tensor exit_avg_pool(const at::Tensor& input, int64_t shared_channels) {
  TORCH_CHECK(input.dim() == 4, "exit_avg_pool: input must be [N, C, H, W], got ", input.dim(), " dimensions");
  check_shared_channels(shared_channels, input.size(1), "exit_avg_pool");
  return input.mean({2, 3});
}

}  // namespace

TORCH_LIBRARY_IMPL(dfs_kernels, CompositeExplicitAutograd, m) {
  m.impl("partitioned_conv2d", &partitioned_conv2d);
  m.impl("partitioned_conv2d_input_grad", &partitioned_conv2d_input_grad);
  m.impl("exit_avg_pool", &exit_avg_pool);
}

}  // namespace dfs_kernels
