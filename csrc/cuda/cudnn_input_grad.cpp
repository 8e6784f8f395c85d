// cuDNN's backward-data convolution into a strided view (see cudnn_input_grad.h).
//
// It uses cuDNN's legacy convolution API (cudnnConvolutionBackwardData): its tensor descriptors take any
// strides, which is all that writing into a channel slice needs, and it needs nothing beyond cudnn.h,
// which every CUDA build of torch ships with (the cuDNN frontend's C++ headers are not part of torch's
// wheels). The algorithm comes from cuDNN's heuristics, or from cuDNN measuring every algorithm when
// torch.backends.cudnn.benchmark is set, as in ATen, and is cached per problem.
#include "cudnn_input_grad.h"

#include <array>
#include <climits>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cudnn/Handle.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cudnn.h>

#if CUDNN_MAJOR < 9
#error "the cudnn backend needs cuDNN 9 or newer (its status categories tell unsupported problems from errors)"
#endif

namespace dfs_kernels::cuda {
namespace {

void check_cudnn(cudnnStatus_t status, const char* call) {
  TORCH_CHECK(status == CUDNN_STATUS_SUCCESS, "dfs_kernels: ", call, " failed: ", cudnnGetErrorString(status));
}

// cuDNN declining a problem (layout, alignment, shape), as opposed to failing at it.
bool declined(cudnnStatus_t status) {
  const int category = CUDNN_STATUS_CATEGORY(status);
  return category == CUDNN_STATUS_NOT_SUPPORTED || category == CUDNN_STATUS_BAD_PARAM;
}

template <typename T, cudnnStatus_t (*Create)(T*), cudnnStatus_t (*Destroy)(T)>
class Descriptor {
 public:
  Descriptor() { check_cudnn(Create(&handle_), "creating a cuDNN descriptor"); }
  ~Descriptor() { Destroy(handle_); }
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  T get() const { return handle_; }

 private:
  T handle_ = nullptr;
};

using TensorDescriptor =
    Descriptor<cudnnTensorDescriptor_t, &cudnnCreateTensorDescriptor, &cudnnDestroyTensorDescriptor>;
using FilterDescriptor =
    Descriptor<cudnnFilterDescriptor_t, &cudnnCreateFilterDescriptor, &cudnnDestroyFilterDescriptor>;
using ConvolutionDescriptor = Descriptor<cudnnConvolutionDescriptor_t, &cudnnCreateConvolutionDescriptor,
                                         &cudnnDestroyConvolutionDescriptor>;

cudnnDataType_t cudnn_data_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return CUDNN_DATA_FLOAT;
    case at::kDouble:
      return CUDNN_DATA_DOUBLE;
    case at::kHalf:
      return CUDNN_DATA_HALF;
    case at::kBFloat16:
      return CUDNN_DATA_BFLOAT16;
    default:
      TORCH_CHECK(false, "dfs_kernels: the cudnn backend supports float32, float64, float16 and bfloat16, got ", dtype);
  }
}

// cuDNN's descriptors hold int sizes and strides: a tensor spanning more elements goes to ATen, which
// splits the batch.
bool fits_cudnn(const at::Tensor& t) {
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > INT_MAX || t.stride(d) > INT_MAX) {
      return false;
    }
    span += (t.size(d) - 1) * t.stride(d);
  }
  return span <= INT_MAX;
}

// A size-1 dimension's stride means nothing to torch but cuDNN reads layouts from strides: give it the
// packed value of its place in the layout, as ATen does. This also shows cuDNN that a channel slice of
// an N == 1 NCHW tensor is the packed tensor it is.
std::array<int, 4> cudnn_strides(const at::Tensor& t, bool channels_last) {
  static constexpr std::array<int, 4> kNchwInnermostFirst = {3, 2, 1, 0};
  static constexpr std::array<int, 4> kNhwcInnermostFirst = {1, 3, 2, 0};
  std::array<int, 4> strides{};
  int64_t packed = 1;
  for (const int d : channels_last ? kNhwcInnermostFirst : kNchwInnermostFirst) {
    strides[d] = static_cast<int>(t.size(d) == 1 ? packed : t.stride(d));
    packed = static_cast<int64_t>(strides[d]) * t.size(d);
  }
  return strides;
}

