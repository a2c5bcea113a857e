// CUDA kernels of conv2d -> batch norm (training) -> ReLU -> max_pool2d.
//
// Forward: cuDNN's convolution (channels last, kept for the backward), one Welford pass for
// the batch statistics, and one kernel that normalises, applies ReLU, pools and writes the
// one-byte argmax. Backward: the pooled gradient gathered at the argmax hits, batch norm's two
// reductions and its input gradient (in place), then cuDNN's convolution backward.
// (Evaluation mode never comes here: it folds the batch norm into the convolution.)
// The fused ops run these phases back to back; the phase ops (synchronized batch norm) one at
// a time: statistics, epilogue; reduction, elementwise.

#include <torch/library.h>

#include "../batch_norm_common.h"
#include "../conv_pool_geometry.h"
#include "../convolution.h"
#include "batch_norm_cuda.h"
#include "cuda_common.cuh"

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

// Statistics phase: per-channel mean and biased variance in the accumulation dtype; zeros for
// an empty batch.
std::tuple<at::Tensor, at::Tensor> conv_output_statistics(const at::Tensor& conv,
                                                          const at::Tensor& input) {
  if (conv.numel() == 0) {
    const auto options = input.options().dtype(batch_norm_stats_dtype(input));
    return {at::zeros({conv.size(1)}, options), at::zeros({conv.size(1)}, options)};
  }
  return cuda::batch_norm_statistics(conv, conv_layout(conv));
}

// Epilogue phase: normalises with (mean, var), applies ReLU and pools, writing the pooled
// output and its argmax in native conv2d's layout.
std::tuple<at::Tensor, at::Tensor> normalise_relu_max_pool2d(
    const at::Tensor& conv, const at::Tensor& input, const at::Tensor& weight,
    const ConvPoolGeometry& g, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps) {
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  const at::Tensor mean_acc = mean.to(stats_options).contiguous();
  const at::Tensor scale =
      (defined(bn_weight) ? bn_weight->detach().to(stats_options) : at::ones_like(mean_acc)) *
      at::rsqrt(var.to(stats_options) + eps);
  const at::Tensor shift = defined(bn_bias) ? bn_bias->detach().to(stats_options).contiguous()
                                            : at::zeros_like(mean_acc);
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_batch_norm_relu_max_pool2d_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        cuda::launch_relu_max_pool2d<scalar_t, acc_t>(
            conv, output, argmax, g, mean_acc.const_data_ptr<acc_t>(),
            scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>());
      });
  return {output, argmax};
}

// The gradient of the normalised activation: zero but at the argmax hits (channels last).
at::Tensor pooled_gradient(const at::Tensor& grad_output, const at::Tensor& argmax,
                           const ConvPoolGeometry& g) {
  at::Tensor grad_conv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "conv2d_batch_norm_pool_gradient_cuda",
      [&] {
        grad_conv = cuda::pool_input_gradient<scalar_t>(grad_output, argmax, g,
                                                          at::MemoryFormat::ChannelsLast);
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
  auto [mean, var] = conv_output_statistics(conv, input);
  auto [output, argmax] =
      normalise_relu_max_pool2d(conv, input, weight, g, mean, var, bn_weight, bn_bias, eps);
  return {output, argmax, conv, mean, var};
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
  const cuda::DenseLayout layout = conv_layout(conv);
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  const at::Tensor mean = save_mean.to(stats_options).contiguous();
  const at::Tensor var = save_var.to(stats_options).contiguous();
  at::Tensor grad_conv = pooled_gradient(grad_output, argmax, g);
  auto [sum_g, sum_gx] = cuda::batch_norm_grad_sums(grad_conv, conv, mean, layout);
  at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
  std::tie(grad_bn_weight, grad_bn_bias) = cuda::batch_norm_affine_grads(sum_g, sum_gx, var, eps);
  if (!output_mask[3]) grad_bn_weight = at::Tensor();
  if (!output_mask[4]) grad_bn_bias = at::Tensor();
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    cuda::batch_norm_input_grad(grad_conv, grad_conv, conv, mean, var, bn_weight, sum_g, sum_gx,
                                eps, layout.batch * layout.spatial, layout);
    std::tie(grad_input, grad_weight, grad_bias) = convolution_grads(
        grad_conv, input, weight, stride, padding, {output_mask[0], output_mask[1], output_mask[2]});
  }
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
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
  auto [mean, var] = conv_output_statistics(conv, input);
  return {conv, mean, var};
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
  return normalise_relu_max_pool2d(conv, input, weight, g, mean, var, bn_weight, bn_bias, eps);
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
  return cuda::batch_norm_grad_sums(pooled_gradient(grad_output, argmax, g), conv, mean,
                                    conv_layout(conv));
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
  check_backward_sums(sum_dy, sum_dy_xmu, count, weight.size(0), g.batch * g.conv_h * g.conv_w);
  check_cuda(input);
  const c10::cuda::CUDAGuard device_guard(input.device());
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor grad_conv = pooled_gradient(grad_output, argmax, g);
  if (g.batch > 0) {
    const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
    auto stats = [&](const at::Tensor& t) { return t.to(stats_options).contiguous(); };
    cuda::batch_norm_input_grad(grad_conv, grad_conv, conv, stats(save_mean), stats(save_var),
                                bn_weight, stats(sum_dy), stats(sum_dy_xmu), eps, count,
                                conv_layout(conv));
  }
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
