// The autograd formula of batch norm (on _batch_norm_forward, of which the public op is a
// composite). The forward saves the input, the batch statistics and the weight, never the
// normalised output, and the dtypes the affine parameters' gradients take.

#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "../batch_norm_common.h"
#include "../internal_op.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& mean, const OptionalTensor& var,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op =
        internal_op<Tensor3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                            const OptionalTensor&, const OptionalTensor&, bool, double)>(
            "cifarnet::_batch_norm_forward");
    auto [output, save_mean, save_var] = op.call(input, mean, var, weight, bias, training, eps);
    ctx->mark_non_differentiable({save_mean, save_var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, save_mean, save_var, value_or_undefined(weight)});
    ctx->saved_data["training"] = training;
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
    variable_list grads(7);
    if (!grad_outputs[0].defined() || !any(output_mask)) return grads;
    static auto op = internal_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, const OptionalTensor&, bool, double,
                                         std::array<bool, 3>)>("cifarnet::_batch_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    std::tie(grads[0], grads[3], grads[4]) = op.call(
        grad_outputs[0], saved[0], saved[1], saved[2], saved[3],
        ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(), output_mask);
    std::tie(grads[3], grads[4]) = in_parameter_grad_dtypes(ctx, grads[3], grads[4]);
    return grads;
  }
};

Tensor3 batch_norm_forward_autograd(const at::Tensor& input, const OptionalTensor& mean,
                                    const OptionalTensor& var, const OptionalTensor& weight,
                                    const OptionalTensor& bias, bool training, double eps) {
  const variable_list outputs =
      BatchNormFunction::apply(input, mean, var, weight, bias, training, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("_batch_norm_forward", &batch_norm_forward_autograd);
}

}  // namespace cifarnet::ops
