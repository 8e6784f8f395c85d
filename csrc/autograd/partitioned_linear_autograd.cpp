// Autograd of dfs_kernels::partitioned_linear for the compiled backends' prefixes ("" = aten, "cudnn_"),
// as a C++ autograd Function: one dispatcher call forward, one node backward. The Triton prefix keeps the
// Python formula of dfs_kernels/ops/partitioned_linear.py, which computes the same gradients.
//
// Backward: the input gradient of features [0, Cp) from the backend's ..._input_grad GEMM (written into
// its slice of the full gradient), the weight and bias gradients by ATen's GEMM and sum. With grad mode
// on (create_graph=True) the differentiable formulas of composite.h instead.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "composite.h"
#include "op_handles.h"

namespace dfs_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct LinearOps {
  using Forward = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t);
  using InputGrad = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
  c10::TypedOperatorHandle<Forward> forward;
  c10::TypedOperatorHandle<InputGrad> input_grad;
};

template <Prefix P>
const LinearOps& linear_ops() {
  static const LinearOps ops = [] {
    const std::string prefix = prefix_name(P);
    return LinearOps{typed_op<LinearOps::Forward>(prefix + "partitioned_linear"),
                     typed_op<LinearOps::InputGrad>(prefix + "partitioned_linear_input_grad")};
  }();
  return ops;
}

template <Prefix P>
struct PartitionedLinearFunction : torch::autograd::Function<PartitionedLinearFunction<P>> {
  static at::Tensor forward(AutogradContext* ctx,
                            const at::Tensor& input,                // [..., in_features]
                            const at::Tensor& weight,               // [out_features, in_features]
                            const std::optional<at::Tensor>& bias,  // [out_features] or None
                            int64_t shared_features) {              // Cp in [0, in_features]
    ctx->save_for_backward({input, weight});
    ctx->saved_data["shared_features"] = shared_features;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return linear_ops<P>().forward.call(input, weight, bias, shared_features);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor& input = saved[0];
    const at::Tensor& weight = saved[1];
    const int64_t cp = ctx->saved_data["shared_features"].toInt();
    const bool needs_input = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
    const bool needs_bias = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    variable_list result(4);
    if (at::GradMode::is_enabled()) {  // create_graph: a backward that can itself be differentiated
      std::tie(result[0], result[1], result[2]) =
          composite::linear_grads(grads[0], input, weight, cp, needs_input, needs_weight, needs_bias);
      return result;
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    // One [M, out] reading of grad_output for both GEMMs: a gradient that arrives non-contiguous (Q/K/V's,
    // from attention's head transposes) is copied here once, not once per GEMM, and the input-gradient op
    // gets a view of the same rows (splitting dimension 0 back into the leading sizes is always a view).
    const at::Tensor grad_rows = grads[0].reshape_symint({-1, weight.sym_size(0)});
    if (needs_input) {
      result[0] = linear_ops<P>().input_grad.call(grad_rows.view_symint(grads[0].sym_sizes()), input, weight, cp);
    }
    if (needs_weight) {
      result[1] = grad_rows.t().mm(input.reshape_symint({-1, weight.sym_size(1)}));
    }
    if (needs_bias) {
      result[2] = grad_rows.sum(0);
    }
    return result;
  }
};

template <Prefix P>
at::Tensor partitioned_linear_autograd(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, int64_t shared_features) {
  return PartitionedLinearFunction<P>::apply(input, weight, bias, shared_features);
}

}  // namespace

TORCH_LIBRARY_IMPL(dfs_kernels, Autograd, m) {
  m.impl("partitioned_linear", TORCH_FN(partitioned_linear_autograd<Prefix::kAten>));
  m.impl("cudnn_partitioned_linear", TORCH_FN(partitioned_linear_autograd<Prefix::kCudnn>));
}

}  // namespace dfs_kernels
