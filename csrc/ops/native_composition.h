#pragma once
// Each op as the composition of native ATen ops it replaces. The autograd formulas run it where
// the fused kernels have no formula (second derivatives, forward-mode AD, torch.func
// transforms; autograd/autograd_common.h), and the fused conv -> batch norm op runs it for an
// empty batch, whose batch norm native computes without statistics. Every ATen op here has
// every autograd formula, so the composition is as differentiable as native's.
// NB: 16-bit data round the convolution output to their dtype here, as native does, where the
// fused kernels keep it in float32: these paths agree with native, not bit for bit with the
// fused ones.

#include <ATen/ATen.h>

#include <optional>

namespace cifarnet {

inline at::Tensor composed_relu_max_pool2d(const at::Tensor& conv_output, at::IntArrayRef pool_size,
                                           at::IntArrayRef pool_stride, bool ceil_mode,
                                           at::IntArrayRef pool_padding) {
  return at::max_pool2d(at::relu(conv_output), pool_size,
                        pool_stride.empty() ? pool_size : pool_stride, pool_padding,
                        /*dilation=*/{1, 1}, ceil_mode);
}

// The ops' convolution in native ops: no dilation and one group, spelled out in two dimensions.
// NB: at::conv2d's default dilation is {1}, which torch.onnx writes as a one-element attribute
// that onnxruntime refuses ("Attribute dilations has incorrect size").
inline at::Tensor composed_conv2d(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding) {
  return at::conv2d(input, weight, bias, stride, padding, /*dilation=*/{1, 1}, /*groups=*/1);
}

inline at::Tensor composed_conv2d_relu_max_pool2d(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  at::IntArrayRef pool_size,
                                                  at::IntArrayRef pool_stride, bool ceil_mode,
                                                  at::IntArrayRef pool_padding) {
  return composed_relu_max_pool2d(composed_conv2d(input, weight, bias, stride, padding), pool_size,
                                  pool_stride, ceil_mode, pool_padding);
}

// Batch norm with the batch statistics (training; the running ones, if given, updated with
// `momentum`) or with `mean` and `var` (evaluation).
inline at::Tensor composed_batch_norm(const at::Tensor& input,
                                      const std::optional<at::Tensor>& mean,
                                      const std::optional<at::Tensor>& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, bool training,
                                      double momentum, double eps) {
  return at::batch_norm(input, weight, bias, mean, var, training, momentum, eps,
                        at::globalContext().userEnabledCuDNN());
}

inline at::Tensor composed_conv2d_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const at::Tensor conv_output = composed_conv2d(input, weight, bias, stride, padding);
  return composed_relu_max_pool2d(composed_batch_norm(conv_output, running_mean, running_var,
                                                      bn_weight, bn_bias, training, momentum, eps),
                                  pool_size, pool_stride, ceil_mode, pool_padding);
}

// relu(batch_norm(input)) convolved: in evaluation (`mean` and `var` the running statistics)
// and, in training, where the fused op does not serve (an empty batch; second derivatives).
inline at::Tensor composed_batch_norm_relu_conv2d(
    const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, bool training, double momentum, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding) {
  return composed_conv2d(at::relu(composed_batch_norm(input, running_mean, running_var, bn_weight,
                                                      bn_bias, training, momentum, eps)),
                         weight, bias, stride, padding);
}

}  // namespace cifarnet
