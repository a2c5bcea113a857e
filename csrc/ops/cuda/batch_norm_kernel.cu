// CUDA kernels of batch norm. Training forward: one launch for the statistics (Welford, per
// block, merged by the last block, which also computes the normalisation's scale and shift),
// one for the normalisation; evaluation: one launch for the scale and shift, one for the
// normalisation. Backward: one launch for the two sums (and the weight's gradient and the input
// gradient's coefficients), one for the input gradient. Running statistics: one launch. A ReLU
// after the batch norm fuses into the normalisation's store and, through its output, into both
// backward launches.
// Accumulation in float32 (float64 for float64 inputs); float16 and bfloat16 read and write in
// their own dtype.

#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

#include "../batch_norm_common.h"
#include "batch_norm_cuda.h"
#include "batch_norm_reduce.cuh"
#include "cuda_common.cuh"

namespace cifarnet::cuda {

at::Tensor reduction_counters(int64_t count) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto options = at::TensorOptions().dtype(at::kInt).device(at::kCUDA, stream.device_index());
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return at::zeros({count}, options);
  }
  // NB: never destroyed: CUDA tensors must not be freed after the CUDA runtime is torn down.
  static auto* workspaces = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor>();
  static std::mutex mutex;
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counters = (*workspaces)[{stream.device_index(), stream.id()}];
  if (!counters.defined() || counters.numel() < count) {
    // The old workspace (if any) was allocated on this stream, which frees it in order.
    counters = at::zeros({std::max<int64_t>(1024, count)}, options);
  }
  return counters;
}

namespace {

// Folds x into a Welford state.
template <typename scalar_t, typename acc_t>
struct AddWelford {
  const scalar_t* x;

  __device__ void operator()(Welford<acc_t>& state, int64_t at, int64_t, int64_t) const {
    state.add(static_cast<acc_t>(x[at]));
  }
};

// g taken through a ReLU whose output is relu_output (where not null), threshold_backward's
// rule: g where relu_output > 0 or is NaN, else 0.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t relu_grad(acc_t g, const scalar_t* relu_output, int64_t at) {
  return relu_output != nullptr && static_cast<acc_t>(relu_output[at]) <= acc_t(0) ? acc_t(0) : g;
}

// Folds g and g * (x - mean) into a state of sums (g through the ReLU whose output is
// relu_output, where not null).
template <typename scalar_t, typename acc_t>
struct AddGradSums {
  const scalar_t* x;
  const scalar_t* g;
  const acc_t* mean;
  const scalar_t* relu_output = nullptr;

  __device__ void operator()(GradSumState<acc_t>& state, int64_t at, int64_t, int64_t c) const {
    const acc_t grad = relu_grad(static_cast<acc_t>(g[at]), relu_output, at);
    state.g += grad;
    state.gx += grad * (static_cast<acc_t>(x[at]) - mean[c]);
  }
};

// The normalisation's scale and shift of a channel, into affine = [scale; shift].
template <typename acc_t>
__device__ __forceinline__ void affine_coefficients(acc_t var, acc_t weight, acc_t bias, acc_t eps,
                                                    acc_t* affine, int64_t channels, int64_t c) {
  affine[c] = weight * inverse_std(var, eps);
  affine[channels + c] = bias;
}

// Finishes a channel of the statistics: mean and biased variance and, given an affine buffer,
// the normalisation's scale and shift.
template <typename scalar_t, typename acc_t>
struct FinishStatistics {
  acc_t *mean, *var, *affine;
  ChannelReader<scalar_t, acc_t> weight, bias;
  acc_t eps;
  int64_t channels;

  __device__ void operator()(int64_t c, const Welford<acc_t>& state) const {
    const acc_t biased_var = state.count > 0 ? state.m2 / state.count : acc_t(0);
    mean[c] = state.mean;
    var[c] = biased_var;
    if (affine != nullptr)
      affine_coefficients(biased_var, weight[c], bias[c], eps, affine, channels, c);
  }
};

// One thread per channel: copies of given statistics in acc_t and the normalisation's scale and
// shift.
template <typename scalar_t, typename acc_t>
__global__ void normalization_kernel(ChannelReader<scalar_t, acc_t> mean_in,
                                     ChannelReader<scalar_t, acc_t> var_in,
                                     ChannelReader<scalar_t, acc_t> weight,
                                     ChannelReader<scalar_t, acc_t> bias, acc_t eps,
                                     int64_t channels, acc_t* __restrict__ mean,
                                     acc_t* __restrict__ var, acc_t* __restrict__ affine) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    mean[c] = mean_in[c];
    var[c] = var_in[c];
    affine_coefficients(var[c], weight[c], bias[c], eps, affine, channels, c);
  }
}

