#pragma once
// Batch norm's per-channel reductions on CUDA, each in one launch: every block folds a range of
// its channels' elements into partial states, and the last block of a channel's blocks to finish
// merges the partials and finishes the channel (mean and variance and the normalisation's
// coefficients, or the backward's sums, the weight's gradient and the input gradient's
// coefficients). Shared by the batch norm kernels and the fused conv -> batch norm -> ReLU ->
// max-pool kernels, which fold in their own elements (the pooled gradient, gathered).

#include <ATen/cuda/DeviceUtils.cuh>
#include <optional>
#include <type_traits>

#include "../batch_norm_common.h"
#include "batch_norm_cuda.h"
#include "cuda_common.cuh"

namespace cifarnet::cuda {

constexpr int kWarp = 32;
constexpr int kRows = 8;  // rows of a channels-inner block: blockDim = (32 channels, kRows)

// Zeroed int32 counters (at least `count`) for the reduction kernels' last-block merges, on the
// current stream: every kernel leaves its counters at zero, so the workspace is zeroed once, when
// the stream first needs it (one fill), and kernels on one stream, which run in order, share it.
// Each stream has its own, since kernels on two streams may overlap. Under CUDA graph capture a
// fresh zeroed tensor of the graph's pool (a fill node in the graph), so that a graph owns its
// counters whichever stream replays it.
at::Tensor reduction_counters(int64_t count);

// Running mean and sum of squared deviations (Welford), mergeable across threads. (Plain
// members, no initialisers: these live in __shared__ arrays; `Welford{}` is the empty state.)
template <typename acc_t>
struct Welford {
  acc_t count, mean, m2;

  __device__ void add(acc_t x) {
    count += 1;
    const acc_t delta = x - mean;
    mean += delta / count;
    m2 += delta * (x - mean);
  }
  __device__ void merge(const Welford& other) {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const acc_t total = count + other.count;
    const acc_t delta = other.mean - mean;
    const acc_t other_share = other.count / total;
    mean += delta * other_share;
    // NB: count * share, not count * other.count / total: the product of two counts and a
    // squared difference overflows float where the variance itself does not (native's order).
    m2 += other.m2 + delta * delta * count * other_share;
    count = total;
  }
  __device__ Welford shfl_down(int offset) const {
    Welford other{};
    other.count = WARP_SHFL_DOWN(count, offset);
    other.mean = WARP_SHFL_DOWN(mean, offset);
    other.m2 = WARP_SHFL_DOWN(m2, offset);
    return other;
  }
  // Another block's partial, read from L2 (not through this SM's L1, which may hold none of it
  // but is not coherent with the writer's).
  __device__ static Welford load(const Welford* partial) {
    return {__ldcg(&partial->count), __ldcg(&partial->mean), __ldcg(&partial->m2)};
  }
};

// sum(g) and sum(g * (x - mean)).
template <typename acc_t>
struct GradSumState {
  acc_t g, gx;

  __device__ void merge(const GradSumState& other) {
    g += other.g;
    gx += other.gx;
  }
  __device__ GradSumState shfl_down(int offset) const {
    GradSumState other{};
    other.g = WARP_SHFL_DOWN(g, offset);
    other.gx = WARP_SHFL_DOWN(gx, offset);
    return other;
  }
  __device__ static GradSumState load(const GradSumState* partial) {
    return {__ldcg(&partial->g), __ldcg(&partial->gx)};
  }
};

// Merges `state` over a 1-D block; the result is valid in thread 0.
template <typename State>
__device__ State block_reduce(State state) {
  __shared__ State warp_states[kThreads / kWarp];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) state.merge(state.shfl_down(offset));
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < static_cast<int>(blockDim.x) / kWarp ? warp_states[lane] : State{};
    for (int offset = kWarp / 2; offset > 0; offset /= 2) state.merge(state.shfl_down(offset));
  }
  return state;
}

// Merges `state` over the rows (threadIdx.y) of a (32, kRows) block, in row order; valid where
// y == 0.
template <typename State>
__device__ State column_reduce(State state) {
  __shared__ State states[kRows][kWarp];
  states[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int row = 1; row < kRows; ++row) state.merge(states[row][threadIdx.x]);
  }
  return state;
}

// Whether this block is the last of the `blocks` that share `counter` to get here, each having
// written and fenced its partial states before: the last then sees them all. It sets the
// counter back to zero (every block has taken its ticket by then), so the next launch on the
// stream, or the next replay of a graph, starts from zero. Called by every thread of the block.
__device__ inline bool last_block_to_finish(unsigned int* counter, unsigned int blocks) {
  __shared__ bool last;
  __syncthreads();  // this block's partials are written and fenced
  if (threadIdx.x == 0 && threadIdx.y == 0) {
    last = atomicAdd(counter, 1u) == blocks - 1;
    if (last) {
      atomicExch(counter, 0u);
      __threadfence();  // the partials are read after the ticket
    }
  }
  __syncthreads();
  return last;
}

