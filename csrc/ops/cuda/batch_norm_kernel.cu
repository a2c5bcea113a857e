// CUDA kernels of batch norm: one-pass Welford statistics (per-channel two-stage block
// reductions), the backward's per-channel sums, and the elementwise normalisation and input
// gradient. Accumulation in float32 (float64 for float64 inputs); float16 and bfloat16 read
// and write in their own dtype.

#include <ATen/cuda/DeviceUtils.cuh>
#include <torch/library.h>

#include "../batch_norm_common.h"
#include "batch_norm_cuda.h"
#include "cuda_common.cuh"

namespace cifarnet::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kRows = 8;  // rows of a channels-inner block: blockDim = (32 channels, kRows)

// Running mean and sum of squared deviations (Welford), mergeable across threads. (Plain
// members, no initialisers: these live in __shared__ arrays; `State{}` is the empty state.)
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
    mean += delta * other.count / total;
    m2 += other.m2 + delta * delta * count * other.count / total;
    count = total;
  }
  __device__ Welford shfl_down(int offset) const {
    Welford other{};
    other.count = WARP_SHFL_DOWN(count, offset);
    other.mean = WARP_SHFL_DOWN(mean, offset);
    other.m2 = WARP_SHFL_DOWN(m2, offset);
    return other;
  }
};

// sum(g) and sum(g * (x - mean)).
template <typename acc_t>
struct GradSums {
  acc_t g, gx;

  __device__ void merge(const GradSums& other) {
    g += other.g;
    gx += other.gx;
  }
  __device__ GradSums shfl_down(int offset) const {
    GradSums other{};
    other.g = WARP_SHFL_DOWN(g, offset);
    other.gx = WARP_SHFL_DOWN(gx, offset);
    return other;
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

// Merges `state` over the rows (threadIdx.y) of a (32, kRows) block; valid where y == 0.
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

// One (channel, split) of a channels-outer input per block: elements [split * per, ...) of the
// channel's batch * spatial, so a single sample of a large image still fills the GPU.
// Policy::add(state, x, g, c) folds one element in.
template <typename scalar_t, typename State, typename Add>
__global__ void reduce_channels_outer(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                      DenseLayout layout, int64_t elements_per_split, Add add,
                                      State* __restrict__ partial) {
  const int64_t c = blockIdx.x, split = blockIdx.y;
  const int64_t elements = layout.batch * layout.spatial;
  const int64_t i0 = split * elements_per_split, i1 = min(elements, i0 + elements_per_split);
  State state{};
  for (int64_t i = i0 + threadIdx.x; i < i1; i += blockDim.x) {
    const int64_t n = i / layout.spatial, s = i - n * layout.spatial;
    const int64_t at = (n * layout.channels + c) * layout.spatial + s;
    add(state, x[at], g == nullptr ? scalar_t(0) : g[at], c);
  }
  state = block_reduce(state);
  if (threadIdx.x == 0) partial[c * gridDim.y + split] = state;
}

// 32 channels by a range of pixels of a channels-inner input per block.
template <typename scalar_t, typename State, typename Add>
__global__ void reduce_channels_inner(const scalar_t* __restrict__ x, const scalar_t* __restrict__ g,
                                      DenseLayout layout, int64_t pixels_per_split, Add add,
                                      State* __restrict__ partial) {
  const int64_t c = blockIdx.x * kWarp + threadIdx.x, split = blockIdx.y;
  const int64_t pixels = layout.batch * layout.spatial;
  const int64_t p0 = split * pixels_per_split, p1 = min(pixels, p0 + pixels_per_split);
  State state{};
  if (c < layout.channels) {
    for (int64_t p = p0 + threadIdx.y; p < p1; p += kRows) {
      const int64_t at = p * layout.channels + c;
      add(state, x[at], g == nullptr ? scalar_t(0) : g[at], c);
    }
  }
  state = column_reduce(state);
  if (threadIdx.y == 0 && c < layout.channels) partial[c * gridDim.y + split] = state;
}

// Merges the splits of each channel.
template <typename State>
__global__ void merge_splits(const State* __restrict__ partial, int64_t channels, int64_t splits,
                             State* __restrict__ merged) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    State state{};
    for (int64_t s = 0; s < splits; ++s) state.merge(partial[c * splits + s]);
    merged[c] = state;
  }
}