std::array<int, 4> cudnn_sizes(const at::Tensor& t) {
  return {static_cast<int>(t.size(0)), static_cast<int>(t.size(1)), static_cast<int>(t.size(2)),
          static_cast<int>(t.size(3))};
}

// One backward-data convolution, described to cuDNN.
struct Problem {
  TensorDescriptor grad_input, grad_output;
  FilterDescriptor weight;
  ConvolutionDescriptor convolution;
  cudnnDataType_t data_type;
  bool ieee_float;  // float32 with TF32 disallowed: FMA math only, whatever an algorithm prefers

  Problem(const at::Tensor& dx, const at::Tensor& dy, const at::Tensor& w, at::IntArrayRef stride,
          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool channels_last,
          bool allow_tf32)
      : data_type(cudnn_data_type(dx.scalar_type())), ieee_float(data_type == CUDNN_DATA_FLOAT && !allow_tf32) {
    const std::array<int, 4> dx_sizes = cudnn_sizes(dx), dx_strides = cudnn_strides(dx, channels_last);
    const std::array<int, 4> dy_sizes = cudnn_sizes(dy), dy_strides = cudnn_strides(dy, channels_last);
    const std::array<int, 4> w_sizes = cudnn_sizes(w);  // K, C / groups, kH, kW in either format
    check_cudnn(cudnnSetTensorNdDescriptor(grad_input.get(), data_type, 4, dx_sizes.data(), dx_strides.data()),
                "cudnnSetTensorNdDescriptor");
    check_cudnn(cudnnSetTensorNdDescriptor(grad_output.get(), data_type, 4, dy_sizes.data(), dy_strides.data()),
                "cudnnSetTensorNdDescriptor");
    check_cudnn(cudnnSetFilterNdDescriptor(weight.get(), data_type, channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW,
                                           4, w_sizes.data()),
                "cudnnSetFilterNdDescriptor");
    const std::array<int, 2> pad = {static_cast<int>(padding[0]), static_cast<int>(padding[1])};
    const std::array<int, 2> step = {static_cast<int>(stride[0]), static_cast<int>(stride[1])};
    const std::array<int, 2> dilate = {static_cast<int>(dilation[0]), static_cast<int>(dilation[1])};
    // Half and bfloat16 accumulate in float (cuDNN's PSEUDO_HALF / PSEUDO_BFLOAT16 configurations).
    const cudnnDataType_t compute_type = data_type == CUDNN_DATA_DOUBLE ? CUDNN_DATA_DOUBLE : CUDNN_DATA_FLOAT;
    check_cudnn(cudnnSetConvolutionNdDescriptor(convolution.get(), 2, pad.data(), step.data(), dilate.data(),
                                                CUDNN_CROSS_CORRELATION, compute_type),
                "cudnnSetConvolutionNdDescriptor");
    check_cudnn(cudnnSetConvolutionGroupCount(convolution.get(), static_cast<int>(groups)),
                "cudnnSetConvolutionGroupCount");
    const bool reduced = data_type == CUDNN_DATA_HALF || data_type == CUDNN_DATA_BFLOAT16;
    set_math_type(reduced ? CUDNN_TENSOR_OP_MATH : ieee_float ? CUDNN_FMA_MATH : CUDNN_DEFAULT_MATH);
  }

  void set_math_type(cudnnMathType_t math_type) const {
    check_cudnn(cudnnSetConvolutionMathType(convolution.get(), ieee_float ? CUDNN_FMA_MATH : math_type),
                "cudnnSetConvolutionMathType");
  }
};

struct Algorithm {
  cudnnConvolutionBwdDataAlgo_t algo;
  cudnnMathType_t math_type;
  size_t workspace_bytes;
};

// Everything the choice of algorithm depends on: device, dtype, layout, sizes and strides, pointer
// alignment (tensor-core algorithms want 16 bytes; a channel slice may start anywhere), the
// convolution, and the TF32 / determinism / benchmark settings.
std::vector<int64_t> problem_key(const at::Tensor& dx, const at::Tensor& dy, const at::Tensor& w,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups, bool channels_last, bool allow_tf32, bool deterministic,
                                 bool benchmark) {
  std::vector<int64_t> key = {dx.get_device(), static_cast<int64_t>(dx.scalar_type()), channels_last, groups,
                              allow_tf32, deterministic, benchmark};
  for (const at::Tensor* t : {&dx, &dy, &w}) {
    key.insert(key.end(), t->sizes().begin(), t->sizes().end());
    key.insert(key.end(), t->strides().begin(), t->strides().end());
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16));
  }
  for (const at::IntArrayRef values : {stride, padding, dilation}) {
    key.insert(key.end(), values.begin(), values.end());
  }
  return key;
}

