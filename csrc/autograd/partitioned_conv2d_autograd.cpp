// Autograd of the partitioned convolution family (dfs_kernels::partitioned_conv2d,
// ..._with_exit_pool) for the compiled backends' prefixes ("" = aten, "cudnn_"), as C++ autograd
// Functions: a training call is one dispatcher call forward and one node backward, no Python on the
// way. The Triton prefix keeps the Python formula of dfs_kernels/ops/partitioned_conv2d.py, which
// computes the same gradients.
//
// Backward: the input gradient of channels [0, Cp) (and, in a stage, the exit's on [Cp, C)) from the
// backend's ..._input_grad kernel, the weight and bias gradients from ATen's convolution_backward.
// With grad mode on (create_graph=True) the differentiable formulas of composite.h instead.
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

// The ops one prefix's Functions call below autograd.
struct ConvOps {
  using Forward = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, int64_t, int64_t);
  using Stage = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, at::IntArrayRef, at::IntArrayRef,
                                                   at::IntArrayRef, int64_t, int64_t);
  using InputGrad = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                               at::IntArrayRef, at::IntArrayRef, int64_t, int64_t, const std::optional<at::Tensor>&);
  using PoolBackward = at::Tensor(const at::Tensor&, c10::SymIntArrayRef, int64_t, bool);

  c10::TypedOperatorHandle<Forward> forward;
  c10::TypedOperatorHandle<Stage> stage;
  c10::TypedOperatorHandle<InputGrad> input_grad;
  c10::TypedOperatorHandle<PoolBackward> pool_backward;  // both prefixes share aten's exit ops
};

template <Prefix P>
const ConvOps& conv_ops() {
  static const ConvOps ops = [] {
    const std::string prefix = prefix_name(P);
    return ConvOps{typed_op<ConvOps::Forward>(prefix + "partitioned_conv2d"),
                   typed_op<ConvOps::Stage>(prefix + "partitioned_conv2d_with_exit_pool"),
                   typed_op<ConvOps::InputGrad>(prefix + "partitioned_conv2d_input_grad"),
                   typed_op<ConvOps::PoolBackward>("exit_avg_pool_backward")};
  }();
  return ops;
}

void save_conv(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& weight,
               const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation, int64_t groups, int64_t shared_channels) {
  ctx->save_for_backward({input, weight});
  ctx->saved_data["stride"] = stride;
  ctx->saved_data["padding"] = padding;
  ctx->saved_data["dilation"] = dilation;
  ctx->saved_data["groups"] = groups;
  ctx->saved_data["shared_channels"] = shared_channels;
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->set_materialize_grads(false);  // an unused stage output sends an undefined gradient: never made
}

// (grad_input, grad_weight, grad_bias, then undefined for the 5 non-tensor arguments).
template <Prefix P>
variable_list conv_backward(AutogradContext* ctx, const at::Tensor& grad_output, const at::Tensor& grad_pooled) {
  variable_list grads(8);
  if (!grad_output.defined() && !grad_pooled.defined()) {  // no output was used
    return grads;
  }
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor& input = saved[0];
  const at::Tensor& weight = saved[1];
  const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
  const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
  const std::vector<int64_t> dilation = ctx->saved_data["dilation"].toIntVector();
  const int64_t groups = ctx->saved_data["groups"].toInt();
  const int64_t cp = ctx->saved_data["shared_channels"].toInt();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const bool needs_input = ctx->needs_input_grad(0), needs_weight = ctx->needs_input_grad(1);
  const bool needs_bias = has_bias && ctx->needs_input_grad(2);
  if (at::GradMode::is_enabled()) {  // create_graph: a backward that can itself be differentiated
    std::tie(grads[0], grads[1], grads[2]) =
        composite::conv_grads(grad_output, grad_pooled, input, weight, has_bias, stride, padding, dilation, groups,
                              cp, needs_input, needs_weight, needs_bias);
    return grads;
  }
  // Grad mode is off: straight to the kernels, past the backward ops' own (Python) autograd formulas.
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const ConvOps& ops = conv_ops<P>();
  if (needs_input) {
    grads[0] = grad_output.defined()
                   ? ops.input_grad.call(grad_output, input, weight, stride, padding, dilation, groups, cp,
                                         grad_pooled.defined() ? std::optional<at::Tensor>(grad_pooled) : std::nullopt)
                   : ops.pool_backward.call(grad_pooled, input.sym_sizes(), cp,
                                            input.suggest_memory_format() == at::MemoryFormat::ChannelsLast);
  }
  if (grad_output.defined() && (needs_weight || needs_bias)) {
    const std::vector<c10::SymInt> bias_sizes = {weight.sym_size(0)};
    std::tie(std::ignore, grads[1], grads[2]) = at::convolution_backward_symint(
        grad_output, input, weight, has_bias ? at::OptionalSymIntArrayRef(bias_sizes) : std::nullopt,
        c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
        /*transposed=*/false, {c10::SymInt(0), c10::SymInt(0)}, groups, {false, needs_weight, needs_bias});
  }
  return grads;
}

