// The partitioned linear layer on ATen (MKL / oneDNN BLAS on CPU, cuBLAS on CUDA). The forward is one
// GEMM over every input feature. The input gradient is one GEMM over the shared features only,
// grad_output [M, out] @ weight[:, :Cp], whose output is the [M, Cp] slice of the full [M, in] gradient:
// BLAS writes a row-major matrix with a leading dimension of its own, here in_features, so the slice is
// written in place, with no temporary and no copy. The referenced features [Cp, in) are zeroed, the only
// other write.
#include "partitioned_linear.h"

#include <torch/library.h>

namespace dfs_kernels {
namespace {

void check_arguments(const at::Tensor& input, const at::Tensor& weight, int64_t shared_features, const char* op) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out_features, in_features], got ", weight.dim(),
              " dimensions");
  const int64_t in_features = weight.size(1);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in_features, op, ": input must be [..., in_features=",
              in_features, "], got sizes ", input.sizes());
  TORCH_CHECK(0 <= shared_features && shared_features <= in_features, op,
              ": shared_features must be in [0, in_features=", in_features, "], got ", shared_features);
}

}  // namespace

at::Tensor partitioned_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              int64_t shared_features) {
  check_arguments(input, weight, shared_features, "partitioned_linear");
  return at::linear(input, weight, bias);
}

at::Tensor partitioned_linear_input_grad(const at::Tensor& grad_output, const at::Tensor& input,
                                         const at::Tensor& weight, int64_t shared_features) {
  constexpr const char* op = "partitioned_linear_input_grad";
  check_arguments(input, weight, shared_features, op);
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  TORCH_CHECK(grad_output.dim() == input.dim() && grad_output.size(-1) == out_features &&
                  grad_output.sizes().slice(0, input.dim() - 1) == input.sizes().slice(0, input.dim() - 1),
              op, ": grad_output must be input's leading sizes and out_features=", out_features, ", got sizes ",
              grad_output.sizes(), " for input sizes ", input.sizes());
  const at::Tensor grad_input = at::empty(input.sizes(), grad_output.options());
  const int64_t rows = in_features == 0 ? 0 : grad_input.numel() / in_features;
  const at::Tensor grad_rows = grad_input.view({rows, in_features});
  if (shared_features < in_features) {
    grad_rows.narrow(1, shared_features, in_features - shared_features).zero_();
  }
  if (shared_features > 0) {
    at::Tensor shared_rows = grad_rows.narrow(1, 0, shared_features);  // [M, Cp], leading dimension in_features
    at::mm_out(shared_rows, grad_output.reshape({rows, out_features}), weight.narrow(1, 0, shared_features));
  }
  return grad_input;
}

TORCH_LIBRARY_IMPL(dfs_kernels, CompositeExplicitAutograd, m) {
  m.impl("partitioned_linear", &partitioned_linear);
  m.impl("partitioned_linear_input_grad", &partitioned_linear_input_grad);
}

}  // namespace dfs_kernels