// Per problem: the algorithm that ran it, or nullopt when cuDNN declined every algorithm (ATen runs it).
std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::optional<Algorithm>> algorithm_cache;

std::optional<std::optional<Algorithm>> cached_choice(const std::vector<int64_t>& key) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  const auto found = algorithm_cache.find(key);
  return found == algorithm_cache.end() ? std::nullopt : std::make_optional(found->second);
}

void store_choice(const std::vector<int64_t>& key, std::optional<Algorithm> choice) {
  const std::lock_guard<std::mutex> lock(cache_mutex);
  algorithm_cache[key] = choice;
}

std::optional<at::Tensor> allocate_workspace(size_t bytes, const at::TensorOptions& options) {
  try {
    return at::empty({static_cast<int64_t>(bytes)}, options.dtype(at::kByte));
  } catch (const c10::OutOfMemoryError&) {
    return std::nullopt;
  }
}

struct Buffers {
  void* grad_input;
  const void* grad_output;
  const void* weight;
  at::TensorOptions options;  // of the workspace
};

// The algorithms cuDNN accepts for the problem, best first: its heuristics' order, or measured order
// when benchmarking. Determinism, when asked for, rules out the others.
std::vector<Algorithm> candidates(cudnnHandle_t handle, const Problem& problem, const Buffers& buffers,
                                  bool deterministic, bool benchmark) {
  std::array<cudnnConvolutionBwdDataAlgoPerf_t, CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT> perf{};
  int count = 0;
  cudnnStatus_t status = cudnnGetConvolutionBackwardDataAlgorithm_v7(
      handle, problem.weight.get(), problem.grad_output.get(), problem.convolution.get(), problem.grad_input.get(),
      static_cast<int>(perf.size()), &count, perf.data());
  if (status == CUDNN_STATUS_SUCCESS && benchmark) {
    // Every algorithm runs once on the real buffers (grad_input is overwritten later anyway), with the
    // largest workspace the heuristics asked for, or none when that much memory is not free.
    size_t bytes = 0;
    for (int i = 0; i < count; ++i) {
      bytes = perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory > bytes ? perf[i].memory : bytes;
    }
    std::optional<at::Tensor> workspace = allocate_workspace(bytes, buffers.options);
    status = cudnnFindConvolutionBackwardDataAlgorithmEx(
        handle, problem.weight.get(), buffers.weight, problem.grad_output.get(), buffers.grad_output,
        problem.convolution.get(), problem.grad_input.get(), buffers.grad_input, static_cast<int>(perf.size()),
        &count, perf.data(), workspace ? workspace->data_ptr() : nullptr, workspace ? bytes : 0);
  }
  if (declined(status)) {
    return {};
  }
  check_cudnn(status, benchmark ? "cudnnFindConvolutionBackwardDataAlgorithmEx"
                                : "cudnnGetConvolutionBackwardDataAlgorithm_v7");
  std::vector<Algorithm> accepted;
  for (int i = 0; i < count; ++i) {
    if (perf[i].status == CUDNN_STATUS_SUCCESS && (!deterministic || perf[i].determinism == CUDNN_DETERMINISTIC)) {
      accepted.push_back({perf[i].algo, perf[i].mathType, perf[i].memory});
    }
  }
  return accepted;
}

enum class Outcome { kDone, kDeclined, kOutOfMemory };

