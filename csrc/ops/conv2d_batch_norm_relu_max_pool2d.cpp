// conv2d -> batch norm -> ReLU -> max_pool2d: its schemas (the public op, its private fused
// training op and backward, and its synchronized-batch-norm phases), the C++ entry point that
// calls it through the dispatcher, and its composite and autocast kernels. Device kernels:
// cpu/ and cuda/conv2d_batch_norm_relu_max_pool2d_kernel; autograd:
// autograd/conv2d_batch_norm_relu_max_pool2d.cpp.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "autocast.h"
#include "batch_norm_common.h"
#include "batch_norm_running_stats.h"
#include "internal_op.h"
#include "native_composition.h"
#include "ops.h"

namespace cifarnet::ops {

at::Tensor conv2d_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_batch_norm_relu_max_pool2d", "")
                       .typed<decltype(conv2d_batch_norm_relu_max_pool2d)>();
  return op.call(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training,
                 momentum, eps, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
}

namespace {

// Training: one op for convolution, batch statistics, normalisation, ReLU and pooling; an
// empty batch, which has no statistics, as native computes it (an empty output, the running
// statistics untouched). Evaluation: the batch norm folded into the convolution's weight and
// bias, then the conv -> ReLU -> max-pool op (the algebra is exact; autograd flows through the
// folding).
at::Tensor conv2d_batch_norm_relu_max_pool2d_composite(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (C_out, C_in, kH, kW), got ",
              weight.dim(), "-D tensor of shape ", shape_string(weight));
  check_per_output_channel(running_mean, "running_mean", weight);
  check_per_output_channel(running_var, "running_var", weight);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  check_batch_norm_eps(eps, training);
  // The convolution's refusal of integer input (a RuntimeError), which the native chain meets
  // first, before the batch norm's dtypes.
  check_floating_dtype(input, "input");
  check_running_stats_need_no_grad(running_mean, running_var);
  check_batch_norm_parameter_dtypes(input, {{"running_mean", running_mean},
                                            {"running_var", running_var},
                                            {"bn_weight", bn_weight},
                                            {"bn_bias", bn_bias}});
  if (training && input.sym_numel() == 0) {
    return composed_conv2d_batch_norm_relu_max_pool2d(
        input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
        stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  }
  if (training) {
    static auto fused =
        internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
            at::IntArrayRef)>("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
    auto [output, argmax, conv_output, save_mean, save_var] =
        fused.call(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size,
                   pool_stride, ceil_mode, pool_padding);
    update_running_stats_if_given(running_mean, running_var, save_mean, save_var, momentum,
                                  batch_norm_count(conv_output));
    return output;
  }
  TORCH_CHECK(defined(running_mean) && defined(running_var),
              "running_mean and running_var must be defined in evaluation mode");
  // The bias is folded into another before the convolution sees it: checked here against the
  // weight (the input may be in autocast's dtype yet).
  check_per_output_channel(bias, "bias", weight);
  TORCH_CHECK(!defined(bias) || bias->scalar_type() == weight.scalar_type(), "bias dtype ",
              bias->scalar_type(), " does not match weight dtype ", weight.scalar_type());
  at::Tensor scale = at::rsqrt(*running_var + eps);
  if (defined(bn_weight)) scale = scale * *bn_weight;
  // float32 batch-norm parameters of bfloat16 or float16 convolutions (as native allows them,
  // and as autocast leaves them) fold in their precision; the folded weight and bias then
  // take the convolution's dtype.
  const at::Tensor folded_weight = (weight * scale.reshape({-1, 1, 1, 1})).to(weight.scalar_type());
  at::Tensor folded_bias = defined(bias) ? (*bias - *running_mean) * scale : -*running_mean * scale;
  if (defined(bn_bias)) folded_bias = folded_bias + *bn_bias;
  return conv2d_relu_max_pool2d(input, folded_weight, folded_bias.to(weight.scalar_type()), stride,
                                padding, pool_size, pool_stride, ceil_mode, pool_padding);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  static auto op =
      internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
          at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
          at::IntArrayRef)>("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
  return call_autocast<device, autocast_key>(op, input, weight, bias, bn_weight, bn_bias, eps,
                                             stride, padding, pool_size, pool_stride, ceil_mode,
                                             pool_padding);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  m.def(
      "conv2d_batch_norm_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? bn_weight, Tensor? bn_bias, "
      "bool training=False, float momentum=0.1, float eps=1e-05, int[2] stride=1, "
      "int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], bool ceil_mode=False, "
      "int[2] pool_padding=0) -> Tensor");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_training(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, int[2] stride, int[2] padding, "
      "int[2] pool_size, int[2] pool_stride, bool ceil_mode, int[2] pool_padding) "
      "-> (Tensor output, Tensor argmax, Tensor conv_output, Tensor save_mean, Tensor save_var)");
  // grad_bn_weight and grad_bn_bias come back in the statistics dtype (save_mean's): the
  // autograd formula gives each its parameter's dtype, and bn_bias is no argument here.
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_training_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor conv_output, Tensor save_mean, Tensor save_var, Tensor? bn_weight, "
      "Tensor argmax, float eps, int[2] stride, int[2] padding, int[2] pool_size, "
      "int[2] pool_stride, bool ceil_mode, int[2] pool_padding, bool[5] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, "
      "Tensor grad_bn_bias)");

  // The phases of the fused op, for synchronized batch norm (as batch_norm.cpp has them for
  // batch norm): the statistics (mean and biased variance, in the statistics dtype) of this
  // process's part of the convolution output, which comes back for the later phases; the
  // normalisation, ReLU and pooling with the whole batch's statistics; the backward's two
  // per-channel sums over this process's part; and the gradients from the whole batch's sums
  // and count.
  // NB: phase ops live with their op, as their kernels do (cpu/, cuda/).
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_stats(Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode, "
      "int[2] pool_padding) -> (Tensor conv_output, Tensor mean, Tensor var)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_epilogue(Tensor input, Tensor weight, "
      "Tensor conv_output, Tensor mean, Tensor var, Tensor? bn_weight, Tensor? bn_bias, "
      "float eps, int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, "
      "bool ceil_mode, int[2] pool_padding) -> (Tensor output, Tensor argmax)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_backward_reduce(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor conv_output, Tensor save_mean, Tensor argmax, int[2] stride, "
      "int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode, int[2] pool_padding) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_backward_elementwise(Tensor grad_output, "
      "Tensor input, Tensor weight, Tensor conv_output, Tensor save_mean, Tensor save_var, "
      "Tensor? bn_weight, Tensor argmax, Tensor sum_dy, Tensor sum_dy_xmu, int count, float eps, "
      "int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode, "
      "int[2] pool_padding, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, "
      "Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeImplicitAutograd, m) {
  m.impl("conv2d_batch_norm_relu_max_pool2d", &conv2d_batch_norm_relu_max_pool2d_composite);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCUDA, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autocast<at::kCUDA,
                                                              c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCPU, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autocast<at::kCPU,
                                                              c10::DispatchKey::AutocastCPU>);
}

}  // namespace cifarnet::ops
