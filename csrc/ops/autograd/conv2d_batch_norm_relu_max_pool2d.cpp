// The autograd formula of conv2d -> batch norm -> ReLU -> max_pool2d (on its fused training op;
// evaluation folds the batch norm into the convolution, through which autograd flows). The
// forward saves the input, the parameters, the one-byte window argmax, the pre-normalisation
// convolution output and the batch statistics, never the normalised or the ReLU output, and the
// dtypes the batch norm's parameters' gradients take.

#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../batch_norm_common.h"
#include "../internal_op.h"
#include "../native_composition.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// cifarnet::_conv2d_batch_norm_relu_max_pool2d_training's device kernels (below autograd).
Tensor5 training_kernel(const at::Tensor& input, const at::Tensor& weight,
                        const OptionalTensor& bias, const OptionalTensor& bn_weight,
                        const OptionalTensor& bn_bias, double eps, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef pool_size,
                        at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  static auto op = internal_op<Tensor5(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                       const OptionalTensor&, const OptionalTensor&, double,
                                       at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                       at::IntArrayRef, bool, at::IntArrayRef)>(
      "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size,
                 pool_stride, ceil_mode, pool_padding);
}

// The chain in training as native composes it, without running statistics.
at::Tensor composed_training_chain(const at::Tensor& input, const at::Tensor& weight,
                                   const OptionalTensor& bias, const OptionalTensor& bn_weight,
                                   const OptionalTensor& bn_bias, double eps,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                                   bool ceil_mode, at::IntArrayRef pool_padding) {
  return composed_conv2d_batch_norm_relu_max_pool2d(
      input, weight, bias, std::nullopt, std::nullopt, bn_weight, bn_bias, /*training=*/true,
      /*momentum=*/0.0, eps, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
}

class Conv2dBatchNormReLUMaxPool2dTrainingFunction
    : public torch::autograd::Function<Conv2dBatchNormReLUMaxPool2dTrainingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                               double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                               bool ceil_mode, at::IntArrayRef pool_padding) {
    auto [output, argmax, conv_output, save_mean, save_var] =
        training_kernel(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size,
                        pool_stride, ceil_mode, pool_padding);
    ctx->mark_non_differentiable({argmax, conv_output, save_mean, save_var});
    ctx->set_materialize_grads(false);
    // NB: the biases only for a differentiable backward, which recomputes the chain.
    ctx->save_for_backward({input, weight, conv_output, save_mean, save_var,
                            value_or_undefined(bn_weight), argmax, value_or_undefined(bias),
                            value_or_undefined(bn_bias)});
    ctx->saved_data["eps"] = eps;
    save_parameter_grad_dtypes(ctx, parameter_grad_dtype(bn_weight, input),
                               parameter_grad_dtype(bn_bias, input));
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["pool_size"] = pool_size;
    ctx->saved_data["pool_stride"] = pool_stride;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["pool_padding"] = pool_padding;
    ctx->saved_data["given"] =
        std::vector<bool>{defined(bias), defined(bn_weight), defined(bn_bias)};
    return {output, argmax, conv_output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    const auto needs = needs_grad<5>(ctx, {true, true, given[0], given[1], given[2]});
    variable_list grads(12);
    if (!grad_outputs[0].defined() || !any(needs)) return grads;
    static auto op = internal_op<Tensor5(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
        const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&, double,
        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool, at::IntArrayRef,
        std::array<bool, 5>)>("cifarnet::_conv2d_batch_norm_relu_max_pool2d_training_backward");
    const variable_list saved = ctx->get_saved_variables();
    if (backward_needs_graph(saved, grad_outputs)) {
      at::AutoGradMode grad_mode(true);
      const at::Tensor output = composed_training_chain(
          saved[0], saved[1], saved[7], saved[5], saved[8], ctx->saved_data["eps"].toDouble(),
          ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["pool_size"].toIntVector(), ctx->saved_data["pool_stride"].toIntVector(),
          ctx->saved_data["ceil_mode"].toBool(), ctx->saved_data["pool_padding"].toIntVector());
      const variable_list found = native_composition_grads(
          output, grad_outputs[0], {saved[0], saved[1], saved[7], saved[5], saved[8]}, needs);
      std::copy(found.begin(), found.end(), grads.begin());
      return grads;
    }
    std::tie(grads[0], grads[1], grads[2], grads[3], grads[4]) = op.call(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["pool_size"].toIntVector(),
        ctx->saved_data["pool_stride"].toIntVector(), ctx->saved_data["ceil_mode"].toBool(),
        ctx->saved_data["pool_padding"].toIntVector(), needs);
    std::tie(grads[3], grads[4]) = in_parameter_grad_dtypes(ctx, grads[3], grads[4]);
    return grads;
  }
};

Tensor5 conv2d_batch_norm_relu_max_pool2d_training_autograd(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  if (forward_needs_native_composition({input, weight, value_or_undefined(bias),
                                        value_or_undefined(bn_weight),
                                        value_or_undefined(bn_bias)})) {
    // The argmax, convolution output and statistics from the kernels; the output, with its
    // tangent or transform, from native.
    Tensor5 outputs = training_kernel(input, weight, bias, bn_weight, bn_bias, eps, stride, padding,
                                      pool_size, pool_stride, ceil_mode, pool_padding);
    std::get<0>(outputs) =
        composed_training_chain(input, weight, bias, bn_weight, bn_bias, eps, stride, padding,
                                pool_size, pool_stride, ceil_mode, pool_padding);
    return outputs;
  }
  const variable_list outputs = Conv2dBatchNormReLUMaxPool2dTrainingFunction::apply(
      input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride,
      ceil_mode, pool_padding);
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autograd);
}

}  // namespace cifarnet::ops