Outcome run(cudnnHandle_t handle, const Problem& problem, const Buffers& buffers, const Algorithm& algorithm) {
  problem.set_math_type(algorithm.math_type);
  std::optional<at::Tensor> workspace;
  if (algorithm.workspace_bytes > 0) {
    workspace = allocate_workspace(algorithm.workspace_bytes, buffers.options);
    if (!workspace) {
      return Outcome::kOutOfMemory;
    }
  }
  // Scaling factors are double for double data, float otherwise; beta = 0 means grad_input is not read.
  const double one_double = 1.0, zero_double = 0.0;
  const float one_float = 1.0f, zero_float = 0.0f;
  const bool is_double = problem.data_type == CUDNN_DATA_DOUBLE;
  const cudnnStatus_t status = cudnnConvolutionBackwardData(
      handle, is_double ? static_cast<const void*>(&one_double) : &one_float, problem.weight.get(), buffers.weight,
      problem.grad_output.get(), buffers.grad_output, problem.convolution.get(), algorithm.algo,
      workspace ? workspace->data_ptr() : nullptr, algorithm.workspace_bytes,
      is_double ? static_cast<const void*>(&zero_double) : &zero_float, problem.grad_input.get(), buffers.grad_input);
  if (declined(status)) {
    return Outcome::kDeclined;
  }
  check_cudnn(status, "cudnnConvolutionBackwardData");
  return Outcome::kDone;
}

// Returns false, having written nothing, when no algorithm could run the problem in place.
bool run_cudnn(const at::Tensor& dx, const at::Tensor& dy, const at::Tensor& w, at::IntArrayRef stride,
               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, bool channels_last) {
  at::Context& context = at::globalContext();
  const bool allow_tf32 = context.allowTF32CuDNN();
  const bool deterministic = context.deterministicCuDNN() || context.deterministicAlgorithms();
  const bool benchmark = context.benchmarkCuDNN();
  // The handle is this thread's for the current device, already bound to the current stream; bound
  // again here so that the stream the work runs on is visible where it is launched.
  const cudnnHandle_t handle = at::native::getCudnnHandle();
  check_cudnn(cudnnSetStream(handle, c10::cuda::getCurrentCUDAStream().stream()), "cudnnSetStream");
  const Problem problem(dx, dy, w, stride, padding, dilation, groups, channels_last, allow_tf32);
  const Buffers buffers{dx.data_ptr(), dy.const_data_ptr(), w.const_data_ptr(), dx.options()};
  const std::vector<int64_t> key =
      problem_key(dx, dy, w, stride, padding, dilation, groups, channels_last, allow_tf32, deterministic, benchmark);

  const std::optional<std::optional<Algorithm>> cached = cached_choice(key);
  if (cached && !*cached) {
    return false;
  }
  if (cached && run(handle, problem, buffers, **cached) == Outcome::kDone) {
    return true;
  }
  bool out_of_memory = false;
  for (const Algorithm& algorithm : candidates(handle, problem, buffers, deterministic, benchmark)) {
    const Outcome outcome = run(handle, problem, buffers, algorithm);
    if (outcome == Outcome::kDone) {
      store_choice(key, algorithm);
      return true;
    }
    out_of_memory |= outcome == Outcome::kOutOfMemory;
  }
  if (!out_of_memory) {  // declined for good; a workspace that did not fit may fit next time
    store_choice(key, std::nullopt);
  }
  return false;
}

}  // namespace

void cudnn_input_grad_into(const at::Tensor& grad_input, const at::Tensor& grad_output, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           bool channels_last) {
  if (grad_input.numel() == 0) {
    return;
  }
  // cuDNN reads grad_output and weight dense in the layout it computes in. Both usually are already; the
  // exceptions are copied, as ATen's own path copies them: a weight cut along its input channels (weights
  // are small) and, for a grouped convolution whose shared channels end before its last group, the
  // channel slice of grad_output that reaches them.
  const at::MemoryFormat format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor dy = grad_output.contiguous(format);
  const at::Tensor w = weight.contiguous(format);
  if (at::globalContext().userEnabledCuDNN() && fits_cudnn(grad_input) && fits_cudnn(dy) && fits_cudnn(w) &&
      run_cudnn(grad_input, dy, w, stride, padding, dilation, groups, channels_last)) {
    return;
  }
  // ATen's input gradient reads only the shape and memory format of its `input` argument, but first makes
  // it contiguous: an uninitialized tensor of the slice's shape spares copying the view.
  const at::Tensor input_shape = at::empty(grad_input.sizes(), grad_input.options().memory_format(format));
  grad_input.copy_(std::get<0>(at::convolution_backward(dy, input_shape, w, /*bias_sizes=*/std::nullopt, stride,
                                                        padding, dilation, /*transposed=*/false,
                                                        /*output_padding=*/{0, 0}, groups, {true, false, false})));
}

}  // namespace dfs_kernels::cuda
