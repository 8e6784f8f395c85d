// Schemas of every compiled dfs_kernels op, grouped by op family in the order of dfs_kernels/ops/.
// Implementations register elsewhere: the ATen composites in partitioned_conv2d.cpp, the CPU kernels in
// cpu/, the CUDA kernels in cuda/ (CUDA builds only; the cudnn_* ops only where cuDNN was found too).
// The autograd of the forward ops of "aten" and "cudnn" is C++ (csrc/autograd/, one autograd Function per
// op); fakes, FLOP formulas and the autograd of the backward ops (differentiated only by double backward)
// are registered from Python, once per family (dfs_kernels/ops/). The "triton" backend defines the same
// schemas with the prefix triton_ (dfs_kernels/backends/triton/) and the Python autograd formulas, which
// compute what the C++ ones do.
#include <torch/library.h>

#include <vector>

// The ops below read inputs of any strides and give their outputs the layout their fakes predict from
// those strides. Tagged so, inductor hands them tensors in the layout it chose for the graph (on CPU it
// runs convolutions channels-last) instead of converting to the eager strides and back around each op.
static const std::vector<at::Tag> kAnyLayout = {at::Tag::flexible_layout};

TORCH_LIBRARY(dfs_kernels, m) {
  // --- partitioned convolution (dfs_kernels/ops/partitioned_conv2d.py) ---
  // Forward: conv2d over all input channels; its backward keeps the input gradient of channels
  // [0, shared_channels) only.
  m.def(
      "partitioned_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int shared_channels) -> Tensor",
      kAnyLayout);
  // A DFS stage: one feature map feeding a partitioned convolution and an exit that references the
  // same shared channels: (conv2d(input, ...), mean(input, dims=[2, 3])).
  m.def(
      "partitioned_conv2d_with_exit_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels) -> (Tensor, Tensor)",
      kAnyLayout);
  // Input gradient of channels [0, shared_channels) of a convolution (input is read for its shape and
  // layout); channels [shared_channels, C) get grad_pooled / (H * W) when an exit's pooled gradient is
  // given (a DFS stage), zeros otherwise. One tensor, written in one pass: no zero-fill, no add.
  m.def(
      "partitioned_conv2d_input_grad(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels, Tensor? grad_pooled=None) -> Tensor",
      kAnyLayout);
  // The "cudnn" backend: the same schemas and results; its input gradient has cuDNN write channels
  // [0, Cp) in place.
  m.def(
      "cudnn_partitioned_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int shared_channels) -> Tensor",
      kAnyLayout);
  m.def(
      "cudnn_partitioned_conv2d_with_exit_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels) -> (Tensor, Tensor)",
      kAnyLayout);
  m.def(
      "cudnn_partitioned_conv2d_input_grad(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels, Tensor? grad_pooled=None) -> Tensor",
      kAnyLayout);

  // --- partitioned linear layer (dfs_kernels/ops/partitioned_linear.py) ---
  // Forward: linear(input [..., in_features], weight, bias) over every input feature; its backward keeps
  // the input gradient of features [0, shared_features) only (the split is on the last axis).
  m.def("partitioned_linear(Tensor input, Tensor weight, Tensor? bias, int shared_features) -> Tensor");
  // Input gradient of features [0, shared_features) (input is read for its shape), zeros on the others:
  // one tensor, the GEMM writing its slice in place.
  m.def(
      "partitioned_linear_input_grad(Tensor grad_output, Tensor input, Tensor weight, int shared_features) "
      "-> Tensor");
  // The "cudnn" backend: the same schemas and results, cuBLAS writing the slice with its leading dimension.
  m.def("cudnn_partitioned_linear(Tensor input, Tensor weight, Tensor? bias, int shared_features) -> Tensor");
  m.def(
      "cudnn_partitioned_linear_input_grad(Tensor grad_output, Tensor input, Tensor weight, int shared_features) "
      "-> Tensor");

  // --- exit pooling (dfs_kernels/ops/exit_avg_pool.py) ---
  // Global average pool of an exit; its backward reaches only channels [shared_channels, C).
  m.def("exit_avg_pool(Tensor input, int shared_channels) -> Tensor", kAnyLayout);
  // grad_pooled [N, C] / (H * W) broadcast into channels [shared_channels, C) of [N, C, H, W], zeros elsewhere.
  m.def(
      "exit_avg_pool_backward(Tensor grad_pooled, SymInt[] input_size, int shared_channels, "
      "bool channels_last) -> Tensor",
      kAnyLayout);

  // --- channel assembly (dfs_kernels/ops/channels.py) ---
  // Channels [0, split) from head and [split, C) from tail, a missing one reading as zeros, in one pass:
  // the gradient of a split point (reroute, exit_reference).
  m.def("merge_channels(Tensor? head, Tensor? tail, int split) -> Tensor", kAnyLayout);
  // cat(parts, dim=1) zero-filled up to `channels` channels, in one pass: how the "aten" input gradient
  // places the shared channels' gradient in the full-size tensor.
  m.def("pad_channels(Tensor[] parts, int channels) -> Tensor", kAnyLayout);

  // --- split points (dfs_kernels/ops/channels.py) ---
  // (backbone, exit) = ([x+, sg(x-)], [sg(x+), x-]) on channel axis dim: both views of x; the gradient of
  // x is the backbone's on [0, shared_channels) and the exit's on the rest (merge_channels).
  m.def("reroute(Tensor(a) x, int shared_channels, int dim) -> (Tensor(a), Tensor(a))");
  // [sg(x+), x-]: a view of x whose gradient reaches channels [shared_channels, C) of axis dim only.
  m.def("exit_reference(Tensor(a) x, int shared_channels, int dim) -> Tensor(a)");
}
