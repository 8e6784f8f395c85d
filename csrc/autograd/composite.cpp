#include "composite.h"

#include <ATen/ATen.h>

namespace dfs_kernels::composite {
namespace {

// [1, C, 1, ...] (`dims` dimensions) boolean: channel index < split.
at::Tensor shared_mask(const at::Tensor& like, int64_t split) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[1] = like.size(1);
  return at::arange(like.size(1), like.options().dtype(at::kLong)).lt(split).view(shape);
}

at::Tensor zero_like_scalar(const at::Tensor& like) {
  return at::zeros({}, like.options());
}

}  // namespace

at::Tensor merge_channels(const at::Tensor& head, const at::Tensor& tail, int64_t split) {
  const at::Tensor& like = head.defined() ? head : tail;
  const at::Tensor mask = shared_mask(like, split);
  return at::where(mask, head.defined() ? head : zero_like_scalar(tail),
                   tail.defined() ? tail : zero_like_scalar(head));
}

at::Tensor exit_avg_pool_backward(const at::Tensor& grad_pooled, c10::SymIntArrayRef input_sizes,
                                  int64_t shared_channels) {
  const c10::SymInt area = input_sizes[2] * input_sizes[3];
  const at::Tensor spread =
      grad_pooled.div(c10::Scalar(area)).unsqueeze(-1).unsqueeze(-1).expand_symint(input_sizes);
  return merge_channels(at::Tensor(), spread, shared_channels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_grads(
    const at::Tensor& grad_output, const at::Tensor& grad_pooled, const at::Tensor& input, const at::Tensor& weight,
    bool has_bias, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    int64_t shared_channels, bool needs_input, bool needs_weight, bool needs_bias) {
  at::Tensor conv_input_grad, grad_weight, grad_bias;
  if (grad_output.defined() && (needs_input || needs_weight || needs_bias)) {
    // The weight gradient reads [x+, sg(x-)]: no derivative of any order reaches x- through it.
    const at::Tensor partitioned = merge_channels(input, input.detach(), shared_channels);
    const std::vector<c10::SymInt> bias_sizes = {weight.sym_size(0)};
    std::tie(conv_input_grad, grad_weight, grad_bias) = at::convolution_backward_symint(
        grad_output, partitioned, weight, has_bias ? at::OptionalSymIntArrayRef(bias_sizes) : std::nullopt,
        c10::fromIntArrayRefSlow(stride), c10::fromIntArrayRefSlow(padding), c10::fromIntArrayRefSlow(dilation),
        /*transposed=*/false, {c10::SymInt(0), c10::SymInt(0)}, groups, {needs_input, needs_weight, needs_bias});
  }
  at::Tensor grad_input;
  if (needs_input) {  // at least one of the two gradients is given (the caller returns early otherwise)
    const at::Tensor exit_grad = grad_pooled.defined()
                                     ? exit_avg_pool_backward(grad_pooled, input.sym_sizes(), shared_channels)
                                     : at::Tensor();
    grad_input = merge_channels(conv_input_grad, exit_grad, shared_channels);
  }
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_grads(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, int64_t shared_features,
    bool needs_input, bool needs_weight, bool needs_bias) {
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const at::Tensor mask = at::arange(in_features, input.options().dtype(at::kLong)).lt(shared_features);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (needs_input) {
    grad_input = at::where(mask, grad_output.matmul(weight), zero_like_scalar(grad_output));
  }
  const at::Tensor grad_rows = grad_output.reshape({-1, out_features});
  if (needs_weight) {
    const at::Tensor partitioned = at::where(mask, input, input.detach());
    grad_weight = grad_rows.t().mm(partitioned.reshape({-1, in_features}));
  }
  if (needs_bias) {
    grad_bias = grad_rows.sum(0);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace dfs_kernels::composite
