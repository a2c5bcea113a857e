// batch norm -> ReLU -> conv2d (a ResNet bottleneck's pre-convolution): its schemas (the public
// op, its private training op and backward), the C++ entry point that calls it through the
// dispatcher, and its composite, device-generic and autocast kernels. Autograd:
// autograd/batch_norm_relu_conv2d.cpp.
//
// Natively the backward keeps the batch norm's input and, as the convolution's input, the
// rectified tensor. This op keeps only the batch norm's input and statistics, and its backward
// recomputes the rectified tensor (one elementwise pass) where native reads it back. Its
// kernels are compositions of the library's batch-norm ops, with the ReLU fused into them
// (forward and backward), and ATen's convolution, so one kernel serves every device (and Meta);
// on the CPU a convolution Winograd applies to (cpu/winograd_convolution.h: ResNets' 3x3 ones
// on AVX2 CPUs) runs as Winograd instead.

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "batch_norm_common.h"
#include "batch_norm_running_stats.h"
#include "conv_pool_geometry.h"
#include "cpu/winograd_convolution.h"
#include "internal_op.h"
#include "native_composition.h"
#include "ops.h"

namespace cifarnet::ops {

at::Tensor batch_norm_relu_conv2d(const at::Tensor& input,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var,
                                  const std::optional<at::Tensor>& bn_weight,
                                  const std::optional<at::Tensor>& bn_bias,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool training, double momentum, double eps,
                                  at::IntArrayRef stride, at::IntArrayRef padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::batch_norm_relu_conv2d", "")
                       .typed<decltype(batch_norm_relu_conv2d)>();
  return op.call(input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training,
                 momentum, eps, stride, padding);
}

namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

c10::TypedOperatorHandle<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                 const at::Tensor&, const OptionalTensor&, double, at::IntArrayRef,
                                 at::IntArrayRef)>
training_op() {
  static auto op =
      internal_op<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                          const at::Tensor&, const OptionalTensor&, double, at::IntArrayRef,
                          at::IntArrayRef)>("cifarnet::_batch_norm_relu_conv2d_training");
  return op;
}

// The checks the public op can make of symbolic sizes (torch.compile traces it): ranks, the
// per-channel tensors of the batch norm against the input, and the channels the convolution
// expects. The private ops check the rest with concrete sizes.
void check_public_args(const at::Tensor& input, const OptionalTensor& running_mean,
                       const OptionalTensor& running_var, const OptionalTensor& bn_weight,
                       const OptionalTensor& bn_bias, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 4, "input must be a 4-D tensor (N, C_in, H, W), got ", input.dim(),
              "-D tensor of shape ", shape_string(input));
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (C_out, C_in, kH, kW), got ",
              weight.dim(), "-D tensor of shape ", shape_string(weight));
  TORCH_SYM_CHECK(input.sym_size(1).sym_eq(weight.sym_size(1)), "input has ", input.sym_size(1),
                  " channels but weight of shape ", shape_string(weight), " expects ",
                  weight.sym_size(1), " input channels");
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
  check_per_channel(bn_weight, "bn_weight", input);
  check_per_channel(bn_bias, "bn_bias", input);
}

// The private ops' checks: the public op's, and the convolution's dtypes, devices and
// geometry, with messages that name the argument and the value.
void check_training_args(const at::Tensor& input, const OptionalTensor& bn_weight,
                         const OptionalTensor& bn_bias, const at::Tensor& weight,
                         const OptionalTensor& bias, at::IntArrayRef stride,
                         at::IntArrayRef padding) {
  check_public_args(input, std::nullopt, std::nullopt, bn_weight, bn_bias, weight);
  check_floating_dtype(input, "input");
  check_conv_parameters(input, weight, bias);
  check_conv_stride_padding(stride, padding);
  TORCH_CHECK(weight.size(2) > 0 && weight.size(3) > 0,
              "weight must have a non-empty kernel, got shape ", shape_string(weight));
  TORCH_CHECK(weight.size(2) <= input.size(2) + 2 * padding[0] &&
                  weight.size(3) <= input.size(3) + 2 * padding[1],
              "weight kernel ", weight.size(2), "x", weight.size(3),
              " is larger than the padded input ", input.size(2) + 2 * padding[0], "x",
              input.size(3) + 2 * padding[1], " (input ", input.size(2), "x", input.size(3),
              ", padding ", padding, ")");
}

// relu(batch_norm(input)) with the given statistics (mean and biased variance, statistics
// dtype), rectified in the normalising pass itself.
// NB: the forward normalises through this too, with the batch statistics it has just computed,
// rather than with batch norm's training kernel: the backward's recomputation is then the same
// op on the same values, so its ReLU mask is the forward's bit for bit, on every device.
at::Tensor rectified_input(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                           const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                           double eps) {
  static auto normalise =
      internal_op<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                          const OptionalTensor&, const OptionalTensor&, bool, double, bool)>(
          "cifarnet::_batch_norm_forward");
  return std::get<0>(normalise.call(input, mean, var, bn_weight, bn_bias, /*training=*/false, eps,
                                    /*relu=*/true));
}

