// CUDA kernels of conv2d -> batch norm (training) -> ReLU -> max_pool2d.
//
// Forward: cuDNN's convolution (channels last, kept for the backward), one launch for the batch
// statistics (which also computes the normalisation's scale and shift), and one kernel that
// normalises, applies ReLU, pools and writes the one-byte argmax. Backward: one launch for batch
// norm's two sums over the pooled gradient, gathered at the argmax hits as it is read (which also
// computes the batch-norm parameters' gradients and the input gradient's coefficients), one that
// gathers it again and writes the convolution output's gradient, then cuDNN's convolution
// backward. (Evaluation mode never comes here: it folds the batch norm into the convolution.)
// The fused ops run these phases back to back; the phase ops (synchronized batch norm) one at
// a time: statistics, epilogue; reduction, elementwise.

#include <torch/library.h>

#include "../batch_norm_common.h"
#include "../conv_pool_geometry.h"
#include "../convolution.h"
#include "batch_norm_cuda.h"
#include "batch_norm_reduce.cuh"
#include "cuda_common.cuh"

namespace cifarnet::cuda {
namespace {

// The pooled gradient at a channels-last convolution output element (pixel p = n * H * W +
// h * W + w, channel c), rounded to scalar_t as the gradient tensor native's pool backward
// writes is.
template <typename scalar_t, typename acc_t>
struct PooledGradient {
  const scalar_t* grad;
  Strides4d grad_strides;
  const uint8_t* argmax;
  Strides4d argmax_strides;
  ConvPoolGeometry g;

  __device__ acc_t operator()(int64_t p, int64_t c) const {
    const int64_t pixels = g.conv_h * g.conv_w;
    const int64_t n = p / pixels, s = p - n * pixels;
    const int64_t h = s / g.conv_w, w = s - h * g.conv_w;
    return static_cast<acc_t>(static_cast<scalar_t>(pooled_gradient_at<scalar_t, acc_t>(
        grad, grad_strides, argmax, argmax_strides, g, n, c, h, w)));
  }
};

// Folds the pooled gradient g and g * (x - mean) into a state of sums, x the convolution output.
template <typename scalar_t, typename acc_t>
struct AddPooledGradSums {
  PooledGradient<scalar_t, acc_t> pooled;
  const scalar_t* conv;
  const acc_t* mean;

  __device__ void operator()(GradSumState<acc_t>& state, int64_t at, int64_t p, int64_t c) const {
    const acc_t grad = pooled(p, c);
    state.g += grad;
    state.gx += grad * (static_cast<acc_t>(conv[at]) - mean[c]);
  }
};

// The convolution output's gradient k ((x - mean) slope + offset + g), g the pooled gradient,
// one thread per element of the channels-last convolution output.
template <typename scalar_t, typename acc_t>
__global__ void pooled_input_grad_kernel(scalar_t* __restrict__ grad_conv,
                                         PooledGradient<scalar_t, acc_t> pooled,
                                         const scalar_t* __restrict__ conv,
                                         const acc_t* __restrict__ mean,
                                         const acc_t* __restrict__ coefficients, int64_t channels,
                                         int64_t total) {
  const acc_t* __restrict__ k = coefficients;
  const acc_t* __restrict__ slope = coefficients + channels;
  const acc_t* __restrict__ offset = coefficients + 2 * channels;
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const int64_t c = index % channels, p = index / channels;
    const acc_t value =
        (static_cast<acc_t>(conv[index]) - mean[c]) * slope[c] + offset[c] + pooled(p, c);
    grad_conv[index] = static_cast<scalar_t>(value * k[c]);
  }
}

template <typename scalar_t, typename acc_t>
PooledGradient<scalar_t, acc_t> pooled_gradient(const at::Tensor& grad_output,
                                                const at::Tensor& argmax,
                                                const ConvPoolGeometry& g) {
  return {grad_output.const_data_ptr<scalar_t>(), Strides4d(grad_output),
          argmax.const_data_ptr<uint8_t>(), Strides4d(argmax), g};
}

}  // namespace
}  // namespace cifarnet::cuda

