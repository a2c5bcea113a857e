// Autograd formulas of the ops, in C++ at the dispatcher's Autograd key, as native ops have
// them: C++ callers (ops.h) get gradients without Python, and a training step pays no Python
// round trip per op (a Python-registered formula costs tens of microseconds a call, which is
// a tenth of a batch norm of the study's deepest layer).
//
// Each forward saves only what its backward op needs: for conv2d -> ReLU -> max_pool2d the
// input, the weight and the one-byte window argmax (never the pre-pool activation); for the
// fused conv -> batch norm chain also the pre-normalisation convolution output and the batch
// statistics (never the normalised or the ReLU output).

#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "batch_norm_common.h"
#include "internal_op.h"
#include "ops.h"

namespace cifarnet::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensor5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Which arguments want a gradient. AutogradContext::needs_input_grad counts only the tensor
// arguments that were given (the graph's edges), so the positions of the optional ones shift;
// `given[i]` says whether argument i is a tensor that was given.
template <size_t N>
std::array<bool, N> needs_grad(const AutogradContext* ctx, const std::array<bool, N>& given) {
  std::array<bool, N> needs{};
  size_t edge = 0;
  for (size_t i = 0; i < N; ++i) {
    if (given[i]) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

template <size_t N>
bool any(const std::array<bool, N>& flags) {
  for (bool flag : flags) {
    if (flag) return true;
  }
  return false;
}

at::Tensor value_or_undefined(const OptionalTensor& t) { return t.value_or(at::Tensor()); }

class Conv2dReLUMaxPool2dFunction : public torch::autograd::Function<Conv2dReLUMaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptionalTensor& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                               bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, argmax] = conv2d_relu_max_pool2d_with_argmax(input, weight, bias, stride,
                                                               padding, pool_size, pool_stride,
                                                               ceil_mode);
    ctx->mark_non_differentiable({argmax});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight, argmax});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["pool_size"] = pool_size;
    ctx->saved_data["pool_stride"] = pool_stride;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["has_bias"] = defined(bias);
    return {output, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto needs = needs_grad<3>(ctx, {true, true, ctx->saved_data["has_bias"].toBool()});
    variable_list grads(8);
    if (!grad_outputs[0].defined() || !any(needs)) return grads;
    const variable_list saved = ctx->get_saved_variables();
    std::tie(grads[0], grads[1], grads[2]) = _conv2d_relu_max_pool2d_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["pool_size"].toIntVector(),
        ctx->saved_data["pool_stride"].toIntVector(), ctx->saved_data["ceil_mode"].toBool(),
        needs);
    return grads;
  }
};

class BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const OptionalTensor& mean, const OptionalTensor& var,
                               const OptionalTensor& weight, const OptionalTensor& bias,
                               bool training, double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = internal_op<Tensor3(const at::Tensor&, const OptionalTensor&,
                                     const OptionalTensor&, const OptionalTensor&,
                                     const OptionalTensor&, bool, double)>(
        "cifarnet::_batch_norm_forward");
    auto [output, save_mean, save_var] = op.call(input, mean, var, weight, bias, training, eps);
    ctx->mark_non_differentiable({save_mean, save_var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, save_mean, save_var, value_or_undefined(weight)});
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    // The running statistics are buffers: no gradient flows to them, even when given.
    ctx->saved_data["given"] = std::vector<bool>{defined(mean), defined(var), defined(weight),
                                                 defined(bias)};
    return {output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    const auto needs = needs_grad<5>(ctx, {true, given[0], given[1], given[2], given[3]});
    const std::array<bool, 3> output_mask{needs[0], needs[3], needs[4]};
    variable_list grads(7);
    if (!grad_outputs[0].defined() || !any(output_mask)) return grads;
    static auto op =
        internal_op<Tensor3(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const OptionalTensor&, bool, double,
                        std::array<bool, 3>)>("cifarnet::_batch_norm_backward");
    const variable_list saved = ctx->get_saved_variables();
    std::tie(grads[0], grads[3], grads[4]) =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3],
                ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                output_mask);
    return grads;
  }
};

