// The autograd formula of batch norm (on _batch_norm_forward, of which the public op is a
// composite). The forward saves the input, the batch statistics, the weight and the bias, never
// the normalised output, and the dtypes the affine parameters' gradients take. With its ReLU
// (relu=True) it saves the rectified output too, as native's ReLU does, and the backward takes
// the gradient through the ReLU in batch norm's own backward.

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

// cifarnet::_batch_norm_forward's device kernels (below autograd).
Tensor3 batch_norm_forward_kernel(const at::Tensor& input, const OptionalTensor& mean,
                                  const OptionalTensor& var, const OptionalTensor& weight,
                                  const OptionalTensor& bias, bool training, double eps,
                                  bool relu) {
  static auto op =
      internal_op<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                          const OptionalTensor&, const OptionalTensor&, bool, double, bool)>(
          "cifarnet::_batch_norm_forward");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input, mean, var, weight, bias, training, eps, relu);
}

// Native's batch norm, then its ReLU where `relu`: the differentiable composition.
at::Tensor composed_batch_norm_maybe_relu(const at::Tensor& input, const OptionalTensor& mean,
                                          const OptionalTensor& var, const OptionalTensor& weight,
                                          const OptionalTensor& bias, bool training, double eps,
                                          bool relu) {
  const at::Tensor output =
      composed_batch_norm(input, mean, var, weight, bias, training, /*momentum=*/0.0, eps);
  return relu ? at::relu(output) : output;
}

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& mean, const OptionalTensor& var,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               bool training, double eps, bool relu) {
    auto [output, save_mean, save_var] =
        batch_norm_forward_kernel(input, mean, var, weight, bias, training, eps, relu);
    ctx->mark_non_differentiable({save_mean, save_var});
    ctx->set_materialize_grads(false);
    // NB: the bias only for a differentiable backward, which recomputes the normalisation.
    ctx->save_for_backward({input, save_mean, save_var, value_or_undefined(weight),
                            value_or_undefined(bias), relu ? output : at::Tensor()});
    ctx->saved_data["training"] = training;
    // Evaluation saves the running statistics in the statistics dtype; a differentiable
    // backward gives them to native batch norm in their own.
    if (!training && defined(mean)) ctx->saved_data["running_dtype"] = mean->scalar_type();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["eps"] = eps;
    save_parameter_grad_dtypes(ctx, parameter_grad_dtype(weight, input),
                               parameter_grad_dtype(bias, input));
    // The running statistics are buffers: no gradient flows to them, even when given.
    ctx->saved_data["given"] =
        std::vector<bool>{defined(mean), defined(var), defined(weight), defined(bias)};
    return {output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    const auto needs = needs_grad<5>(ctx, {true, given[0], given[1], given[2], given[3]});
    const std::array<bool, 3> output_mask{needs[0], needs[3], needs[4]};
    variable_list grads(8);
    if (!grad_outputs[0].defined() || !any(output_mask)) return grads;
    static auto op = internal_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptionalTensor&, bool, double,
                                         std::array<bool, 3>, const OptionalTensor&)>(
        "cifarnet::_batch_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    const bool relu = ctx->saved_data["relu"].toBool();
    if (backward_needs_graph(saved, grad_outputs)) {
      at::AutoGradMode grad_mode(true);
      const bool training = ctx->saved_data["training"].toBool();
      // Evaluation's saved statistics are the running ones it normalised with.
      at::Tensor running_mean, running_var;
      if (!training) {
        const at::ScalarType dtype = ctx->saved_data["running_dtype"].toScalarType();
        running_mean = saved[1].to(dtype);
        running_var = saved[2].to(dtype);
      }
      const at::Tensor output = composed_batch_norm_maybe_relu(
          saved[0], running_mean, running_var, saved[3], saved[4], training,
          ctx->saved_data["eps"].toDouble(), relu);
      const variable_list found = native_composition_grads(
          output, grad_outputs[0], {saved[0], saved[3], saved[4]}, output_mask);
      std::tie(grads[0], grads[3], grads[4]) = std::tuple(found[0], found[1], found[2]);
      return grads;
    }
    std::tie(grads[0], grads[3], grads[4]) =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                output_mask, relu ? OptionalTensor(saved[5]) : std::nullopt);
    std::tie(grads[3], grads[4]) = in_parameter_grad_dtypes(ctx, grads[3], grads[4]);
    return grads;
  }
};

Tensor3 batch_norm_forward_autograd(const at::Tensor& input, const OptionalTensor& mean,
                                    const OptionalTensor& var, const OptionalTensor& weight,
                                    const OptionalTensor& bias, bool training, double eps,
                                    bool relu) {
  if (forward_needs_native_composition(
          {input, value_or_undefined(weight), value_or_undefined(bias)})) {
    // The statistics from the kernels; the output, with its tangent or transform, from native.
    Tensor3 outputs =
        batch_norm_forward_kernel(input, mean, var, weight, bias, training, eps, relu);
    std::get<0>(outputs) = composed_batch_norm_maybe_relu(
        input, training ? std::nullopt : mean, training ? std::nullopt : var, weight, bias,
        training, eps, relu);
    return outputs;
  }
  const variable_list outputs =
      BatchNormFunction::apply(input, mean, var, weight, bias, training, eps, relu);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("_batch_norm_forward", &batch_norm_forward_autograd);
}

}  // namespace cifarnet::ops
