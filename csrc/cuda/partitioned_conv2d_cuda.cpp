// The "cudnn" backend's partitioned convolution (dfs_kernels::cudnn_* ops). The forward and the weight
// gradient are ATen's, that is cuDNN's. The input gradient differs from the "aten" backend's: cuDNN writes
// the shared channels' gradient straight into channels [0, Cp) of the full-size gradient tensor
// (cudnn_input_grad.cpp) and one kernel of ours writes channels [Cp, C) (zeros, or the exit's pooled
// gradient in a DFS stage), both on the current stream. Every element is written once: no temporary
// gradient of the shared channels, no copy, no separate zero-fill.
#include <optional>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../channel_assembly.h"
#include "../partitioned_conv2d.h"
#include "channel_kernels.cuh"
#include "cudnn_input_grad.h"

namespace dfs_kernels {
namespace {

constexpr const char* kInputGradOp = "cudnn_partitioned_conv2d_input_grad";

void check_on_device(const at::Tensor& t, const at::Device& device, const char* name) {
  TORCH_CHECK(t.device() == device, kInputGradOp, ": ", name, " must be on ", device, " like input, got ",
              t.device());
}

// Channels [Cp, C) of grad_input: the exit's pooled gradient spread over H * W when given, else zeros.
// Channels [0, Cp) are left to cuDNN.
void fill_referenced_channels(
    const at::Tensor& grad_input,                     // [N, C, H, W] dense NCHW or NHWC (per channels_last)
    const std::optional<at::Tensor>& grad_pooled,     // [N, C] or None
    int64_t shared_channels,                          // Cp
    bool channels_last,
    cudaStream_t stream) {
  const int64_t batch = grad_input.size(0), channels = grad_input.size(1);
  std::optional<at::Tensor> pooled;
  if (grad_pooled.has_value() && grad_pooled->defined()) {
    TORCH_CHECK(grad_pooled->dim() == 2 && grad_pooled->size(0) == batch && grad_pooled->size(1) == channels,
                kInputGradOp, ": grad_pooled must be [N, C_in] = [", batch, ", ", channels, "], got ",
                grad_pooled->sizes());
    check_on_device(*grad_pooled, grad_input.device(), "grad_pooled");
    pooled = grad_pooled->to(grad_input.scalar_type());  // the kernel reads and writes one dtype
  }
  C10_CUDA_CHECK(cuda::pooled_grad_broadcast(
      grad_input.mutable_data_ptr(), pooled ? pooled->const_data_ptr() : nullptr, pooled ? pooled->stride(0) : 0,
      pooled ? pooled->stride(1) : 0, batch, channels, grad_input.size(2) * grad_input.size(3),
      /*first_channel=*/shared_channels, shared_channels, channels_last, float_kind(grad_input.scalar_type()),
      stream));
}

// The schema and semantics of dfs_kernels::partitioned_conv2d_input_grad (registration.cpp).
at::Tensor partitioned_conv2d_input_grad_cuda(
    const at::Tensor& grad_output,                   // [N, C_out, H_out, W_out]
    const at::Tensor& input,                         // [N, C_in, H, W]; only its shape and memory format are read
    const at::Tensor& weight,                        // [C_out, C_in / groups, kH, kW]
    at::IntArrayRef stride,                          // [2]
    at::IntArrayRef padding,                         // [2]
    at::IntArrayRef dilation,                        // [2]
    int64_t groups,
    int64_t shared_channels,                         // Cp in [0, C_in]
    const std::optional<at::Tensor>& grad_pooled) {  // [N, C_in] or None
  TORCH_CHECK(input.dim() == 4 && grad_output.dim() == 4 && weight.dim() == 4, kInputGradOp,
              ": grad_output, input and weight must be 4-D, got ", grad_output.dim(), ", ", input.dim(), " and ",
              weight.dim(), " dimensions");
  TORCH_CHECK(input.is_cuda(), kInputGradOp, ": input must be a CUDA tensor, got one on ", input.device());
  check_on_device(grad_output, input.device(), "grad_output");
  check_on_device(weight, input.device(), "weight");
  const int64_t in_channels = input.size(1);
  check_input_grad_arguments(in_channels, weight.size(0), groups, shared_channels, kInputGradOp);

  const c10::cuda::CUDAGuard guard(input.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  // The gradient takes the input's layout, as the "aten" op's does; cuDNN computes in that layout.
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const at::Tensor grad_input = at::empty(
      input.sizes(),
      grad_output.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  if (shared_channels < in_channels) {
    fill_referenced_channels(grad_input, grad_pooled, shared_channels, channels_last, stream);
  }
  for (const InputGradPart& part : shared_input_grad_parts(in_channels, weight.size(0), groups, shared_channels)) {
    cuda::cudnn_input_grad_into(
        grad_input.narrow(1, part.in_begin, part.in_count), grad_output.narrow(1, part.out_begin, part.out_count),
        weight.narrow(0, part.out_begin, part.out_count).narrow(1, 0, part.weight_in_count), stride, padding,
        dilation, part.groups, channels_last);
  }
  return grad_input;
}

}  // namespace

// The forward ops are the "aten" ones under the cudnn backend's names: their registered autograd formulas
// (dfs_kernels/ops/partitioned_conv2d.py) are what route the backward to the kernels above.
TORCH_LIBRARY_IMPL(dfs_kernels, CUDA, m) {
  m.impl("cudnn_partitioned_conv2d", TORCH_FN(partitioned_conv2d));
  m.impl("cudnn_partitioned_conv2d_with_exit_pool", TORCH_FN(partitioned_conv2d_with_exit_pool));
  m.impl("cudnn_partitioned_conv2d_input_grad", TORCH_FN(partitioned_conv2d_input_grad_cuda));
}

}  // namespace dfs_kernels
