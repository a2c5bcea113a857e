// The cifarnet operator library: every schema in one place, and the C++ entry points that call
// them through the dispatcher. Kernels register themselves per device in csrc/ops/<device>/.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "batch_norm_common.h"
#include "internal_op.h"
#include "ops.h"

namespace cifarnet::ops {

at::Tensor conv2d_relu_max_pool2d(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef pool_size,
                                  at::IntArrayRef pool_stride, bool ceil_mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_relu_max_pool2d", "")
                       .typed<decltype(conv2d_relu_max_pool2d)>();
  return op.call(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_relu_max_pool2d_with_argmax", "")
                       .typed<decltype(conv2d_relu_max_pool2d_with_argmax)>();
  return op.call(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::_conv2d_relu_max_pool2d_backward", "")
                       .typed<decltype(_conv2d_relu_max_pool2d_backward)>();
  return op.call(grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride,
                 ceil_mode, output_mask);
}

at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, bool training, double momentum,
                      double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::batch_norm", "")
                       .typed<decltype(batch_norm)>();
  return op.call(input, running_mean, running_var, weight, bias, training, momentum, eps);
}

at::Tensor conv2d_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_batch_norm_relu_max_pool2d", "")
                       .typed<decltype(conv2d_batch_norm_relu_max_pool2d)>();
  return op.call(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training,
                 momentum, eps, stride, padding, pool_size, pool_stride, ceil_mode);
}

namespace {

// The running statistics after a training batch: momentum-weighted averages with the batch
// mean and the unbiased batch variance (count elements per channel), updated in place.
void batch_norm_update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                                     const at::Tensor& save_mean, const at::Tensor& save_var,
                                     double momentum, c10::SymInt symbolic_count) {
  const double unbiased = unbiased_variance_factor(symbolic_count.guard_int(__FILE__, __LINE__));
  at::NoGradGuard no_grad;
  running_mean.mul_(1 - momentum).add_(save_mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1 - momentum).add_(save_var.to(running_var.scalar_type()), momentum * unbiased);
}

void update_running_stats_if_given(const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var,
                                   const at::Tensor& save_mean, const at::Tensor& save_var,
                                   double momentum, c10::SymInt count) {
  TORCH_CHECK(defined(running_mean) == defined(running_var),
              "running_mean and running_var must both be given or both be None");
  if (!defined(running_mean)) return;
  static auto op =
      internal_op<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                       c10::SymInt)>("cifarnet::_batch_norm_update_running_stats");
  at::Tensor mean = *running_mean, var = *running_var;
  op.call(mean, var, save_mean, save_var, momentum, count);
}

// Training normalises with the batch statistics (and updates the running ones); evaluation
// with the running statistics.
at::Tensor batch_norm_composite(const at::Tensor& input,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, bool training,
                                double momentum, double eps) {
  static auto forward = internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double)>(
      "cifarnet::_batch_norm_forward");
  if (!training) {
    return std::get<0>(forward.call(input, running_mean, running_var, weight, bias, false, eps));
  }
  check_batch_norm_input(input, training);
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
  auto [output, save_mean, save_var] =
      forward.call(input, std::nullopt, std::nullopt, weight, bias, true, eps);
  update_running_stats_if_given(running_mean, running_var, save_mean, save_var, momentum,
                                batch_norm_count(input));
  return output;
}

