// The split-point ops of the "aten" (and "cudnn") backend and their autograd, as C++ autograd Functions:
// exit_avg_pool (whose kernels are in ../partitioned_conv2d.cpp and ../cpu, ../cuda), and reroute and
// exit_reference, whose outputs are views of x (no copy), as those of the Python Functions in
// dfs_kernels/ops/channels.py that the Triton backend and torch.compile use.
//
// Backward: the gradient of x from the gradients of its views, by merge_channels (one pass; the gradient
// itself when one view covers every channel), or exit_avg_pool_backward. With grad mode on
// (create_graph=True) the differentiable formulas of composite.h instead.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "composite.h"
#include "op_handles.h"

namespace dfs_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// `tensor` with its channels on axis `dim` as [A, C, B, 1]: A the product of the sizes before `dim`,
// B of those after. The identity for a feature map on dim 1, a view for every contiguous tensor.
at::Tensor as_feature_map(const at::Tensor& tensor, int64_t dim) {
  if (dim == 1 && tensor.dim() == 4) {
    return tensor;
  }
  c10::SymInt before = 1, after = 1;
  for (int64_t axis = 0; axis < tensor.dim(); ++axis) {
    if (axis < dim) {
      before = before * tensor.sym_size(axis);
    } else if (axis > dim) {
      after = after * tensor.sym_size(axis);
    }
  }
  return tensor.reshape_symint({before, tensor.sym_size(dim), after, 1});
}

// The gradient of x at a split point from the gradients of its two views (undefined: view unused):
// channels [0, split) of `head`, [split, C) of `tail`, on axis `dim` of tensors shaped like x.
at::Tensor merge_on_axis(const at::Tensor& head, const at::Tensor& tail, int64_t split, int64_t dim) {
  const at::Tensor& present = head.defined() ? head : tail;
  if (!present.defined()) {
    return at::Tensor();
  }
  const at::Tensor head_map = head.defined() ? as_feature_map(head, dim) : at::Tensor();
  const at::Tensor tail_map = tail.defined() ? as_feature_map(tail, dim) : at::Tensor();
  at::Tensor merged;
  if (at::GradMode::is_enabled()) {  // create_graph: a backward that can itself be differentiated
    merged = composite::merge_channels(head_map, tail_map, split);
  } else if (split == 0 && tail.defined()) {  // every channel comes from tail
    return tail;
  } else if (split == present.size(dim) && head.defined()) {
    return head;
  } else {
    static const auto merge_channels =
        typed_op<at::Tensor(const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t)>(
            "merge_channels");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    merged = merge_channels.call(head.defined() ? std::optional<at::Tensor>(head_map) : std::nullopt,
                                 tail.defined() ? std::optional<at::Tensor>(tail_map) : std::nullopt, split);
  }
  return merged.reshape_symint(present.sym_sizes());
}

void check_split(const at::Tensor& x, int64_t shared_channels, int64_t dim, const char* op) {
  TORCH_CHECK(0 < dim && dim < x.dim(), op, ": dim must be a channel axis in [1, ", x.dim(), "), got ", dim);
  TORCH_CHECK(0 <= shared_channels && shared_channels <= x.size(dim), op, ": shared_channels must be in [0, ",
              x.size(dim), "], got ", shared_channels);
}

void save_split(AutogradContext* ctx, int64_t shared_channels, int64_t dim) {
  ctx->saved_data["shared_channels"] = shared_channels;
  ctx->saved_data["dim"] = dim;
  ctx->set_materialize_grads(false);  // an unused view sends an undefined gradient: nothing to read or zero
}