// One thread per channel: the input gradient's coefficients from given sums (or, in
// evaluation, none), into coefficients = [k; slope; offset].
template <typename scalar_t, typename acc_t>
__global__ void grad_coefficients_kernel(ChannelReader<scalar_t, acc_t> var,
                                         ChannelReader<scalar_t, acc_t> weight,
                                         ChannelReader<scalar_t, acc_t> sum_g,
                                         ChannelReader<scalar_t, acc_t> sum_gx, acc_t eps,
                                         acc_t inv_count, bool training, int64_t channels,
                                         acc_t* __restrict__ coefficients) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    input_grad_coefficients(inverse_std(var[c], eps), weight[c], sum_g[c], sum_gx[c], inv_count,
                            training, coefficients, coefficients + channels,
                            coefficients + 2 * channels, c);
  }
}

__device__ __forceinline__ int64_t channel_of(int64_t index, const DenseLayout& layout) {
  return layout.channels_inner ? index % layout.channels
                               : (index / layout.spatial) % layout.channels;
}

// out = (x - mean[c]) * scale[c] + shift[c], with `relu` rectified after rounding to scalar_t
// as torch.relu rectifies native's output (negatives to 0; -0 and NaN pass), one thread per
// element in memory order.
template <typename scalar_t, typename acc_t, bool relu>
__global__ void normalize_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                 const acc_t* __restrict__ mean, const acc_t* __restrict__ affine,
                                 DenseLayout layout, int64_t total) {
  const acc_t* __restrict__ scale = affine;
  const acc_t* __restrict__ shift = affine + layout.channels;
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const int64_t c = channel_of(index, layout);
    const scalar_t y =
        static_cast<scalar_t>((static_cast<acc_t>(x[index]) - mean[c]) * scale[c] + shift[c]);
    out[index] = relu && static_cast<acc_t>(y) < acc_t(0) ? static_cast<scalar_t>(acc_t(0)) : y;
  }
}

// out = ((x - mean[c]) * slope[c] + offset[c] + g) * k[c] (training) or g * k[c], g through
// the ReLU whose output is relu_output (where not null), one thread per element in memory
// order; out may be g.
template <typename scalar_t, typename acc_t, bool training>
__global__ void input_grad_kernel(scalar_t* out, const scalar_t* g, const scalar_t* __restrict__ x,
                                  const acc_t* __restrict__ mean,
                                  const acc_t* __restrict__ coefficients,
                                  const scalar_t* relu_output, DenseLayout layout, int64_t total) {
  const acc_t* __restrict__ k = coefficients;
  const acc_t* __restrict__ slope = coefficients + layout.channels;
  const acc_t* __restrict__ offset = coefficients + 2 * layout.channels;
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const int64_t c = channel_of(index, layout);
    acc_t value = relu_grad(static_cast<acc_t>(g[index]), relu_output, index);
    if (training) value += (static_cast<acc_t>(x[index]) - mean[c]) * slope[c] + offset[c];
    out[index] = static_cast<scalar_t>(value * k[c]);
  }
}

// One running statistic, blended in place: running = (1 - momentum) running + momentum * factor
// * batch, in float64 as the CPU kernel blends.
template <typename running_t>
struct RunningBlend {
  running_t* running;
  int64_t stride;
  ChannelReader<float, double> batch;
  double factor;

  __device__ void operator()(int64_t c, double momentum) const {
    running_t& value = running[c * stride];
    value = static_cast<running_t>((1 - momentum) * static_cast<double>(value) +
                                   momentum * factor * batch[c]);
  }
};

// One thread per channel: both running statistics (the second may be absent).
template <typename running_t>
__global__ void update_running_stats_kernel(RunningBlend<running_t> mean,
                                            RunningBlend<running_t> var, double momentum,
                                            int64_t channels) {
  CIFARNET_GRID_STRIDE_LOOP(c, channels) {
    mean(c, momentum);
    if (var.running != nullptr) var(c, momentum);
  }
}

template <typename acc_t>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
}

}  // namespace

DenseLayout dense_layout_of(const at::Tensor& dense, at::MemoryFormat format) {
  const int64_t batch = dense.size(0), channels = dense.size(1);
  const int64_t spatial = batch * channels == 0 ? 0 : dense.numel() / (batch * channels);
  return {batch_norm_channels_inner(dense, format), batch, channels, spatial};
}