// Training: one op for convolution, batch statistics, normalisation, ReLU and pooling.
// Evaluation: the batch norm folded into the convolution's weight and bias, then the
// conv -> ReLU -> max-pool op (the algebra is exact; autograd flows through the folding).
at::Tensor conv2d_batch_norm_relu_max_pool2d_composite(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode) {
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (C_out, C_in, kH, kW), got ",
              weight.dim(), "-D tensor of shape ", shape_string(weight));
  check_per_output_channel(running_mean, "running_mean", weight);
  check_per_output_channel(running_var, "running_var", weight);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  if (training) {
    static auto fused =
        internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
            const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>(
            "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
    auto [output, argmax, conv_output, save_mean, save_var] =
        fused.call(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size,
                   pool_stride, ceil_mode);
    update_running_stats_if_given(running_mean, running_var, save_mean, save_var, momentum,
                                  batch_norm_count(conv_output));
    return output;
  }
  TORCH_CHECK(defined(running_mean) && defined(running_var),
              "running_mean and running_var must be defined in evaluation mode");
  at::Tensor scale = at::rsqrt(*running_var + eps);
  if (defined(bn_weight)) scale = scale * *bn_weight;
  // float32 batch-norm parameters of bfloat16 or float16 convolutions (as native allows them,
  // and as autocast leaves them) fold in their precision; the folded weight and bias then
  // take the convolution's dtype.
  const at::Tensor folded_weight =
      (weight * scale.reshape({-1, 1, 1, 1})).to(weight.scalar_type());
  at::Tensor folded_bias = defined(bias) ? (*bias - *running_mean) * scale : -*running_mean * scale;
  if (defined(bn_bias)) folded_bias = folded_bias + *bn_bias;
  return conv2d_relu_max_pool2d(input, folded_weight, folded_bias.to(weight.scalar_type()), stride,
                                padding, pool_size, pool_stride, ceil_mode);
}

// NB: like native max_pool2d over max_pool2d_with_indices, the public op is a composite of the
// op that also returns the argmax; autograd, fake kernels and device kernels live on that one.
at::Tensor conv2d_relu_max_pool2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                                            bool ceil_mode) {
  return std::get<0>(conv2d_relu_max_pool2d_with_argmax(input, weight, bias, stride, padding,
                                                        pool_size, pool_stride, ceil_mode));
}

// Under torch.autocast("cuda") and torch.autocast("cpu"), the convolution ops run in the
// autocast dtype (float16 or bfloat16), as F.conv2d does: input, weight and bias are cast to
// it; batch-norm parameters and statistics stay in float32, as native batch norm keeps them.
template <c10::DeviceType device, c10::DispatchKey autocast_key, typename Op, typename... Rest>
auto call_autocast(Op& op, const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, Rest&&... rest) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), std::forward<Rest>(rest)...);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  static auto op = internal_op<decltype(conv2d_relu_max_pool2d_with_argmax)>(
      "cifarnet::conv2d_relu_max_pool2d_with_argmax");
  return call_autocast<device, autocast_key>(op, input, weight, bias, stride, padding, pool_size,
                                             pool_stride, ceil_mode);
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  static auto op = internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double, at::IntArrayRef,
      at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool)>(
      "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
  return call_autocast<device, autocast_key>(op, input, weight, bias, bn_weight, bn_bias, eps,
                                             stride, padding, pool_size, pool_stride, ceil_mode);
}

}  // namespace

at::Tensor dropout(const at::Tensor& input, const at::Tensor& seed, double p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::dropout", "")
                       .typed<decltype(dropout)>();
  return op.call(input, seed, p);
}