// 32 channels by a range of pixels of a channels-inner input per block, blockDim (32, kRows),
// grid (channel blocks, splits). add(state, at, p, c) folds in element `at` (pixel p, channel
// c); finish(c, state) takes a channel's whole state. The partials of split s are at
// partial[s * channels + c]; with one split the block finishes in place (no partials, no
// counter). The last block merges the partials in a fixed order (row r takes splits r, r + 8,
// ..., then the rows merge in order), whichever block it is: deterministic.
template <typename State, typename Add, typename Finish>
__global__ void reduce_channels_inner_kernel(DenseLayout layout, int64_t pixels_per_split, Add add,
                                             Finish finish, State* __restrict__ partial,
                                             unsigned int* __restrict__ counters) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kWarp) + threadIdx.x;
  const int64_t split = blockIdx.y, splits = gridDim.y;
  const bool in_range = c < layout.channels;
  const int64_t pixels = layout.batch * layout.spatial;
  const int64_t p0 = split * pixels_per_split, p1 = min(pixels, p0 + pixels_per_split);
  State state{};
  if (in_range) {
    for (int64_t p = p0 + threadIdx.y; p < p1; p += kRows)
      add(state, p * layout.channels + c, p, c);
  }
  state = column_reduce(state);
  if (splits > 1) {
    if (threadIdx.y == 0 && in_range) {
      partial[split * layout.channels + c] = state;
      __threadfence();
    }
    if (!last_block_to_finish(counters + blockIdx.x, gridDim.y)) return;
    state = State{};
    if (in_range) {
      for (int64_t s = threadIdx.y; s < splits; s += kRows) {
        state.merge(State::load(partial + s * layout.channels + c));
      }
    }
    state = column_reduce(state);
  }
  if (threadIdx.y == 0 && in_range) finish(c, state);
}

// One (channel, split) of a channels-outer input per block, grid (channels, splits): elements
// [split * per, ...) of the channel's batch * spatial, so a single sample of a large image
// still fills the GPU. Partials at partial[c * splits + s], merged by the last block in a fixed
// order (thread t takes splits t, t + 256, ..., then the block's tree); otherwise as above.
template <typename State, typename Add, typename Finish>
__global__ void reduce_channels_outer_kernel(DenseLayout layout, int64_t elements_per_split,
                                             Add add, Finish finish, State* __restrict__ partial,
                                             unsigned int* __restrict__ counters) {
  const int64_t c = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int64_t elements = layout.batch * layout.spatial;
  const int64_t i0 = split * elements_per_split, i1 = min(elements, i0 + elements_per_split);
  State state{};
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t n = i / layout.spatial, s = i - n * layout.spatial;
    add(state, (n * layout.channels + c) * layout.spatial + s, i, c);
  }
  state = block_reduce(state);
  if (splits > 1) {
    if (threadIdx.x == 0) {
      partial[c * splits + split] = state;
      __threadfence();
    }
    if (!last_block_to_finish(counters + blockIdx.x, gridDim.y)) return;
    state = State{};
    for (int64_t s = threadIdx.x; s < splits; s += blockDim.x) {
      state.merge(State::load(partial + c * splits + s));
    }
    state = block_reduce(state);
  }
  if (threadIdx.x == 0) finish(c, state);
}