Normalization batch_norm_statistics(const at::Tensor& dense, const DenseLayout& layout) {
  Normalization normalization;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(),
                                  "batch_norm_statistics_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    normalization.mean = at::empty({layout.channels}, acc_options<acc_t>(dense));
    normalization.var = at::empty({layout.channels}, acc_options<acc_t>(dense));
    FinishStatistics<scalar_t, acc_t> finish{};
    finish.mean = normalization.mean.mutable_data_ptr<acc_t>();
    finish.var = normalization.var.mutable_data_ptr<acc_t>();
    launch_channel_reduction<Welford<acc_t>>(
        dense, layout, AddWelford<scalar_t, acc_t>{dense.const_data_ptr<scalar_t>()}, finish);
  });
  return normalization;
}

Normalization batch_norm_statistics(const at::Tensor& dense, const DenseLayout& layout,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, double eps) {
  Normalization normalization;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dense.scalar_type(), "batch_norm_statistics_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const int64_t channels = layout.channels;
        normalization.mean = at::empty({channels}, acc_options<acc_t>(dense));
        normalization.var = at::empty({channels}, acc_options<acc_t>(dense));
        normalization.affine = at::empty({2, channels}, acc_options<acc_t>(dense));
        at::Tensor weight_storage, bias_storage;
        FinishStatistics<scalar_t, acc_t> finish{};
        finish.mean = normalization.mean.mutable_data_ptr<acc_t>();
        finish.var = normalization.var.mutable_data_ptr<acc_t>();
        finish.affine = normalization.affine.mutable_data_ptr<acc_t>();
        finish.weight = channel_reader<scalar_t, acc_t>(weight, acc_t(1), weight_storage);
        finish.bias = channel_reader<scalar_t, acc_t>(bias, acc_t(0), bias_storage);
        finish.eps = static_cast<acc_t>(eps);
        finish.channels = channels;
        launch_channel_reduction<Welford<acc_t>>(
            dense, layout, AddWelford<scalar_t, acc_t>{dense.const_data_ptr<scalar_t>()}, finish);
      });
  return normalization;
}

Normalization batch_norm_normalization(const at::Tensor& like, const at::Tensor& mean,
                                       const at::Tensor& var,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  Normalization normalization;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, like.scalar_type(), "batch_norm_normalization_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const int64_t channels = mean.numel();
        normalization.mean = at::empty({channels}, acc_options<acc_t>(like));
        normalization.var = at::empty({channels}, acc_options<acc_t>(like));
        normalization.affine = at::empty({2, channels}, acc_options<acc_t>(like));
        if (channels == 0) return;
        at::Tensor mean_storage, var_storage, weight_storage, bias_storage;
        normalization_kernel<scalar_t, acc_t>
            <<<blocks_for(channels), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                channel_reader<scalar_t, acc_t>(mean, acc_t(0), mean_storage),
                channel_reader<scalar_t, acc_t>(var, acc_t(1), var_storage),
                channel_reader<scalar_t, acc_t>(weight, acc_t(1), weight_storage),
                channel_reader<scalar_t, acc_t>(bias, acc_t(0), bias_storage),
                static_cast<acc_t>(eps), channels, normalization.mean.mutable_data_ptr<acc_t>(),
                normalization.var.mutable_data_ptr<acc_t>(),
                normalization.affine.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return normalization;
}

void batch_norm_normalize(at::Tensor& out, const at::Tensor& x, const Normalization& normalization,
                          const DenseLayout& layout, bool relu) {
  const int64_t total = x.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_normalize_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const auto stream = at::cuda::getCurrentCUDAStream();
        scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
        const scalar_t* x_data = x.const_data_ptr<scalar_t>();
        const acc_t* mean = normalization.mean.const_data_ptr<acc_t>();
        const acc_t* affine = normalization.affine.const_data_ptr<acc_t>();
        if (relu) {
          normalize_kernel<scalar_t, acc_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
              out_data, x_data, mean, affine, layout, total);
        } else {
          normalize_kernel<scalar_t, acc_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
              out_data, x_data, mean, affine, layout, total);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

GradReduction batch_norm_grad_sums(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                                   const DenseLayout& layout, const InputGradArgs* args,
                                   const at::Tensor& relu_output) {
  GradReduction reduction;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_grad_sums_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const AddGradSums<scalar_t, acc_t> add{
            x.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
            mean.const_data_ptr<acc_t>(),
            relu_output.defined() ? relu_output.const_data_ptr<scalar_t>() : nullptr};
        reduction = grad_reduction<scalar_t>(x, layout, add, args);
      });
  return reduction;
}

