// CUDA kernels of conv2d -> batch norm (training) -> ReLU -> max_pool2d.
//
// Forward: cuDNN's convolution (channels last, kept for the backward), one Welford pass for
// the batch statistics, and one kernel that normalises, applies ReLU, pools and writes the
// one-byte argmax. Backward: the pooled gradient gathered at the argmax hits, batch norm's two
// reductions and its input gradient (in place), then cuDNN's convolution backward.
// (Evaluation mode never comes here: it folds the batch norm into the convolution.)

#include <torch/library.h>

#include "../batch_norm_common.h"
#include "../conv_pool_geometry.h"
#include "batch_norm_cuda.h"
#include "cuda_common.cuh"

namespace cifarnet::ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(input, weight, bias, stride, padding,
                                                               pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the CUDA kernel, got ",
              input.device());
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  TORCH_CHECK(g.batch * g.conv_h * g.conv_w > 1,
              "Expected more than 1 value per channel when training, got convolution output size ",
              c10::IntArrayRef{g.batch, g.out_channels, g.conv_h, g.conv_w});
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  // Channels last, as on the CPU (the fake kernel promises it): the layout tensor cores take.
  const at::Tensor conv =
      at::convolution(input, weight.contiguous(at::MemoryFormat::ChannelsLast), bias, stride,
                      padding, {1, 1}, /*transposed=*/false, {0, 0}, /*groups=*/1)
          .contiguous(at::MemoryFormat::ChannelsLast);
  const cuda::DenseLayout layout = cuda::dense_layout_of(conv);
  auto [mean, var] = cuda::batch_norm_statistics(conv, layout);
  const auto stats_options = mean.options();
  const at::Tensor scale =
      (defined(bn_weight) ? bn_weight->detach().to(stats_options) : at::ones_like(mean)) *
      at::rsqrt(var + eps);
  const at::Tensor shift =
      defined(bn_bias) ? bn_bias->detach().to(stats_options).contiguous() : at::zeros_like(mean);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_batch_norm_relu_max_pool2d_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        cuda::launch_relu_max_pool2d<scalar_t, acc_t>(
            conv, output, argmax, g, mean.const_data_ptr<acc_t>(), scale.const_data_ptr<acc_t>(),
            shift.const_data_ptr<acc_t>());
      });
  return {output, argmax, conv, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, std::array<bool, 5> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the CUDA kernel, got ",
              input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  const cuda::DenseLayout layout = cuda::dense_layout_of(conv);
  const auto stats_options = input.options().dtype(batch_norm_stats_dtype(input));
  const at::Tensor mean = save_mean.to(stats_options).contiguous();
  const at::Tensor var = save_var.to(stats_options).contiguous();
  // The gradient of the normalised activation: zero but at the argmax hits.
  at::Tensor grad_conv;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_batch_norm_pool_gradient_cuda", [&] {
        grad_conv = cuda::pool_input_gradient<scalar_t>(grad_output, argmax, g,
                                                          at::MemoryFormat::ChannelsLast);
      });
  auto [sum_g, sum_gx] = cuda::batch_norm_grad_sums(grad_conv, conv, mean, layout);
  at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
  std::tie(grad_bn_weight, grad_bn_bias) =
      cuda::batch_norm_affine_grads(sum_g, sum_gx, var, eps,
                                     parameter_grad_dtype(bn_weight, input));
  if (!output_mask[3]) grad_bn_weight = at::Tensor();
  if (!output_mask[4]) grad_bn_bias = at::Tensor();
  if (output_mask[0] || output_mask[1] || output_mask[2]) {
    cuda::batch_norm_input_grad(grad_conv, grad_conv, conv, mean, var, bn_weight, sum_g, sum_gx,
                                eps, layout);
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        grad_conv, input, weight.contiguous(at::MemoryFormat::ChannelsLast),
        at::IntArrayRef{g.out_channels}, stride, padding, {1, 1}, /*transposed=*/false, {0, 0},
        /*groups=*/1, {output_mask[0], output_mask[1], output_mask[2]});
  }
  // Fixed layouts, so the fake kernel can promise the same strides.
  if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_cuda);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training_backward",
         &conv2d_batch_norm_relu_max_pool2d_training_backward_cuda);
}

}  // namespace cifarnet::ops
