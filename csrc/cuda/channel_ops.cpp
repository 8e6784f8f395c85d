// CUDA implementations of the channel-assembly ops: torch-facing glue around the raw-pointer launchers in
// channel_kernels.cu. Built only in CUDA builds, since it needs the CUDA parts of torch's headers.
#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "../channel_assembly.h"
#include "channel_kernels.cuh"

namespace dfs_kernels {
namespace {

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// Runs the planned gather on the output's device and current stream.
at::Tensor run_gather(const ChannelAssembly& plan, const char* op) {
  const int64_t element_size = plan.output.element_size();
  // The kernel only moves 2-, 4- or 8-byte words; fail here with the dtype rather than later with a bare
  // cudaErrorInvalidValue.
  TORCH_CHECK(element_size == 2 || element_size == 4 || element_size == 8, op,
              ": CUDA supports dtypes of 2, 4 or 8 bytes, got ", plan.output.scalar_type());
  const c10::cuda::CUDAGuard guard(plan.output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cuda::gather_channels(
      plan.output.mutable_data_ptr(), plan.segments, plan.batch, plan.channels, plan.spatial, plan.channels_last,
      static_cast<int>(element_size), stream));
  return plan.output;
}

at::Tensor pad_channels_cuda(at::TensorList parts, int64_t channels) {
  // Checked before planning so that a CPU part is reported as such, not as a device mismatch, and so
  // that planning never copies a tensor the kernel could not read.
  for (size_t i = 0; i < parts.size(); ++i) {
    TORCH_CHECK(parts[i].is_cuda(), "pad_channels: parts[", i, "] must be a CUDA tensor, got one on ",
                parts[i].device());
  }
  const ChannelAssembly plan = plan_pad_channels(parts, channels);
  return run_gather(plan, "pad_channels");
}

at::Tensor merge_channels_cuda(
    const std::optional<at::Tensor>& head,
    const std::optional<at::Tensor>& tail,
    int64_t split) {
  if (head.has_value() && head->defined()) {
    check_cuda(*head, "merge_channels", "head");
  }
  if (tail.has_value() && tail->defined()) {
    check_cuda(*tail, "merge_channels", "tail");
  }
  const ChannelAssembly plan = plan_merge_channels(head, tail, split);
  return run_gather(plan, "merge_channels");
}

at::Tensor exit_avg_pool_backward_cuda(
    const at::Tensor& grad_pooled,
    c10::SymIntArrayRef input_size,
    int64_t shared_channels,
    bool channels_last) {
  check_cuda(grad_pooled, "exit_avg_pool_backward", "grad_pooled");
  at::Tensor output = empty_pooled_grad_output(grad_pooled, input_size, shared_channels, channels_last);
  const FloatKind kind = float_kind(grad_pooled.scalar_type());
  const c10::cuda::CUDAGuard guard(output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(cuda::pooled_grad_broadcast(
      output.mutable_data_ptr(), grad_pooled.const_data_ptr(), grad_pooled.stride(0), grad_pooled.stride(1),
      output.size(0), output.size(1), output.size(2) * output.size(3), /*first_channel=*/0, shared_channels,
      channels_last, kind, stream));
  return output;
}

}  // namespace
}  // namespace dfs_kernels

TORCH_LIBRARY_IMPL(dfs_kernels, CUDA, m) {
  m.impl("pad_channels", TORCH_FN(dfs_kernels::pad_channels_cuda));
  m.impl("merge_channels", TORCH_FN(dfs_kernels::merge_channels_cuda));
  m.impl("exit_avg_pool_backward", TORCH_FN(dfs_kernels::exit_avg_pool_backward_cuda));
}