// One launch that reduces a dense tensor of `layout` per channel (see the kernels): splits
// enough to fill the GPU. `like` gives the device.
template <typename State, typename Add, typename Finish>
void launch_channel_reduction(const at::Tensor& like, const DenseLayout& layout, Add add,
                              Finish finish) {
  if (layout.channels == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 4;
  const int64_t pixels = layout.batch * layout.spatial;
  int64_t columns, splits, per_split;
  if (layout.channels_inner) {
    columns = (layout.channels + kWarp - 1) / kWarp;
    splits = std::clamp<int64_t>(target_blocks / columns, 1,
                                 std::max<int64_t>(1, (pixels + kRows - 1) / kRows));
    splits = std::min<int64_t>(splits, 65535);
    per_split = (pixels + splits - 1) / splits;
  } else {
    const int64_t elements = std::max<int64_t>(1, pixels);
    columns = layout.channels;
    splits = std::clamp<int64_t>(target_blocks / columns, 1, (elements + kThreads - 1) / kThreads);
    splits = std::min<int64_t>(splits, 65535);
    per_split = (elements + splits - 1) / splits;
    splits = (elements + per_split - 1) / per_split;
  }
  // NB: both live until the launch is queued; the caching allocator reuses their memory only in
  // this stream's order, after the kernel.
  at::Tensor partial, counters;
  if (splits > 1) {
    partial = at::empty({layout.channels * splits * static_cast<int64_t>(sizeof(State))},
                        like.options().dtype(at::kByte));
    counters = reduction_counters(columns);
  }
  State* partial_data = splits > 1 ? static_cast<State*>(partial.mutable_data_ptr()) : nullptr;
  unsigned int* counter_data =
      splits > 1 ? static_cast<unsigned int*>(counters.mutable_data_ptr()) : nullptr;
  if (layout.channels_inner) {
    reduce_channels_inner_kernel<State, Add, Finish>
        <<<dim3(columns, splits), dim3(kWarp, kRows), 0, stream>>>(layout, per_split, add, finish,
                                                                   partial_data, counter_data);
  } else {
    reduce_channels_outer_kernel<State, Add, Finish>
        <<<dim3(columns, splits), kThreads, 0, stream>>>(layout, per_split, add, finish,
                                                         partial_data, counter_data);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A per-channel tensor read on the device in acc_t: stored as scalar_t, or as acc_t (a float32
// parameter of 16-bit data, the statistics), or absent (a constant).
template <typename scalar_t, typename acc_t>
struct ChannelReader {
  const void* data;
  bool is_acc;
  acc_t absent;

  __device__ acc_t operator[](int64_t c) const {
    if (data == nullptr) return absent;
    return is_acc ? static_cast<const acc_t*>(data)[c]
                  : static_cast<acc_t>(static_cast<const scalar_t*>(data)[c]);
  }
};

// Reads `t` (absent: `absent`) in place where it is dense and of scalar_t or acc_t; anything
// else is converted first into `storage`, which must live until the launch is queued.
template <typename scalar_t, typename acc_t>
ChannelReader<scalar_t, acc_t> channel_reader(const std::optional<at::Tensor>& t, acc_t absent,
                                              at::Tensor& storage) {
  if (!defined(t)) return {nullptr, true, absent};
  constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  constexpr at::ScalarType scalar_type = c10::CppTypeToScalarType<scalar_t>::value;
  const at::ScalarType type = t->scalar_type();
  storage =
      type == acc_type || type == scalar_type ? t->contiguous() : t->to(acc_type).contiguous();
  return {storage.const_data_ptr(), storage.scalar_type() == acc_type, absent};
}

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_std(acc_t var, acc_t eps) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return rsqrtf(var + eps);
  } else {
    return rsqrt(var + eps);
  }
}

// The input gradient's coefficients of a channel: dx = k ((x - mean) slope + offset + g) in
// training, k g in evaluation (slope = offset = 0), from the channel's sums over the batch's
// count values (inv_count = 1 / count).
template <typename acc_t>
__device__ __forceinline__ void input_grad_coefficients(acc_t invstd, acc_t weight, acc_t sum_g,
                                                        acc_t sum_gx, acc_t inv_count,
                                                        bool training, acc_t* k, acc_t* slope,
                                                        acc_t* offset, int64_t c) {
  k[c] = weight * invstd;
  slope[c] = training ? -(invstd * invstd * sum_gx) * inv_count : acc_t(0);
  offset[c] = training ? -sum_g * inv_count : acc_t(0);
}

// Finishes a channel of the backward reduction: its sums and, with the input gradient's
// arguments (k != nullptr), the weight's gradient sum_gx * invstd and the input gradient's
// coefficients.
template <typename scalar_t, typename acc_t>
struct FinishGradSums {
  acc_t *sum_g, *sum_gx, *grad_weight, *k, *slope, *offset;
  ChannelReader<scalar_t, acc_t> var, weight;
  acc_t eps, inv_count;
  bool training;

  __device__ void operator()(int64_t c, const GradSumState<acc_t>& state) const {
    sum_g[c] = state.g;
    sum_gx[c] = state.gx;
    if (k == nullptr) return;
    const acc_t invstd = inverse_std(var[c], eps);
    grad_weight[c] = state.gx * invstd;
    input_grad_coefficients(invstd, weight[c], state.g, state.gx, inv_count, training, k, slope,
                            offset, c);
  }
};

// The backward reduction of a dense tensor of `layout` in one launch, add folding in each
// element's sum(g) and sum(g * (x - mean)) (see GradReduction). `like` gives the device and
// the input dtype.
template <typename scalar_t, typename Add>
GradReduction grad_reduction(const at::Tensor& like, const DenseLayout& layout, Add add,
                             const InputGradArgs* args) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const auto options = like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t channels = layout.channels;
  GradReduction reduction;
  reduction.sum_g = at::empty({channels}, options);
  reduction.sum_gx = at::empty({channels}, options);
  FinishGradSums<scalar_t, acc_t> finish{};
  finish.sum_g = reduction.sum_g.mutable_data_ptr<acc_t>();
  finish.sum_gx = reduction.sum_gx.mutable_data_ptr<acc_t>();
  at::Tensor var_storage, weight_storage;
  if (args != nullptr) {
    reduction.grad_weight = at::empty({channels}, options);
    reduction.coefficients = at::empty({3, channels}, options);
    finish.grad_weight = reduction.grad_weight.mutable_data_ptr<acc_t>();
    finish.k = reduction.coefficients.mutable_data_ptr<acc_t>();
    finish.slope = finish.k + channels;
    finish.offset = finish.k + 2 * channels;
    finish.var = channel_reader<scalar_t, acc_t>(args->var, acc_t(1), var_storage);
    finish.weight = channel_reader<scalar_t, acc_t>(args->weight, acc_t(1), weight_storage);
    finish.eps = static_cast<acc_t>(args->eps);
    finish.inv_count = acc_t(1) / static_cast<acc_t>(args->count);
    finish.training = args->training;
  }
  launch_channel_reduction<GradSumState<acc_t>>(like, layout, add, finish);
  return reduction;
}

}  // namespace cifarnet::cuda