// Per-channel states of a whole dense tensor: splits enough to fill the GPU, then a merge.
template <typename scalar_t, typename State, typename Add>
at::Tensor reduce_per_channel(const at::Tensor& x, const scalar_t* g, const DenseLayout& layout,
                              Add add) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = at::cuda::getCurrentDeviceProperties()->multiProcessorCount * 4;
  const auto bytes = at::TensorOptions().dtype(at::kByte).device(x.device());
  int64_t splits;
  at::Tensor partial;
  if (layout.channels_inner) {
    const int64_t channel_blocks = (layout.channels + kWarp - 1) / kWarp;
    const int64_t pixels = layout.batch * layout.spatial;
    splits = std::clamp<int64_t>(target_blocks / channel_blocks, 1,
                                 std::max<int64_t>(1, (pixels + kRows - 1) / kRows));
    splits = std::min<int64_t>(splits, 65535);
    const int64_t per_split = (pixels + splits - 1) / splits;
    partial = at::empty({layout.channels * splits * static_cast<int64_t>(sizeof(State))}, bytes);
    reduce_channels_inner<scalar_t, State, Add>
        <<<dim3(channel_blocks, splits), dim3(kWarp, kRows), 0, stream>>>(
            x.const_data_ptr<scalar_t>(), g, layout, per_split, add,
            reinterpret_cast<State*>(partial.mutable_data_ptr()));
  } else {
    const int64_t elements = std::max<int64_t>(1, layout.batch * layout.spatial);
    splits = std::clamp<int64_t>(target_blocks / layout.channels, 1,
                                 (elements + kThreads - 1) / kThreads);
    splits = std::min<int64_t>(splits, 65535);
    const int64_t per_split = (elements + splits - 1) / splits;
    splits = (elements + per_split - 1) / per_split;
    partial = at::empty({layout.channels * splits * static_cast<int64_t>(sizeof(State))}, bytes);
    reduce_channels_outer<scalar_t, State, Add>
        <<<dim3(layout.channels, splits), kThreads, 0, stream>>>(
            x.const_data_ptr<scalar_t>(), g, layout, per_split, add,
            reinterpret_cast<State*>(partial.mutable_data_ptr()));
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor merged =
      at::empty({layout.channels * static_cast<int64_t>(sizeof(State))}, bytes);
  merge_splits<State><<<blocks_for(layout.channels), kThreads, 0, stream>>>(
      reinterpret_cast<const State*>(partial.const_data_ptr()), layout.channels, splits,
      reinterpret_cast<State*>(merged.mutable_data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return merged;
}

template <typename acc_t>
struct AddWelford {
  template <typename scalar_t>
  __device__ void operator()(Welford<acc_t>& state, scalar_t x, scalar_t, int64_t) const {
    state.add(static_cast<acc_t>(x));
  }
};

template <typename acc_t>
struct AddGradSums {
  const acc_t* mean;
  template <typename scalar_t>
  __device__ void operator()(GradSums<acc_t>& state, scalar_t x, scalar_t g, int64_t c) const {
    const acc_t grad = static_cast<acc_t>(g);
    state.g += grad;
    state.gx += grad * (static_cast<acc_t>(x) - mean[c]);
  }
};

template <typename acc_t>
__global__ void split_welford(const Welford<acc_t>* __restrict__ states, int64_t channels,
                              acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    mean[c] = states[c].mean;
    var[c] = states[c].count > 0 ? states[c].m2 / states[c].count : acc_t(0);
  }
}

template <typename acc_t>
__global__ void split_grad_sums(const GradSums<acc_t>* __restrict__ states, int64_t channels,
                                acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    sum_g[c] = states[c].g;
    sum_gx[c] = states[c].gx;
  }
}

__device__ __forceinline__ int64_t channel_of(int64_t index, const DenseLayout& layout) {
  return layout.channels_inner ? index % layout.channels
                               : (index / layout.spatial) % layout.channels;
}

// out = (x - mean[c]) * scale[c] + shift[c].
template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                                 const acc_t* __restrict__ shift, DenseLayout layout,
                                 int64_t total) {
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const int64_t c = channel_of(index, layout);
    out[index] = static_cast<scalar_t>((static_cast<acc_t>(x[index]) - mean[c]) * scale[c] + shift[c]);
  }
}

// out = ((x - mean[c]) * slope[c] + offset[c] + g) * k[c].
template <typename scalar_t, typename acc_t>
__global__ void input_grad_kernel(scalar_t* out, const scalar_t* g, const scalar_t* __restrict__ x,
                                  const acc_t* __restrict__ mean, const acc_t* __restrict__ slope,
                                  const acc_t* __restrict__ offset, const acc_t* __restrict__ k,
                                  DenseLayout layout, int64_t total) {
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const int64_t c = channel_of(index, layout);
    const acc_t value = (static_cast<acc_t>(x[index]) - mean[c]) * slope[c] + offset[c] +
                        static_cast<acc_t>(g[index]);
    out[index] = static_cast<scalar_t>(value * k[c]);
  }
}

at::ScalarType acc_dtype(const at::Tensor& t) {
  return at::toAccumulateType(t.scalar_type(), at::kCUDA);
}

