// The autograd formula of batch norm -> ReLU -> conv2d (on its private training op; evaluation
// is native's composition, through which autograd flows). The forward saves the input, the
// parameters and the batch statistics, never the normalised or the rectified tensor, which the
// backward recomputes, and the dtypes the batch norm's parameters' gradients take.

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

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// cifarnet::_batch_norm_relu_conv2d_training's kernels (below autograd).
Tensor3 training_kernel(const at::Tensor& input, const OptionalTensor& bn_weight,
                        const OptionalTensor& bn_bias, const at::Tensor& weight,
                        const OptionalTensor& bias, double eps, at::IntArrayRef stride,
                        at::IntArrayRef padding) {
  static auto op =
      internal_op<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                          const at::Tensor&, const OptionalTensor&, double, at::IntArrayRef,
                          at::IntArrayRef)>("cifarnet::_batch_norm_relu_conv2d_training");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
}

// The chain in training as native composes it, without running statistics.
at::Tensor composed_training_chain(const at::Tensor& input, const OptionalTensor& bn_weight,
                                   const OptionalTensor& bn_bias, const at::Tensor& weight,
                                   const OptionalTensor& bias, double eps, at::IntArrayRef stride,
                                   at::IntArrayRef padding) {
  return composed_batch_norm_relu_conv2d(input, std::nullopt, std::nullopt, bn_weight, bn_bias,
                                         weight, bias, /*training=*/true, /*momentum=*/0.0, eps,
                                         stride, padding);
}

class BatchNormReLUConv2dTrainingFunction
    : public torch::autograd::Function<BatchNormReLUConv2dTrainingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                               const at::Tensor& weight, const OptionalTensor& bias, double eps,
                               at::IntArrayRef stride, at::IntArrayRef padding) {
    auto [output, save_mean, save_var] =
        training_kernel(input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
    ctx->mark_non_differentiable({save_mean, save_var});
    ctx->set_materialize_grads(false);
    // NB: the convolution's bias only for a differentiable backward, which recomputes the chain;
    // the batch norm's bias recomputes the rectified tensor.
    ctx->save_for_backward({input, save_mean, save_var, value_or_undefined(bn_weight),
                            value_or_undefined(bn_bias), weight, value_or_undefined(bias)});
    ctx->saved_data["eps"] = eps;
    save_parameter_grad_dtypes(ctx, parameter_grad_dtype(bn_weight, input),
                               parameter_grad_dtype(bn_bias, input));
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["given"] =
        std::vector<bool>{defined(bn_weight), defined(bn_bias), defined(bias)};
    return {output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    const auto needs = needs_grad<5>(ctx, {true, given[0], given[1], true, given[2]});
    variable_list grads(8);
    if (!grad_outputs[0].defined() || !any(needs)) return grads;
    const variable_list saved = ctx->get_saved_variables();
    const double eps = ctx->saved_data["eps"].toDouble();
    const std::vector<int64_t> stride = ctx->saved_data["stride"].toIntVector();
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    if (backward_needs_graph(saved, grad_outputs)) {
      at::AutoGradMode grad_mode(true);
      const at::Tensor output = composed_training_chain(saved[0], saved[3], saved[4], saved[5],
                                                        saved[6], eps, stride, padding);
      const variable_list found = native_composition_grads(
          output, grad_outputs[0], {saved[0], saved[3], saved[4], saved[5], saved[6]}, needs);
      std::copy(found.begin(), found.end(), grads.begin());
      return grads;
    }
    static auto op = internal_op<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptionalTensor&,
                                         const OptionalTensor&, const at::Tensor&, double,
                                         at::IntArrayRef, at::IntArrayRef, std::array<bool, 5>)>(
        "cifarnet::_batch_norm_relu_conv2d_training_backward");
    std::tie(grads[0], grads[1], grads[2], grads[3], grads[4]) =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], eps,
                stride, padding, needs);
    std::tie(grads[1], grads[2]) = in_parameter_grad_dtypes(ctx, grads[1], grads[2]);
    return grads;
  }
};

Tensor3 batch_norm_relu_conv2d_training_autograd(const at::Tensor& input,
                                                 const OptionalTensor& bn_weight,
                                                 const OptionalTensor& bn_bias,
                                                 const at::Tensor& weight,
                                                 const OptionalTensor& bias, double eps,
                                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  if (forward_needs_native_composition({input, value_or_undefined(bn_weight),
                                        value_or_undefined(bn_bias), weight,
                                        value_or_undefined(bias)})) {
    // The statistics from the kernels; the output, with its tangent or transform, from native.
    Tensor3 outputs =
        training_kernel(input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
    std::get<0>(outputs) =
        composed_training_chain(input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
    return outputs;
  }
  const variable_list outputs = BatchNormReLUConv2dTrainingFunction::apply(
      input, bn_weight, bn_bias, weight, bias, eps, stride, padding);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("_batch_norm_relu_conv2d_training", &batch_norm_relu_conv2d_training_autograd);
}

}  // namespace cifarnet::ops
