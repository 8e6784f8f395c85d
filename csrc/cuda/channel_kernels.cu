// CUDA kernels of the channel-assembly ops. Only CUDA headers and kernel_types.h are included so that
// nvcc can compile this file without torch (see channel_kernels.cuh).
#include "channel_kernels.cuh"

#include <cstdint>
#include <limits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dfs_kernels::cuda {
namespace {

constexpr int kThreads = 256;
// A grid this size already fills every current GPU many times over; the grid-stride loops cover the
// rest, and keeping blockIdx.x * blockDim.x + threadIdx.x far below 2^32 lets it be formed in 32 bits.
constexpr int64_t kMaxBlocks = 65535LL * 4;

// 32-bit index arithmetic makes the per-element divisions much cheaper than 64-bit ones. It is used
// when every index, plus one grid stride (< 2^26), stays below 2^32, so the loop counter never wraps.
constexpr int64_t kMaxElementsFor32BitIndex = std::numeric_limits<int32_t>::max();

dim3 grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return dim3(static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks));
}

bool valid_sizes(int64_t batch, int64_t channels, int64_t spatial) {
  return batch >= 0 && channels >= 0 && spatial >= 0;
}

template <typename Index>
struct Position {
  Index n, c, s;
};

// The output is dense in its layout, so its flat index is the element's offset; only (n, c, s) must be
// recovered, to address the sources.
template <bool kChannelsLast, typename Index>
__device__ __forceinline__ Position<Index> decode(Index i, Index channels, Index spatial) {
  if constexpr (kChannelsLast) {
    const Index pixel = i / channels;
    const Index n = pixel / spatial;
    return {n, i - pixel * channels, pixel - n * spatial};
  } else {
    const Index row = i / spatial;
    const Index n = row / channels;
    return {n, row - n * channels, i - row * spatial};
  }
}

template <typename Index>
__device__ __forceinline__ Index first_index() {
  return static_cast<Index>(blockIdx.x * blockDim.x + threadIdx.x);
}

template <typename Index>
__device__ __forceinline__ Index grid_stride() {
  return static_cast<Index>(gridDim.x * blockDim.x);
}

// ---------------------------------------------------------------------------------------------------
// gather_channels

// T is an unsigned integer as wide as the element: the op only moves bits, so one instantiation per
// width serves every dtype of that width.
template <typename T, bool kChannelsLast, typename Index>
__global__ void __launch_bounds__(kThreads) gather_channels_kernel(
    T* __restrict__ out,              // [N, C, S] NCHW or NHWC (per kChannelsLast), dense
    const ChannelSegments segments,   // runs of output channels; sources are [N, C_src, S] strided or zeros
    Index total,                      // N * C * S
    Index channels,                   // C
    Index spatial) {                  // S = H * W
  for (Index i = first_index<Index>(); i < total; i += grid_stride<Index>()) {
    const Position<Index> p = decode<kChannelsLast>(i, channels, spatial);
    const int64_t c = static_cast<int64_t>(p.c);

    // The last run starting at or before c holds it (an empty run is followed by one with the same
    // begin, which wins). The fields are copied out in an unrolled loop rather than indexing
    // segments.segment[k] with a runtime k, which would copy the parameter struct to local memory.
    const ChannelSegment& first = segments.segment[0];
    const void* data = first.data;
    int64_t channel_shift = first.source_channel - first.begin;
    int64_t stride_n = first.stride_n, stride_c = first.stride_c, stride_s = first.stride_s;
#pragma unroll
    for (int k = 1; k < kMaxChannelSegments; ++k) {
      const ChannelSegment& segment = segments.segment[k];
      if (k < segments.count && segment.begin <= c) {
        data = segment.data;
        channel_shift = segment.source_channel - segment.begin;
        stride_n = segment.stride_n;
        stride_c = segment.stride_c;
        stride_s = segment.stride_s;
      }
    }

    T value = 0;
    if (data != nullptr) {
      // Source offsets stay 64-bit even on the 32-bit path: a strided source can span far more memory
      // than the output has elements.
      const int64_t offset = static_cast<int64_t>(p.n) * stride_n + (c + channel_shift) * stride_c +
                             static_cast<int64_t>(p.s) * stride_s;
      value = static_cast<const T*>(data)[offset];
    }
    out[i] = value;
  }
}