// A per-channel tensor in the accumulation dtype (a constant where it is absent).
at::Tensor channel_tensor(const std::optional<at::Tensor>& t, const at::Tensor& like,
                          int64_t channels, double fallback) {
  const auto options = like.options().dtype(acc_dtype(like));
  return defined(t) ? t->detach().to(options).contiguous() : at::full({channels}, fallback, options);
}

}  // namespace

DenseLayout dense_layout_of(const at::Tensor& dense, at::MemoryFormat format) {
  const int64_t batch = dense.size(0), channels = dense.size(1);
  const int64_t spatial = batch * channels == 0 ? 0 : dense.numel() / (batch * channels);
  return {batch_norm_channels_inner(dense, format), batch, channels, spatial};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_statistics(const at::Tensor& dense,
                                                         const DenseLayout& layout) {
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(),
                                  "batch_norm_statistics_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const at::Tensor states = reduce_per_channel<scalar_t, Welford<acc_t>>(
        dense, nullptr, layout, AddWelford<acc_t>{});
    const auto options = dense.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    mean = at::empty({layout.channels}, options);
    var = at::empty({layout.channels}, options);
    split_welford<acc_t><<<blocks_for(layout.channels), kThreads, 0,
                           at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const Welford<acc_t>*>(states.const_data_ptr()), layout.channels,
        mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_grad_sums(const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& mean,
                                                        const DenseLayout& layout) {
  at::Tensor sum_g, sum_gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_grad_sums_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const at::Tensor states = reduce_per_channel<scalar_t, GradSums<acc_t>>(
        x, g.const_data_ptr<scalar_t>(), layout, AddGradSums<acc_t>{mean.const_data_ptr<acc_t>()});
    sum_g = at::empty_like(mean);
    sum_gx = at::empty_like(mean);
    split_grad_sums<acc_t><<<blocks_for(layout.channels), kThreads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const GradSums<acc_t>*>(states.const_data_ptr()), layout.channels,
        sum_g.mutable_data_ptr<acc_t>(), sum_gx.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sum_g, sum_gx};
}

void batch_norm_normalize(at::Tensor& out, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const DenseLayout& layout) {
  // The per-channel affine map, in the accumulation dtype (a handful of elements).
  const at::Tensor scale = channel_tensor(weight, x, layout.channels, 1.0) * at::rsqrt(var + eps);
  const at::Tensor shift = channel_tensor(bias, x, layout.channels, 0.0);
  const int64_t total = x.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_normalize_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    normalize_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0,
                                        at::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
        shift.const_data_ptr<acc_t>(), layout, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void batch_norm_input_grad(at::Tensor& out, const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& var,
                           const std::optional<at::Tensor>& weight, const at::Tensor& sum_g,
                           const at::Tensor& sum_gx, double eps, int64_t count,
                           const DenseLayout& layout) {
  const double m = static_cast<double>(count);
  const at::Tensor invstd = at::rsqrt(var + eps);
  const at::Tensor k = channel_tensor(weight, x, layout.channels, 1.0) * invstd;
  const at::Tensor slope = -(invstd * invstd * sum_gx) / m;
  const at::Tensor offset = -sum_g / m;
  const int64_t total = x.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_input_grad_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    input_grad_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0,
                                         at::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
        x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
        slope.const_data_ptr<acc_t>(), offset.const_data_ptr<acc_t>(), k.const_data_ptr<acc_t>(),
        layout, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> batch_norm_affine_grads(const at::Tensor& sum_g,
                                                           const at::Tensor& sum_gx,
                                                           const at::Tensor& var, double eps) {
  return {sum_gx * at::rsqrt(var + eps), sum_g};
}

}  // namespace cifarnet::cuda

namespace cifarnet::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double eps) {
  check_batch_norm_forward_args(input, mean, var, weight, bias, training, eps);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = batch_norm_output_memory_format(input);
  const at::Tensor dense = input.contiguous(format);
  const cuda::DenseLayout layout = cuda::dense_layout_of(dense, format);
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  at::Tensor save_mean, save_var;
  if (training) {
    std::tie(save_mean, save_var) = cuda::batch_norm_statistics(dense, layout);
  } else {
    save_mean = mean->detach().to(stats_options, /*non_blocking=*/false, /*copy=*/true);
    save_var = var->detach().to(stats_options, /*non_blocking=*/false, /*copy=*/true);
  }
  at::Tensor output = at::empty(input.sizes(), input.options().memory_format(format));
  cuda::batch_norm_normalize(output, dense, save_mean, save_var, weight, bias, eps, layout);
  return {output, save_mean, save_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& save_mean,
    const at::Tensor& save_var, const std::optional<at::Tensor>& weight, bool training, double eps,
    std::array<bool, 3> output_mask) {
  check_batch_norm_input(input, /*training=*/false);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have the input's shape ",
              shape_string(input), ", got ", shape_string(grad_output));
  check_per_channel(save_mean, "save_mean", input);
  check_per_channel(save_var, "save_var", input);
  check_per_channel(weight, "weight", input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = batch_norm_grad_input_memory_format(input, grad_output);
  const at::Tensor x = input.contiguous(format), g = grad_output.contiguous(format);
  const cuda::DenseLayout layout = cuda::dense_layout_of(x, format);
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  const at::Tensor mean = save_mean.to(stats_options).contiguous();
  const at::Tensor var = save_var.to(stats_options).contiguous();
  at::Tensor sum_g = at::zeros_like(mean), sum_gx = at::zeros_like(mean);
  if ((training || output_mask[1] || output_mask[2]) && x.numel() > 0) {
    std::tie(sum_g, sum_gx) = cuda::batch_norm_grad_sums(g, x, mean, layout);
  }
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    if (training) {
      cuda::batch_norm_input_grad(grad_input, g, x, mean, var, weight, sum_g, sum_gx, eps,
                                  layout.batch * layout.spatial, layout);
    } else {
      // dx = k g: the normalisation of g with mean 0, scale k = weight * invstd, shift 0.
      cuda::batch_norm_normalize(grad_input, g, at::zeros_like(mean), var, weight, std::nullopt,
                                 eps, layout);
    }
  }
  std::tie(grad_weight, grad_bias) = cuda::batch_norm_affine_grads(sum_g, sum_gx, var, eps);
  if (!output_mask[1]) grad_weight = at::Tensor();
  if (!output_mask[2]) grad_bias = at::Tensor();
  return {grad_input, grad_weight, grad_bias};
}