TORCH_LIBRARY(cifarnet, m) {
  m.def(
      "conv2d_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], bool ceil_mode=False) "
      "-> Tensor");
  m.def(
      "conv2d_relu_max_pool2d_with_argmax(Tensor input, Tensor weight, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], "
      "bool ceil_mode=False) -> (Tensor output, Tensor argmax)");
  m.def(
      "_conv2d_relu_max_pool2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor argmax, int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, "
      "bool ceil_mode, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor "
      "grad_bias)");

  // Training dropout with a counter-based mask (philox.h): the mask is a function of the seed
  // and each element's index, so the backward is the same op on the gradient.
  m.def("dropout(Tensor input, Tensor seed, float p=0.5) -> Tensor");

  m.def(
      "batch_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight=None, Tensor? bias=None, bool training=False, float momentum=0.1, "
      "float eps=1e-05) -> Tensor");
  m.def(
      "_batch_norm_forward(Tensor input, Tensor? mean, Tensor? var, Tensor? weight, "
      "Tensor? bias, bool training, float eps) -> (Tensor output, Tensor save_mean, "
      "Tensor save_var)");
  m.def(
      "_batch_norm_backward(Tensor grad_output, Tensor input, Tensor save_mean, "
      "Tensor save_var, Tensor? weight, bool training, float eps, bool[3] output_mask) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "_batch_norm_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor save_mean, Tensor save_var, float momentum, SymInt count) -> ()");

  m.def(
      "conv2d_batch_norm_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? bn_weight, Tensor? bn_bias, "
      "bool training=False, float momentum=0.1, float eps=1e-05, int[2] stride=1, "
      "int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], bool ceil_mode=False) "
      "-> Tensor");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_training(Tensor input, Tensor weight, Tensor? bias, "
      "Tensor? bn_weight, Tensor? bn_bias, float eps, int[2] stride, int[2] padding, "
      "int[2] pool_size, int[2] pool_stride, bool ceil_mode) -> (Tensor output, "
      "Tensor argmax, Tensor conv_output, Tensor save_mean, Tensor save_var)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_training_backward(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor conv_output, Tensor save_mean, Tensor save_var, Tensor? bn_weight, "
      "Tensor argmax, float eps, int[2] stride, int[2] padding, int[2] pool_size, "
      "int[2] pool_stride, bool ceil_mode, bool[5] output_mask) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");

  // The phases of both batch norms, for synchronized batch norm (cifarnet/_sync_batch_norm.py
  // combines their per-process results over the process group between the calls): statistics
  // (mean and biased variance, in the statistics dtype) of this process's part of the batch;
  // the normalisation with the whole batch's statistics (for the batch norm op, that phase is
  // _batch_norm_forward in evaluation mode); the backward's two per-channel sums over this
  // process's part; and the gradients from the whole batch's sums and count.
  m.def("_batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "_batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "_batch_norm_backward_elementwise(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor var, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, int count, float eps) "
      "-> Tensor grad_input");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_stats(Tensor input, Tensor weight, Tensor? bias, "
      "int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode) "
      "-> (Tensor conv_output, Tensor mean, Tensor var)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_epilogue(Tensor input, Tensor weight, "
      "Tensor conv_output, Tensor mean, Tensor var, Tensor? bn_weight, Tensor? bn_bias, "
      "float eps, int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, "
      "bool ceil_mode) -> (Tensor output, Tensor argmax)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_backward_reduce(Tensor grad_output, Tensor input, "
      "Tensor weight, Tensor conv_output, Tensor save_mean, Tensor argmax, int[2] stride, "
      "int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "_conv2d_batch_norm_relu_max_pool2d_backward_elementwise(Tensor grad_output, "
      "Tensor input, Tensor weight, Tensor conv_output, Tensor save_mean, Tensor save_var, "
      "Tensor? bn_weight, Tensor argmax, Tensor sum_dy, Tensor sum_dy_xmu, int count, float eps, "
      "int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, bool ceil_mode, "
      "bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeImplicitAutograd, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_composite);
  m.impl("batch_norm", &batch_norm_composite);
  m.impl("conv2d_batch_norm_relu_max_pool2d", &conv2d_batch_norm_relu_max_pool2d_composite);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCUDA, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax",
         &conv2d_relu_max_pool2d_with_argmax_autocast<at::kCUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autocast<at::kCUDA,
                                                              c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCPU, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax",
         &conv2d_relu_max_pool2d_with_argmax_autocast<at::kCPU, c10::DispatchKey::AutocastCPU>);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autocast<at::kCPU,
                                                              c10::DispatchKey::AutocastCPU>);
}

// In-place updates of small per-channel tensors with ATen ops, for devices without a kernel of
// their own (the CPU has a loop, batch_norm_kernel.cpp).
TORCH_LIBRARY_IMPL(cifarnet, CompositeExplicitAutograd, m) {
  m.impl("_batch_norm_update_running_stats", &batch_norm_update_running_stats);
}

}  // namespace cifarnet::ops