class Conv2dBatchNormReLUMaxPool2dTrainingFunction
    : public torch::autograd::Function<Conv2dBatchNormReLUMaxPool2dTrainingFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptionalTensor& bias,
                               const OptionalTensor& bn_weight, const OptionalTensor& bn_bias,
                               double eps, at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                               bool ceil_mode) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static auto op = internal_op<Tensor5(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                     const OptionalTensor&, const OptionalTensor&, double,
                                     at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                     at::IntArrayRef, bool)>(
        "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training");
    auto [output, argmax, conv_output, save_mean, save_var] =
        op.call(input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size,
                pool_stride, ceil_mode);
    ctx->mark_non_differentiable({argmax, conv_output, save_mean, save_var});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({input, weight, conv_output, save_mean, save_var,
                            value_or_undefined(bn_weight), argmax});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["pool_size"] = pool_size;
    ctx->saved_data["pool_stride"] = pool_stride;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["given"] =
        std::vector<bool>{defined(bias), defined(bn_weight), defined(bn_bias)};
    return {output, argmax, conv_output, save_mean, save_var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    const auto needs = needs_grad<5>(ctx, {true, true, given[0], given[1], given[2]});
    variable_list grads(11);
    if (!grad_outputs[0].defined() || !any(needs)) return grads;
    static auto op =
        internal_op<Tensor5(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const OptionalTensor&, const at::Tensor&, double, at::IntArrayRef,
                        at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, bool,
                        std::array<bool, 5>)>(
            "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training_backward");
    const variable_list saved = ctx->get_saved_variables();
    std::tie(grads[0], grads[1], grads[2], grads[3], grads[4]) =
        op.call(grad_outputs[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                saved[6], ctx->saved_data["eps"].toDouble(),
                ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
                ctx->saved_data["pool_size"].toIntVector(),
                ctx->saved_data["pool_stride"].toIntVector(),
                ctx->saved_data["ceil_mode"].toBool(), needs);
    return grads;
  }
};

// Dropout is linear with a diagonal mask: its backward is the same op, same seed, on the
// gradient. Nothing but the seed is kept.
class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& seed,
                            double p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["p"] = p;
    return dropout(input, seed, p);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(3);
    if (grad_outputs[0].defined()) {
      grads[0] = dropout(grad_outputs[0], ctx->saved_data["seed"].toTensor(),
                         ctx->saved_data["p"].toDouble());
    }
    return grads;
  }
};

at::Tensor dropout_autograd(const at::Tensor& input, const at::Tensor& seed, double p) {
  return DropoutFunction::apply(input, seed, p);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax_autograd(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const variable_list outputs = Conv2dReLUMaxPool2dFunction::apply(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode);
  return {outputs[0], outputs[1]};
}

Tensor3 batch_norm_forward_autograd(const at::Tensor& input, const OptionalTensor& mean,
                                    const OptionalTensor& var, const OptionalTensor& weight,
                                    const OptionalTensor& bias, bool training, double eps) {
  const variable_list outputs =
      BatchNormFunction::apply(input, mean, var, weight, bias, training, eps);
  return {outputs[0], outputs[1], outputs[2]};
}

Tensor5 conv2d_batch_norm_relu_max_pool2d_training_autograd(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
    const OptionalTensor& bn_weight, const OptionalTensor& bn_bias, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const variable_list outputs = Conv2dBatchNormReLUMaxPool2dTrainingFunction::apply(
      input, weight, bias, bn_weight, bn_bias, eps, stride, padding, pool_size, pool_stride,
      ceil_mode);
  return {outputs[0], outputs[1], outputs[2], outputs[3], outputs[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax", &conv2d_relu_max_pool2d_with_argmax_autograd);
  m.impl("_batch_norm_forward", &batch_norm_forward_autograd);
  m.impl("dropout", &dropout_autograd);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_autograd);
}

}  // namespace cifarnet::ops