template <typename T, bool kChannelsLast>
cudaError_t launch_gather(
    void* out, const ChannelSegments& segments, int64_t total, int64_t channels, int64_t spatial,
    cudaStream_t stream) {
  const dim3 grid = grid_for(total);
  if (total <= kMaxElementsFor32BitIndex) {
    gather_channels_kernel<T, kChannelsLast, uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), segments, static_cast<uint32_t>(total), static_cast<uint32_t>(channels),
        static_cast<uint32_t>(spatial));
  } else {
    gather_channels_kernel<T, kChannelsLast, int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), segments, total, channels, spatial);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gather_layout(
    void* out, const ChannelSegments& segments, int64_t total, int64_t channels, int64_t spatial,
    bool channels_last, cudaStream_t stream) {
  return channels_last ? launch_gather<T, true>(out, segments, total, channels, spatial, stream)
                       : launch_gather<T, false>(out, segments, total, channels, spatial, stream);
}

// ---------------------------------------------------------------------------------------------------
// pooled_grad_broadcast

// Arithmetic type of each storage type and the conversions to and from it; converting back rounds to
// nearest even, as ATen does.
template <typename T>
struct Arithmetic;

template <>
struct Arithmetic<float> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(float v) { return v; }
  static __device__ __forceinline__ float store(Acc v) { return v; }
};

template <>
struct Arithmetic<double> {
  using Acc = double;
  static __device__ __forceinline__ Acc load(double v) { return v; }
  static __device__ __forceinline__ double store(Acc v) { return v; }
};

template <>
struct Arithmetic<__half> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(Acc v) { return __float2half_rn(v); }
};

template <>
struct Arithmetic<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ Acc load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(Acc v) { return __float2bfloat16_rn(v); }
};

// Writes only channels [first_channel, C) of `out`: the partitioned convolution's input gradient has
// cuDNN write channels [0, Cp) in place and this kernel the rest, so each element is written once.
template <typename T, bool kChannelsLast, typename Index>
__global__ void __launch_bounds__(kThreads) pooled_grad_broadcast_kernel(
    T* __restrict__ out,                 // [N, C, S] NCHW or NHWC (per kChannelsLast), dense
    const T* __restrict__ grad_pooled,   // [N, C] strided, or nullptr: zeros everywhere
    int64_t grad_stride_n,               // grad_pooled stride of N, in elements
    int64_t grad_stride_c,               // grad_pooled stride of C, in elements
    Index total,                         // N * (C - first_channel) * S: the elements written
    Index channels,                      // C
    Index spatial,                       // S = H * W
    Index first_channel,                 // channels [0, first_channel) of out are not touched
    Index shared_channels) {             // channels [first_channel, shared_channels) of out are zero
  using Acc = typename Arithmetic<T>::Acc;
  // A true division, not a multiply by 1/S, so results match ATen's grad / S bit for bit.
  const Acc divisor = static_cast<Acc>(spatial);
  const T zero = Arithmetic<T>::store(Acc(0));
  const Index written_channels = channels - first_channel;
  for (Index i = first_index<Index>(); i < total; i += grid_stride<Index>()) {
    // (n, c - first_channel, s) over the written channels; the offset into `out` is recomputed with
    // all C channels (it is i itself when first_channel == 0).
    const Position<Index> p = decode<kChannelsLast>(i, written_channels, spatial);
    const Index c = first_channel + p.c;
    const Index offset = kChannelsLast ? (p.n * spatial + p.s) * channels + c : (p.n * channels + c) * spatial + p.s;
    T value = zero;
    if (grad_pooled != nullptr && c >= shared_channels) {
      const int64_t source = static_cast<int64_t>(p.n) * grad_stride_n + static_cast<int64_t>(c) * grad_stride_c;
      value = Arithmetic<T>::store(Arithmetic<T>::load(grad_pooled[source]) / divisor);
    }
    out[offset] = value;
  }
}