// conv2d(rectified, weight, bias) in native conv2d's output layout: Winograd where it applies
// (and every value is finite), ATen's convolution otherwise.
at::Tensor convolution(const at::Tensor& rectified, const at::Tensor& weight,
                       const OptionalTensor& bias, at::IntArrayRef stride,
                       at::IntArrayRef padding) {
  const at::MemoryFormat format = conv_output_memory_format(rectified, weight);
  if (auto output =
          winograd_convolution_where_it_applies(rectified, weight, bias, stride, padding)) {
    return output->contiguous(format);
  }
  return at::convolution(rectified, weight, bias, stride, padding, /*dilation=*/{1, 1},
                         /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1)
      .contiguous(format);
}

// Statistics with the batch-norm statistics op (double on the CPU, the accumulation type on
// CUDA: float32 for bfloat16/float16), the rectified tensor in a temporary freed on return, and
// the convolution, in native conv2d's output layout.
Tensor3 batch_norm_relu_conv2d_training_kernel(const at::Tensor& input,
                                               const OptionalTensor& bn_weight,
                                               const OptionalTensor& bn_bias,
                                               const at::Tensor& weight, const OptionalTensor& bias,
                                               double eps, at::IntArrayRef stride,
                                               at::IntArrayRef padding) {
  static auto statistics = internal_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>(
      "cifarnet::_batch_norm_stats");
  check_training_args(input, bn_weight, bn_bias, weight, bias, stride, padding);
  check_batch_norm_input(input, /*training=*/true);
  check_batch_norm_eps(eps, /*training=*/true);
  auto [save_mean, save_var] = statistics.call(input);
  const at::Tensor rectified = rectified_input(input, save_mean, save_var, bn_weight, bn_bias, eps);
  return {convolution(rectified, weight, bias, stride, padding), save_mean, save_var};
}

// The rectified tensor recomputed, the convolution's gradients, and batch norm's training
// backward, which takes the convolution's input gradient through the ReLU itself (from the
// rectified tensor, by threshold_backward's rule); the gradients of the convolution's input and
// weight in its layout, as native conv2d's. grad_bn_weight and grad_bn_bias in the statistics
// dtype, as _batch_norm_backward returns them.
Tensor5 batch_norm_relu_conv2d_training_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& save_mean,
    const at::Tensor& save_var, const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
    const at::Tensor& weight, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    std::array<bool, 5> output_mask) {
  static auto batch_norm_backward =
      internal_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const OptionalTensor&, bool, double,
                          std::array<bool, 3>, const OptionalTensor&)>(
          "cifarnet::_batch_norm_backward");
  check_training_args(input, bn_weight, bn_bias, weight, std::nullopt, stride, padding);
  check_per_channel(save_mean, "save_mean", input);
  check_per_channel(save_var, "save_var", input);
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input.size(0) &&
                  grad_output.size(1) == weight.size(0),
              "grad_output must be a 4-D tensor of ", input.size(0), " samples and ",
              weight.size(0), " channels, got shape ", shape_string(grad_output));
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  const bool batch_norm_grads = output_mask[0] || output_mask[1] || output_mask[2];
  at::Tensor grad_input, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias;
  if (!batch_norm_grads && !output_mask[3] && !output_mask[4]) {
    return {grad_input, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias};
  }
  const at::Tensor rectified = rectified_input(input, save_mean, save_var, bn_weight, bn_bias, eps);
  const at::MemoryFormat format = conv_output_memory_format(rectified, weight);
  at::Tensor grad_rectified;
  if (winograd_applies(rectified, weight, stride, padding)) {
    std::tie(grad_rectified, grad_weight, grad_bias) =
        cpu_convolution_grads(grad_output, rectified, weight, stride, padding,
                              {batch_norm_grads, output_mask[3], output_mask[4]});
  } else {
    std::tie(grad_rectified, grad_weight, grad_bias) = at::convolution_backward(
        grad_output, rectified, weight, at::IntArrayRef{weight.size(0)}, stride, padding,
        /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
        {batch_norm_grads, output_mask[3], output_mask[4]});
  }
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(format);
  if (batch_norm_grads) {
    std::tie(grad_input, grad_bn_weight, grad_bn_bias) = batch_norm_backward.call(
        grad_rectified.contiguous(format), input, save_mean, save_var, bn_weight,
        /*training=*/true, eps, {output_mask[0], output_mask[1], output_mask[2]}, rectified);
  }
  return {grad_input, grad_bn_weight, grad_bn_bias, grad_weight, grad_bias};
}