GradReduction batch_norm_grad_coefficients(const at::Tensor& like, const InputGradArgs& args,
                                           const at::Tensor& sum_g, const at::Tensor& sum_gx) {
  GradReduction reduction;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, like.scalar_type(), "batch_norm_grad_coefficients_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const int64_t channels = args.var.numel();
        reduction.coefficients = at::empty({3, channels}, acc_options<acc_t>(like));
        if (channels == 0) return;
        at::Tensor var_storage, weight_storage, sum_g_storage, sum_gx_storage;
        grad_coefficients_kernel<scalar_t, acc_t>
            <<<blocks_for(channels), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                channel_reader<scalar_t, acc_t>(args.var, acc_t(1), var_storage),
                channel_reader<scalar_t, acc_t>(args.weight, acc_t(1), weight_storage),
                channel_reader<scalar_t, acc_t>(sum_g, acc_t(0), sum_g_storage),
                channel_reader<scalar_t, acc_t>(sum_gx, acc_t(0), sum_gx_storage),
                static_cast<acc_t>(args.eps), acc_t(1) / static_cast<acc_t>(args.count),
                args.training, channels, reduction.coefficients.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return reduction;
}

void batch_norm_input_grad(at::Tensor& out, const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& mean, const GradReduction& reduction,
                           const DenseLayout& layout, bool training,
                           const at::Tensor& relu_output) {
  const int64_t total = x.numel();
  if (total == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "batch_norm_input_grad_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    const auto stream = at::cuda::getCurrentCUDAStream();
    const acc_t* coefficients = reduction.coefficients.const_data_ptr<acc_t>();
    const scalar_t* relu = relu_output.defined() ? relu_output.const_data_ptr<scalar_t>() : nullptr;
    if (training) {
      input_grad_kernel<scalar_t, acc_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(), coefficients, relu, layout,
          total);
    } else {
      input_grad_kernel<scalar_t, acc_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          out.mutable_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
          x.const_data_ptr<scalar_t>(), nullptr, coefficients, relu, layout, total);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cifarnet::cuda

namespace cifarnet::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double eps, bool relu) {
  check_batch_norm_forward_args(input, mean, var, weight, bias, training, eps);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = batch_norm_output_memory_format(input);
  const at::Tensor dense = input.contiguous(format);
  const cuda::DenseLayout layout = cuda::dense_layout_of(dense, format);
  const cuda::Normalization normalization =
      training ? cuda::batch_norm_statistics(dense, layout, weight, bias, eps)
               : cuda::batch_norm_normalization(dense, *mean, *var, weight, bias, eps);
  at::Tensor output = at::empty(input.sizes(), input.options().memory_format(format));
  cuda::batch_norm_normalize(output, dense, normalization, layout, relu);
  return {output, normalization.mean, normalization.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& save_mean,
    const at::Tensor& save_var, const std::optional<at::Tensor>& weight, bool training, double eps,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& relu_output) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(save_mean, "save_mean", input);
  check_per_channel(save_var, "save_var", input);
  check_per_channel(weight, "weight", input);
  check_relu_output(relu_output, input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = batch_norm_grad_input_memory_format(input, grad_output);
  const at::Tensor x = input.contiguous(format), g = grad_output.contiguous(format);
  const at::Tensor relu = defined(relu_output) ? relu_output->contiguous(format) : at::Tensor();
  const cuda::DenseLayout layout = cuda::dense_layout_of(x, format);
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  const at::Tensor mean = save_mean.to(stats_options).contiguous();
  const cuda::InputGradArgs args{save_var, weight, eps, layout.batch * layout.spatial, training};
  cuda::GradReduction reduction;
  if (x.numel() == 0) {  // nothing flowed back: zero sums
    reduction.sum_g = at::zeros_like(mean);
    reduction.grad_weight = at::zeros_like(mean);
  } else if (training || output_mask[1] || output_mask[2]) {
    reduction = cuda::batch_norm_grad_sums(g, x, mean, layout, &args, relu);
  } else {  // evaluation's input gradient alone: k g
    reduction = cuda::batch_norm_grad_coefficients(x, args, at::Tensor(), at::Tensor());
  }
  at::Tensor grad_input;
  if (output_mask[0]) {
    grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    cuda::batch_norm_input_grad(grad_input, g, x, mean, reduction, layout, training, relu);
  }
  return {grad_input, output_mask[1] ? reduction.grad_weight : at::Tensor(),
          output_mask[2] ? reduction.sum_g : at::Tensor()};
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
  const cuda::Normalization statistics = cuda::batch_norm_statistics(in.x, in.layout);
  return {statistics.mean, statistics.var};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_output,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& mean) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(mean, "mean", input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  const DenseBatchNormInputs in(input, grad_output);
  const at::Tensor mean_acc = stats_dtype_tensor(mean, input);
  if (in.x.numel() == 0) return {at::zeros_like(mean_acc), at::zeros_like(mean_acc)};
  const cuda::GradReduction sums =
      cuda::batch_norm_grad_sums(in.g, in.x, mean_acc, in.layout, /*args=*/nullptr);
  return {sums.sum_g, sums.sum_gx};
}

at::Tensor batch_norm_backward_elementwise_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu, int64_t count, double eps) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(mean, "mean", input);
  check_per_channel(var, "var", input);
  check_per_channel(weight, "weight", input);
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  check_backward_sums(sum_dy, sum_dy_xmu, count, input.size(1),
                      batch_norm_count(input).expect_int(), input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const DenseBatchNormInputs in(input, grad_output);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(in.format));
  const cuda::InputGradArgs args{var, weight, eps, count, /*training=*/true};
  const cuda::GradReduction reduction =
      cuda::batch_norm_grad_coefficients(in.x, args, sum_dy, sum_dy_xmu);
  cuda::batch_norm_input_grad(grad_input, in.g, in.x, stats_dtype_tensor(mean, input), reduction,
                              in.layout, /*training=*/true);
  return grad_input;
}

