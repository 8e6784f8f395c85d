// Schemas of every dfs_kernels op. Implementations register elsewhere: the ATen composites in
// partitioned_conv2d.cpp, the CPU kernels in cpu/, the CUDA kernels in cuda/ (CUDA builds only; the
// cuda_* ops only where cuDNN was found too). Autograd formulas and fake (meta) implementations are
// registered from Python (dfs_kernels/backends/).
#include <torch/library.h>

TORCH_LIBRARY(dfs_kernels, m) {
  // Forward of the partitioned convolution: conv2d over all input channels; its backward keeps the
  // input gradient of channels [0, shared_channels) only.
  m.def(
      "partitioned_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int shared_channels) -> Tensor");
  // Forward of a DFS stage: one feature map feeding a partitioned convolution and an exit that
  // references the same shared channels: (conv2d(input, ...), mean(input, dims=[2, 3])).
  m.def(
      "partitioned_conv2d_with_exit_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels) -> (Tensor, Tensor)");
  // Input gradient of the channels [0, shared_channels) of a convolution; channels
  // [shared_channels, C) get grad_pooled / (H * W) when an exit's pooled gradient is given (a DFS
  // stage), zeros otherwise. One tensor, written in one pass: no zero-fill, no add.
  m.def(
      "partitioned_conv2d_input_grad(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels, Tensor? grad_pooled=None) -> Tensor");
  // Global average pool of an exit; its backward reaches only channels [shared_channels, C).
  m.def("exit_avg_pool(Tensor input, int shared_channels) -> Tensor");
  // grad_pooled [N, C] / (H * W) broadcast into channels [shared_channels, C) of [N, C, H, W], zeros elsewhere.
  m.def(
      "exit_avg_pool_backward(Tensor grad_pooled, SymInt[] input_size, int shared_channels, "
      "bool channels_last) -> Tensor");
  // cat(parts, dim=1) zero-filled up to `channels` channels, in one pass.
  m.def("pad_channels(Tensor[] parts, int channels) -> Tensor");
  // Channels [0, split) from head and [split, C) from tail, a missing one reading as zeros, in one pass.
  m.def("merge_channels(Tensor? head, Tensor? tail, int split) -> Tensor");
  // The "cuda" backend's partitioned convolution: the same schemas and results as the three ops above
  // of the same names without the prefix; its input gradient has cuDNN write channels [0, Cp) in place.
  m.def(
      "cuda_partitioned_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups, int shared_channels) -> Tensor");
  m.def(
      "cuda_partitioned_conv2d_with_exit_pool(Tensor input, Tensor weight, Tensor? bias, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels) -> (Tensor, Tensor)");
  m.def(
      "cuda_partitioned_conv2d_input_grad(Tensor grad_output, Tensor input, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int shared_channels, Tensor? grad_pooled=None) -> Tensor");
}
