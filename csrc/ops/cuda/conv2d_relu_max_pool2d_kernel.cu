// CUDA kernels of conv2d -> ReLU -> max_pool2d.
//
// Forward: the convolution is cuDNN's (at::convolution, channels last where the input or the
// weight is), then one kernel applies ReLU, pools and writes the one-byte argmax, one thread
// per output. Backward: one kernel gathers the pooled gradient at the argmax positions (the
// ReLU mask comes with the argmax; deterministic), and cuDNN's convolution backward does the
// rest. float32,
// float16 and bfloat16 (compared and accumulated in float32) and float64.

#include <torch/library.h>

#include "../conv_pool_geometry.h"
#include "cuda_common.cuh"

namespace cifarnet::ops {
namespace {

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the CUDA kernel, got ",
              input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = pooled_output_memory_format(input, weight, g);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = at::convolution(input, weight, bias, stride, padding, {1, 1},
                                          /*transposed=*/false, {0, 0}, /*groups=*/1);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_relu_max_pool2d_forward_cuda", [&] {
        using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
        cuda::launch_relu_max_pool2d<scalar_t, acc_t>(conv, output, argmax, g, nullptr, nullptr,
                                                      nullptr);
      });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g =
      check_conv2d_relu_max_pool2d_args(input, weight, std::nullopt, stride, padding, pool_size,
                                        pool_stride, ceil_mode, pool_padding);
  check_conv2d_relu_max_pool2d_backward_args(grad_output, argmax, input, g);
  TORCH_CHECK(input.is_cuda(), "input must be a CUDA tensor for the CUDA kernel, got ",
              input.device());
  const c10::cuda::CUDAGuard device_guard(input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor grad_input, grad_weight, grad_bias;
  if (g.batch == 0) {  // nothing flowed back
    if (output_mask[0]) grad_input = at::zeros(input.sizes(), input.options());
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
    if (output_mask[2]) grad_bias = at::zeros({g.out_channels}, weight.options());
  } else if (output_mask[0] || output_mask[1] || output_mask[2]) {
    at::Tensor grad_conv;
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, input.scalar_type(), "conv2d_relu_max_pool2d_backward_cuda",
        [&] { grad_conv = cuda::pool_input_gradient<scalar_t>(grad_output, argmax, g, format); });
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        grad_conv, input, weight, at::IntArrayRef{g.out_channels}, stride, padding, {1, 1},
        /*transposed=*/false, {0, 0}, /*groups=*/1, output_mask);
  }
  // The convolution's layout for both, as native conv2d's gradients (the fake kernel promises
  // the same strides).
  if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(format);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax", &conv2d_relu_max_pool2d_forward_cuda);
  m.impl("_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cuda);
}

}  // namespace cifarnet::ops