struct RerouteFunction : torch::autograd::Function<RerouteFunction> {
  static variable_list forward(AutogradContext* ctx,
                               const at::Tensor& x,      // channels on axis dim
                               int64_t shared_channels,  // Cp in [0, C]
                               int64_t dim) {            // the channel axis, non-negative, not 0
    save_split(ctx, shared_channels, dim);
    return {x.view_as(x), x.view_as(x)};  // views made with grad mode off: autograd ties them to this node
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {merge_on_axis(grads[0], grads[1], ctx->saved_data["shared_channels"].toInt(),
                          ctx->saved_data["dim"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

struct ExitReferenceFunction : torch::autograd::Function<ExitReferenceFunction> {
  static at::Tensor forward(AutogradContext* ctx,
                            const at::Tensor& x,      // channels on axis dim
                            int64_t shared_channels,  // Cp in [0, C]
                            int64_t dim) {            // the channel axis, non-negative, not 0
    save_split(ctx, shared_channels, dim);
    return x.view_as(x);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {merge_on_axis(at::Tensor(), grads[0], ctx->saved_data["shared_channels"].toInt(),
                          ctx->saved_data["dim"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

struct ExitAvgPoolFunction : torch::autograd::Function<ExitAvgPoolFunction> {
  static at::Tensor forward(AutogradContext* ctx,
                            const at::Tensor& input,     // [N, C, H, W]
                            int64_t shared_channels) {   // Cp in [0, C]
    ctx->saved_data["input_size"] = input.sym_sizes();
    ctx->saved_data["shared_channels"] = shared_channels;
    ctx->saved_data["channels_last"] = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
    static const auto pool = typed_op<at::Tensor(const at::Tensor&, int64_t)>("exit_avg_pool");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return pool.call(input, shared_channels);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<c10::SymInt> input_size = ctx->saved_data["input_size"].toSymIntVector();
    const int64_t cp = ctx->saved_data["shared_channels"].toInt();
    if (at::GradMode::is_enabled()) {  // create_graph: a backward that can itself be differentiated
      return {composite::exit_avg_pool_backward(grads[0], input_size, cp), at::Tensor()};
    }
    static const auto pool_backward =
        typed_op<at::Tensor(const at::Tensor&, c10::SymIntArrayRef, int64_t, bool)>("exit_avg_pool_backward");
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return {pool_backward.call(grads[0], input_size, cp, ctx->saved_data["channels_last"].toBool()), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> reroute_autograd(const at::Tensor& x, int64_t shared_channels, int64_t dim) {
  check_split(x, shared_channels, dim, "reroute");
  const variable_list views = RerouteFunction::apply(x, shared_channels, dim);
  return {views[0], views[1]};
}

at::Tensor exit_reference_autograd(const at::Tensor& x, int64_t shared_channels, int64_t dim) {
  check_split(x, shared_channels, dim, "exit_reference");
  return ExitReferenceFunction::apply(x, shared_channels, dim);
}

at::Tensor exit_avg_pool_autograd(const at::Tensor& input, int64_t shared_channels) {
  return ExitAvgPoolFunction::apply(input, shared_channels);
}

// Below autograd (inference mode): the views alone.
std::tuple<at::Tensor, at::Tensor> reroute(const at::Tensor& x, int64_t shared_channels, int64_t dim) {
  check_split(x, shared_channels, dim, "reroute");
  return {x.alias(), x.alias()};
}

at::Tensor exit_reference(const at::Tensor& x, int64_t shared_channels, int64_t dim) {
  check_split(x, shared_channels, dim, "exit_reference");
  return x.alias();
}

}  // namespace

TORCH_LIBRARY_IMPL(dfs_kernels, CompositeExplicitAutograd, m) {
  m.impl("reroute", TORCH_FN(reroute));
  m.impl("exit_reference", TORCH_FN(exit_reference));
}

TORCH_LIBRARY_IMPL(dfs_kernels, Autograd, m) {
  m.impl("exit_avg_pool", TORCH_FN(exit_avg_pool_autograd));
  m.impl("reroute", TORCH_FN(reroute_autograd));
  m.impl("exit_reference", TORCH_FN(exit_reference_autograd));
}

}  // namespace dfs_kernels