// Both running statistics in one launch (where they share a dtype, as the public ops' checks
// make them).
void batch_norm_update_running_stats_cuda(at::Tensor& running_mean, at::Tensor& running_var,
                                          const at::Tensor& save_mean, const at::Tensor& save_var,
                                          double momentum, c10::SymInt symbolic_count) {
  const double unbiased = unbiased_variance_factor(symbolic_count.expect_int());
  TORCH_CHECK(save_mean.numel() == running_mean.numel() && save_var.numel() == running_var.numel(),
              "running statistics of ", running_mean.numel(), " and ", running_var.numel(),
              " channels cannot take batch statistics of ", save_mean.numel(), " and ",
              save_var.numel());
  TORCH_CHECK(running_mean.dim() == 1 && running_var.dim() == 1 &&
                  running_mean.device() == save_mean.device() &&
                  running_var.device() == save_var.device() &&
                  running_var.device() == running_mean.device(),
              "running statistics must be 1-D tensors on the batch statistics' device, got ",
              shape_string(running_mean), " on ", running_mean.device(), " and ",
              shape_string(running_var), " on ", running_var.device());
  const int64_t channels = running_mean.numel();
  if (channels == 0) return;
  const c10::cuda::CUDAGuard device_guard(running_mean.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor mean_storage, var_storage;
  const auto mean_values = cuda::channel_reader<float, double>(save_mean, 0.0, mean_storage);
  const auto var_values = cuda::channel_reader<float, double>(save_var, 0.0, var_storage);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running_mean.scalar_type(), "batch_norm_update_running_stats_cuda",
      [&] {
        const cuda::RunningBlend<scalar_t> mean{running_mean.mutable_data_ptr<scalar_t>(),
                                                running_mean.stride(0), mean_values, 1.0};
        cuda::RunningBlend<scalar_t> var{nullptr, 0, var_values, unbiased};
        if (running_var.scalar_type() == running_mean.scalar_type()) {
          var.running = running_var.mutable_data_ptr<scalar_t>();
          var.stride = running_var.stride(0);
        }
        cuda::update_running_stats_kernel<scalar_t>
            <<<cuda::blocks_for(channels), cuda::kThreads, 0, stream>>>(mean, var, momentum,
                                                                        channels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  if (running_var.scalar_type() == running_mean.scalar_type()) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, running_var.scalar_type(), "batch_norm_update_running_stats_cuda",
      [&] {
        const cuda::RunningBlend<scalar_t> var{running_var.mutable_data_ptr<scalar_t>(),
                                               running_var.stride(0), var_values, unbiased};
        cuda::update_running_stats_kernel<scalar_t>
            <<<cuda::blocks_for(channels), cuda::kThreads, 0, stream>>>(
                var, cuda::RunningBlend<scalar_t>{nullptr, 0, var_values, unbiased}, momentum,
                channels);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("_batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("_batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("_batch_norm_update_running_stats", &batch_norm_update_running_stats_cuda);
  m.impl("_batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("_batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("_batch_norm_backward_elementwise", &batch_norm_backward_elementwise_cuda);
}

}  // namespace cifarnet::ops