// The phase ops of synchronized batch norm (see ../batch_norm.cpp).

// An input and a gradient in one dense layout: the forward's output layout without a
// gradient, the input gradient's with one.
struct DenseBatchNormInputs {
  at::Tensor x, g;
  at::MemoryFormat format;
  cuda::DenseLayout layout;
  DenseBatchNormInputs(const at::Tensor& input, const at::Tensor& grad_output) {
    format = grad_output.defined() ? batch_norm_grad_input_memory_format(input, grad_output)
                                   : batch_norm_output_memory_format(input);
    x = input.contiguous(format);
    if (grad_output.defined()) g = grad_output.contiguous(format);
    layout = cuda::dense_layout_of(x, format);
  }
};

at::Tensor stats_dtype_tensor(const at::Tensor& t, const at::Tensor& input) {
  return t.to(input.options().dtype(batch_norm_stats_dtype(input))).contiguous();
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_batch_norm_input(input, /*training=*/false);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const DenseBatchNormInputs in(input, at::Tensor());
  if (in.x.numel() == 0) {
    const auto options = input.options().dtype(batch_norm_stats_dtype(input));
    return {at::zeros({input.size(1)}, options), at::zeros({input.size(1)}, options)};
  }
  return cuda::batch_norm_statistics(in.x, in.layout);
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_output,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& mean) {
  check_batch_norm_input(input, /*training=*/false);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have the input's shape ",
              shape_string(input), ", got ", shape_string(grad_output));
  check_per_channel(mean, "mean", input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const DenseBatchNormInputs in(input, grad_output);
  const at::Tensor mean_acc = stats_dtype_tensor(mean, input);
  if (in.x.numel() == 0) return {at::zeros_like(mean_acc), at::zeros_like(mean_acc)};
  return cuda::batch_norm_grad_sums(in.g, in.x, mean_acc, in.layout);
}

at::Tensor batch_norm_backward_elementwise_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu, int64_t count, double eps) {
  check_batch_norm_input(input, /*training=*/false);
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have the input's shape ",
              shape_string(input), ", got ", shape_string(grad_output));
  check_per_channel(mean, "mean", input);
  check_per_channel(var, "var", input);
  check_per_channel(weight, "weight", input);
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  check_backward_sums(sum_dy, sum_dy_xmu, count, input.size(1),
                      batch_norm_count(input).expect_int());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const DenseBatchNormInputs in(input, grad_output);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(in.format));
  cuda::batch_norm_input_grad(grad_input, in.g, in.x, stats_dtype_tensor(mean, input),
                              stats_dtype_tensor(var, input), weight,
                              stats_dtype_tensor(sum_dy, input),
                              stats_dtype_tensor(sum_dy_xmu, input), eps, count, in.layout);
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("_batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("_batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("_batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("_batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("_batch_norm_backward_elementwise", &batch_norm_backward_elementwise_cuda);
}

}  // namespace cifarnet::ops