template <typename T, bool kChannelsLast>
cudaError_t launch_broadcast(
    void* out, const void* grad_pooled, int64_t grad_stride_n, int64_t grad_stride_c, int64_t batch,
    int64_t channels, int64_t spatial, int64_t first_channel, int64_t shared_channels, cudaStream_t stream) {
  const int64_t total = batch * (channels - first_channel) * spatial;
  const dim3 grid = grid_for(total);
  // shared_channels is clamped into [0, C] so that it fits whichever index type is chosen; the result
  // is the same for any value outside that range.
  const int64_t shared = shared_channels < 0 ? 0 : (shared_channels > channels ? channels : shared_channels);
  // The index type is chosen by the whole output, which bounds every offset computed.
  if (batch * channels * spatial <= kMaxElementsFor32BitIndex) {
    pooled_grad_broadcast_kernel<T, kChannelsLast, uint32_t><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(grad_pooled), grad_stride_n, grad_stride_c,
        static_cast<uint32_t>(total), static_cast<uint32_t>(channels), static_cast<uint32_t>(spatial),
        static_cast<uint32_t>(first_channel), static_cast<uint32_t>(shared));
  } else {
    pooled_grad_broadcast_kernel<T, kChannelsLast, int64_t><<<grid, kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(grad_pooled), grad_stride_n, grad_stride_c, total,
        channels, spatial, first_channel, shared);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_broadcast_layout(
    void* out, const void* grad_pooled, int64_t grad_stride_n, int64_t grad_stride_c, int64_t batch,
    int64_t channels, int64_t spatial, int64_t first_channel, int64_t shared_channels, bool channels_last,
    cudaStream_t stream) {
  return channels_last
             ? launch_broadcast<T, true>(out, grad_pooled, grad_stride_n, grad_stride_c, batch, channels, spatial,
                                         first_channel, shared_channels, stream)
             : launch_broadcast<T, false>(out, grad_pooled, grad_stride_n, grad_stride_c, batch, channels, spatial,
                                          first_channel, shared_channels, stream);
}

}  // namespace

cudaError_t gather_channels(
    void* out, const ChannelSegments& segments, int64_t batch, int64_t channels, int64_t spatial,
    bool channels_last, int element_size, cudaStream_t stream) {
  if (!valid_sizes(batch, channels, spatial) || segments.count < 1 || segments.count > kMaxChannelSegments) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = batch * channels * spatial;
  if (total == 0) {
    return cudaSuccess;
  }
  switch (element_size) {
    case 2:
      return launch_gather_layout<uint16_t>(out, segments, total, channels, spatial, channels_last, stream);
    case 4:
      return launch_gather_layout<uint32_t>(out, segments, total, channels, spatial, channels_last, stream);
    case 8:
      return launch_gather_layout<uint64_t>(out, segments, total, channels, spatial, channels_last, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t pooled_grad_broadcast(
    void* out, const void* grad_pooled, int64_t grad_stride_n, int64_t grad_stride_c, int64_t batch,
    int64_t channels, int64_t spatial, int64_t first_channel, int64_t shared_channels, bool channels_last,
    FloatKind kind, cudaStream_t stream) {
  if (!valid_sizes(batch, channels, spatial) || first_channel < 0 || first_channel > channels) {
    return cudaErrorInvalidValue;
  }
  if (batch * (channels - first_channel) * spatial == 0) {
    return cudaSuccess;
  }
  switch (kind) {
    case FloatKind::kFloat32:
      return launch_broadcast_layout<float>(out, grad_pooled, grad_stride_n, grad_stride_c, batch, channels,
                                            spatial, first_channel, shared_channels, channels_last, stream);
    case FloatKind::kFloat64:
      return launch_broadcast_layout<double>(out, grad_pooled, grad_stride_n, grad_stride_c, batch, channels,
                                             spatial, first_channel, shared_channels, channels_last, stream);
    case FloatKind::kFloat16:
      return launch_broadcast_layout<__half>(out, grad_pooled, grad_stride_n, grad_stride_c, batch, channels,
                                             spatial, first_channel, shared_channels, channels_last, stream);
    case FloatKind::kBFloat16:
      return launch_broadcast_layout<__nv_bfloat16>(out, grad_pooled, grad_stride_n, grad_stride_c, batch,
                                                    channels, spatial, first_channel, shared_channels,
                                                    channels_last, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace dfs_kernels::cuda