template <Prefix P>
struct PartitionedConv2dFunction : torch::autograd::Function<PartitionedConv2dFunction<P>> {
  static at::Tensor forward(AutogradContext* ctx,
                            const at::Tensor& input,                // [N, C_in, H, W]
                            const at::Tensor& weight,               // [C_out, C_in / groups, kH, kW]
                            const std::optional<at::Tensor>& bias,  // [C_out] or None
                            at::IntArrayRef stride,                 // [2]
                            at::IntArrayRef padding,                // [2]
                            at::IntArrayRef dilation,               // [2]
                            int64_t groups,
                            int64_t shared_channels) {              // Cp in [0, C_in]
    save_conv(ctx, input, weight, bias, stride, padding, dilation, groups, shared_channels);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return conv_ops<P>().forward.call(input, weight, bias, stride, padding, dilation, groups, shared_channels);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return conv_backward<P>(ctx, grads[0], at::Tensor());
  }
};

template <Prefix P>
struct PartitionedConv2dWithExitPoolFunction
    : torch::autograd::Function<PartitionedConv2dWithExitPoolFunction<P>> {
  static variable_list forward(AutogradContext* ctx,
                               const at::Tensor& input,                // [N, C_in, H, W]
                               const at::Tensor& weight,               // [C_out, C_in / groups, kH, kW]
                               const std::optional<at::Tensor>& bias,  // [C_out] or None
                               at::IntArrayRef stride,                 // [2]
                               at::IntArrayRef padding,                // [2]
                               at::IntArrayRef dilation,               // [2]
                               int64_t groups,
                               int64_t shared_channels) {              // Cp in [0, C_in]
    save_conv(ctx, input, weight, bias, stride, padding, dilation, groups, shared_channels);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [conv, pooled] =
        conv_ops<P>().stage.call(input, weight, bias, stride, padding, dilation, groups, shared_channels);
    return {conv, pooled};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return conv_backward<P>(ctx, grads[0], grads[1]);
  }
};

template <Prefix P>
at::Tensor partitioned_conv2d_autograd(const at::Tensor& input, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                       int64_t shared_channels) {
  return PartitionedConv2dFunction<P>::apply(input, weight, bias, stride, padding, dilation, groups, shared_channels);
}

template <Prefix P>
std::tuple<at::Tensor, at::Tensor> partitioned_conv2d_with_exit_pool_autograd(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t shared_channels) {
  const variable_list outputs = PartitionedConv2dWithExitPoolFunction<P>::apply(
      input, weight, bias, stride, padding, dilation, groups, shared_channels);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dfs_kernels, Autograd, m) {
  m.impl("partitioned_conv2d", TORCH_FN(partitioned_conv2d_autograd<Prefix::kAten>));
  m.impl("partitioned_conv2d_with_exit_pool", TORCH_FN(partitioned_conv2d_with_exit_pool_autograd<Prefix::kAten>));
  m.impl("cudnn_partitioned_conv2d", TORCH_FN(partitioned_conv2d_autograd<Prefix::kCudnn>));
  m.impl("cudnn_partitioned_conv2d_with_exit_pool",
         TORCH_FN(partitioned_conv2d_with_exit_pool_autograd<Prefix::kCudnn>));
}

}  // namespace dfs_kernels