namespace cifarnet::ops {
namespace {

void check_cuda(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the CUDA kernel, got ",
              input.device());
}

// The layout of the saved convolution output, which is channels-last (../convolution.h).
cuda::DenseLayout conv_layout(const at::Tensor& conv) {
  return cuda::dense_layout_of(conv, at::MemoryFormat::ChannelsLast);
}

// Epilogue phase: normalises, applies ReLU and pools, writing the pooled output and its argmax
// in native conv2d's layout.
std::tuple<at::Tensor, at::Tensor> normalise_relu_max_pool2d(
    const at::Tensor& conv, const at::Tensor& input, const at::Tensor& weight,
    const ConvPoolGeometry& g, const cuda::Normalization& normalization) {
  const at::MemoryFormat format = pooled_output_memory_format(input, weight, g);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_batch_norm_relu_max_pool2d_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const acc_t* affine = normalization.affine.const_data_ptr<acc_t>();
        cuda::launch_relu_max_pool2d<scalar_t, acc_t>(conv, output, argmax, g,
                                                      normalization.mean.const_data_ptr<acc_t>(),
                                                      affine, affine + g.out_channels);
      });
  return {output, argmax};
}

// Backward reduction: batch norm's sums over the pooled gradient of the (channels-last)
// convolution output, in one launch; with `args`, also the parameters' gradients and the input
// gradient's coefficients.
cuda::GradReduction pooled_grad_sums(const at::Tensor& grad_output, const at::Tensor& argmax,
                                     const ConvPoolGeometry& g, const at::Tensor& conv,
                                     const at::Tensor& mean, const cuda::InputGradArgs* args) {
  cuda::GradReduction reduction;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, conv.scalar_type(), "conv2d_batch_norm_grad_sums_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        const cuda::AddPooledGradSums<scalar_t, acc_t> add{
            cuda::pooled_gradient<scalar_t, acc_t>(grad_output, argmax, g),
            conv.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>()};
        reduction = cuda::grad_reduction<scalar_t>(conv, conv_layout(conv), add, args);
      });
  return reduction;
}

// Elementwise backward: the convolution output's gradient (channels-last), in one launch.
at::Tensor pooled_input_grad(const at::Tensor& grad_output, const at::Tensor& argmax,
                             const ConvPoolGeometry& g, const at::Tensor& conv,
                             const at::Tensor& mean, const cuda::GradReduction& reduction) {
  at::Tensor grad_conv =
      at::empty(conv.sizes(), conv.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t total = grad_conv.numel();
  if (total == 0) return grad_conv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, conv.scalar_type(), "conv2d_batch_norm_input_grad_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        cuda::pooled_input_grad_kernel<scalar_t, acc_t>
            <<<cuda::blocks_for(total), cuda::kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
                grad_conv.mutable_data_ptr<scalar_t>(),
                cuda::pooled_gradient<scalar_t, acc_t>(grad_output, argmax, g),
                conv.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
                reduction.coefficients.const_data_ptr<acc_t>(), g.out_channels, total);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return grad_conv;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cuda(input);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  TORCH_CHECK_VALUE(g.batch * g.conv_h * g.conv_w > 1,
              "Expected more than 1 value per channel when training, got convolution output size ",
              c10::IntArrayRef{g.batch, g.out_channels, g.conv_h, g.conv_w});
  check_batch_norm_eps(eps, /*training=*/true);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = channels_last_convolution(input, weight, bias, g, stride, padding);
  const cuda::Normalization normalization =
      cuda::batch_norm_statistics(conv, conv_layout(conv), bn_weight, bn_bias, eps);
  auto [output, argmax] = normalise_relu_max_pool2d(conv, input, weight, g, normalization);
  return {output, argmax, conv, normalization.mean, normalization.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding,
    std::array<bool, 5> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mean =
      save_mean.to(input.options().dtype(batch_norm_stats_dtype(input))).contiguous();
  const cuda::InputGradArgs args{save_var, bn_weight, eps, g.batch * g.conv_h * g.conv_w,
                                 /*training=*/true};
  const cuda::GradReduction reduction = pooled_grad_sums(grad_output, argmax, g, conv, mean, &args);
  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    const at::Tensor grad_conv = pooled_input_grad(grad_output, argmax, g, conv, mean, reduction);
    std::tie(grad_input, grad_weight, grad_bias) = convolution_grads(
        grad_conv, input, weight, stride, padding, {output_mask[0], output_mask[1], output_mask[2]});
  }
  return {grad_input, grad_weight, grad_bias, output_mask[3] ? reduction.grad_weight : at::Tensor(),
          output_mask[4] ? reduction.sum_g : at::Tensor()};
}

