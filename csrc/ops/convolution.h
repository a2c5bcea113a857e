#pragma once
// The batch-norm chain's convolution and its gradients through ATen, shared by the CPU and CUDA
// kernels (at::convolution and at::convolution_backward pick the device's library).

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "conv_pool_geometry.h"

namespace cifarnet {

// The convolution of the whole batch, channels last (kept for the backward; on CUDA the layout
// tensor cores take). An empty batch (a process of a synchronized batch that got no samples)
// skips the convolution.
inline at::Tensor channels_last_convolution(const at::Tensor& input, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const ConvPoolGeometry& g, at::IntArrayRef stride,
                                            at::IntArrayRef padding) {
  if (g.batch == 0) {
    return at::empty({0, g.out_channels, g.conv_h, g.conv_w},
                     input.options().memory_format(at::MemoryFormat::ChannelsLast));
  }
  return at::convolution(input, weight.contiguous(at::MemoryFormat::ChannelsLast), bias, stride,
                         padding, {1, 1}, /*transposed=*/false, {0, 0}, /*groups=*/1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

// In fixed layouts (so the fake kernels can promise the same strides); zeros for an empty
// batch.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_grads(
    const at::Tensor& grad_conv, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 3> output_mask) {
  at::Tensor grad_input, grad_weight, grad_bias;
  if (input.size(0) == 0) {
    if (output_mask[0]) grad_input = at::empty_like(input);
    if (output_mask[1]) grad_weight = at::zeros_like(weight);
    if (output_mask[2]) grad_bias = at::zeros({weight.size(0)}, weight.options());
  } else {
    std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
        grad_conv, input, weight.contiguous(at::MemoryFormat::ChannelsLast),
        at::IntArrayRef{weight.size(0)}, stride, padding, {1, 1}, /*transposed=*/false, {0, 0},
        /*groups=*/1, output_mask);
  }
  // Both in the convolution's layout, as native conv2d's gradients.
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(format);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace cifarnet