// Training: the private op (statistics, normalisation, ReLU and convolution, keeping no
// rectified tensor) and the running-statistics update batch_norm makes; an empty batch, which
// has no statistics, as native computes it. Evaluation: native's batch norm with the running
// statistics, ReLU and conv2d (nothing to save there that a training step would not).
at::Tensor batch_norm_relu_conv2d_composite(
    const at::Tensor& input, const OptionalTensor& running_mean, const OptionalTensor& running_var,
    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, const at::Tensor& weight,
    const OptionalTensor& bias, bool training, double momentum, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding) {
  check_public_args(input, running_mean, running_var, bn_weight, bn_bias, weight);
  check_batch_norm_eps(eps, training);
  check_batch_norm_input_dtype(input);
  check_running_stats_need_no_grad(running_mean, running_var);
  check_batch_norm_parameter_dtypes(input, {{"running_mean", running_mean},
                                            {"running_var", running_var},
                                            {"bn_weight", bn_weight},
                                            {"bn_bias", bn_bias}});
  if (!training || input.sym_numel() == 0) {
    TORCH_CHECK(training || (defined(running_mean) && defined(running_var)),
                "running_mean and running_var must be defined in evaluation mode");
    return composed_batch_norm_relu_conv2d(input, running_mean, running_var, bn_weight, bn_bias,
                                           weight, bias, training, momentum, eps, stride, padding);
  }
  check_batch_norm_input(input, training);
  auto [output, save_mean, save_var] =
      training_op().call(input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
  update_running_stats_if_given(running_mean, running_var, save_mean, save_var, momentum,
                                batch_norm_count(input));
  return output;
}

// Under autocast native runs batch norm, and so the ReLU, in the input's dtype and casts only
// the rectified tensor for the convolution. An input already in the autocast dtype (all of a
// 16-bit network's batch norms) takes the fused op with weight and bias cast, as autocast.h
// casts them; any other castable one (float32) gets native's composition under autocast, its
// meaning exactly, with the statistics for the running update from the statistics op.
template <c10::DeviceType device, c10::DispatchKey autocast_key>
Tensor3 batch_norm_relu_conv2d_training_autocast(const at::Tensor& input,
                                                 const OptionalTensor& bn_weight,
                                                 const OptionalTensor& bn_bias,
                                                 const at::Tensor& weight,
                                                 const OptionalTensor& bias, double eps,
                                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  if (input.scalar_type() != dtype && at::autocast::is_eligible(input, device)) {
    static auto statistics = internal_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>(
        "cifarnet::_batch_norm_stats");
    at::Tensor save_mean, save_var;
    {
      const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // the statistics are not differentiable
      std::tie(save_mean, save_var) = statistics.call(input);
    }
    const at::Tensor output =
        composed_batch_norm_relu_conv2d(input, std::nullopt, std::nullopt, bn_weight, bn_bias,
                                        weight, bias, /*training=*/true, /*momentum=*/0.0, eps,
                                        stride, padding);
    return {output, save_mean, save_var};
  }
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  return training_op().call(input, bn_weight, bn_bias,
                            at::autocast::cached_cast(dtype, weight, device),
                            at::autocast::cached_cast(dtype, bias, device), eps, stride, padding);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  m.def(
      "batch_norm_relu_conv2d(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? bn_weight, Tensor? bn_bias, Tensor weight, Tensor? bias, bool training=False, "
      "float momentum=0.1, float eps=1e-05, int[2] stride=1, int[2] padding=0) -> Tensor");
  m.def(
      "_batch_norm_relu_conv2d_training(Tensor input, Tensor? bn_weight, Tensor? bn_bias, "
      "Tensor weight, Tensor? bias, float eps, int[2] stride, int[2] padding) "
      "-> (Tensor output, Tensor save_mean, Tensor save_var)");
  // grad_bn_weight and grad_bn_bias come back in the statistics dtype (save_mean's): the
  // autograd formula gives each its parameter's dtype. The convolution's bias is no argument:
  // its gradient needs only its size, weight's first.
  m.def(
      "_batch_norm_relu_conv2d_training_backward(Tensor grad_output, Tensor input, "
      "Tensor save_mean, Tensor save_var, Tensor? bn_weight, Tensor? bn_bias, Tensor weight, "
      "float eps, int[2] stride, int[2] padding, bool[5] output_mask) -> (Tensor grad_input, "
      "Tensor grad_bn_weight, Tensor grad_bn_bias, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeImplicitAutograd, m) {
  m.impl("batch_norm_relu_conv2d", &batch_norm_relu_conv2d_composite);
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeExplicitAutograd, m) {
  m.impl("_batch_norm_relu_conv2d_training", &batch_norm_relu_conv2d_training_kernel);
  m.impl("_batch_norm_relu_conv2d_training_backward",
         &batch_norm_relu_conv2d_training_backward_kernel);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCUDA, m) {
  m.impl("_batch_norm_relu_conv2d_training",
         &batch_norm_relu_conv2d_training_autocast<at::kCUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCPU, m) {
  m.impl("_batch_norm_relu_conv2d_training",
         &batch_norm_relu_conv2d_training_autocast<at::kCPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace cifarnet::ops