// The phase ops (see ../conv2d_batch_norm_relu_max_pool2d.cpp).

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_stats_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = channels_last_convolution(input, weight, bias, g, stride, padding);
  if (conv.numel() == 0) {  // an empty batch has no statistics: zeros
    const auto options = input.options().dtype(batch_norm_stats_dtype(input));
    return {conv, at::zeros({g.out_channels}, options), at::zeros({g.out_channels}, options)};
  }
  const cuda::Normalization statistics = cuda::batch_norm_statistics(conv, conv_layout(conv));
  return {conv, statistics.mean, statistics.var};
}

std::tuple<at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_epilogue_cuda(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_output,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_epilogue_args(
      input, weight, conv_output, mean, var, bn_weight, bn_bias, eps, stride, padding, pool_size,
      pool_stride, ceil_mode, pool_padding);
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  return normalise_relu_max_pool2d(
      conv, input, weight, g,
      cuda::batch_norm_normalization(conv, mean, var, bn_weight, bn_bias, eps));
}

std::tuple<at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_backward_reduce_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_pooled_grad_args(
      grad_output, input, weight, conv_output, argmax, stride, padding, pool_size, pool_stride,
      ceil_mode, pool_padding);
  check_per_output_channel(save_mean, "save_mean", weight);
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor mean =
      save_mean.to(input.options().dtype(batch_norm_stats_dtype(input))).contiguous();
  if (g.batch == 0) return {at::zeros_like(mean), at::zeros_like(mean)};
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  const cuda::GradReduction sums =
      pooled_grad_sums(grad_output, argmax, g, conv, mean, /*args=*/nullptr);
  return {sums.sum_g, sums.sum_gx};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_backward_elementwise_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu, int64_t count, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_backward_sums(sum_dy, sum_dy_xmu, count, weight.size(0), g.batch * g.conv_h * g.conv_w,
                      input.device());
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor mean =
      save_mean.to(input.options().dtype(batch_norm_stats_dtype(input))).contiguous();
  const cuda::InputGradArgs args{save_var, bn_weight, eps, count, /*training=*/true};
  const at::Tensor grad_conv =
      pooled_input_grad(grad_output, argmax, g, conv, mean,
                        cuda::batch_norm_grad_coefficients(conv, args, sum_dy, sum_dy_xmu));
  return convolution_grads(grad_conv, input, weight, stride, padding, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training_backward",
         &conv2d_batch_norm_relu_max_pool2d_training_backward_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_stats", &conv2d_batch_norm_relu_max_pool2d_stats_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_epilogue",
         &conv2d_batch_norm_relu_max_pool2d_epilogue_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_backward_reduce",
         &conv2d_batch_norm_relu_max_pool2d_backward_reduce_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_backward_elementwise",
         &conv2d_batch_norm_relu_max_pool2d_backward_elementwise_cuda);
}

}  // namespace cifarnet::ops
