// The autograd formula of conv2d -> ReLU -> max_pool2d (on conv2d_relu_max_pool2d_with_argmax,
// of which the public op is a composite). The forward saves the input, the weight, the bias and
// the one-byte window argmax, never the pre-pool activation.

#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "../batch_norm_common.h"
#include "../native_composition.h"
#include "../ops.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

class Conv2dReLUMaxPool2dFunction : public torch::autograd::Function<Conv2dReLUMaxPool2dFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input,
                               const at::Tensor& weight, const OptionalTensor& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                               bool ceil_mode, at::IntArrayRef pool_padding) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [output, argmax] = conv2d_relu_max_pool2d_with_argmax(
        input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
    ctx->mark_non_differentiable({argmax});
    ctx->set_materialize_grads(false);
    // NB: the bias only for a differentiable backward, which recomputes the convolution.
    ctx->save_for_backward({input, weight, argmax, value_or_undefined(bias)});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["pool_size"] = pool_size;
    ctx->saved_data["pool_stride"] = pool_stride;
    ctx->saved_data["ceil_mode"] = ceil_mode;
    ctx->saved_data["pool_padding"] = pool_padding;
    ctx->saved_data["has_bias"] = defined(bias);
    return {output, argmax};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto needs = needs_grad<3>(ctx, {true, true, ctx->saved_data["has_bias"].toBool()});
    variable_list grads(9);
    if (!grad_outputs[0].defined() || !any(needs)) return grads;
    const variable_list saved = ctx->get_saved_variables();
    if (backward_needs_graph(saved, grad_outputs)) {
      at::AutoGradMode grad_mode(true);
      const at::Tensor output = composed_conv2d_relu_max_pool2d(
          saved[0], saved[1], saved[3], ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector(), ctx->saved_data["pool_size"].toIntVector(),
          ctx->saved_data["pool_stride"].toIntVector(), ctx->saved_data["ceil_mode"].toBool(),
          ctx->saved_data["pool_padding"].toIntVector());
      const variable_list found =
          native_composition_grads(output, grad_outputs[0], {saved[0], saved[1], saved[3]}, needs);
      std::copy(found.begin(), found.end(), grads.begin());
      return grads;
    }
    std::tie(grads[0], grads[1], grads[2]) = _conv2d_relu_max_pool2d_backward(
        grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["stride"].toIntVector(),
        ctx->saved_data["padding"].toIntVector(), ctx->saved_data["pool_size"].toIntVector(),
        ctx->saved_data["pool_stride"].toIntVector(), ctx->saved_data["ceil_mode"].toBool(),
        ctx->saved_data["pool_padding"].toIntVector(), needs);
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax_autograd(
    const at::Tensor& input, const at::Tensor& weight, const OptionalTensor& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  if (forward_needs_native_composition({input, weight, value_or_undefined(bias)})) {
    at::Tensor argmax;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      argmax = std::get<1>(conv2d_relu_max_pool2d_with_argmax(
          input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding));
    }
    return {composed_conv2d_relu_max_pool2d(input, weight, bias, stride, padding, pool_size,
                                            pool_stride, ceil_mode, pool_padding),
            argmax};
  }
  const variable_list outputs = Conv2dReLUMaxPool2dFunction::apply(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax", &conv2d_relu_max_pool2d_with_argmax_autograd);
}

}  // namespace cifarnet::ops
