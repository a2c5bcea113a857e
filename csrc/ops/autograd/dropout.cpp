// The autograd formula of dropout.

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../internal_op.h"
#include "../ops.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

// Dropout is linear with a diagonal mask: its backward applies the forward's mask to the
// gradient, recomputed from what keys it. Nothing but that key is kept: a copy of an explicit
// seed, or the (seed, offset) a generator's mask was drawn at, as _dropout_forward wrote it on
// the input's device (so a backward in a CUDA graph reads the offset of the replay it is in).
class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input,
                            const OptionalTensor& seed, double p) {
    static auto forward_op =
        internal_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, double)>(
            "cifarnet::_dropout_forward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    ctx->saved_data["p"] = p;
    if (seed.has_value()) {
      // NB: a copy of the seed, rather than the caller's tensor (an in-place change of which
      // would give the backward another mask) or save_for_backward's version check (which
      // would make that change an error): advancing one seed tensor in place for the next
      // layer or step is a natural way to draw masks, and the gradient of the forward that
      // ran is well defined, as native dropout's is with its saved mask. A one-element copy
      // costs nothing.
      ctx->saved_data["seed"] = seed->clone();
      return dropout(input, seed, p);
    }
    auto [output, seed_offset] = forward_op.call(input, p);
    ctx->saved_data["seed_offset"] = seed_offset;
    return output;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    variable_list grads(3);
    const at::Tensor& grad = grad_outputs[0];
    if (!grad.defined()) return grads;
    if (backward_needs_graph({}, grad_outputs)) {
      // Differentiable (create_graph=True, or a gradient with a tangent): the gradient times
      // the scaled mask, which native multiplication differentiates.
      at::AutoGradMode grad_mode(true);
      grads[0] = at::mul(grad, apply_forward_mask(ctx, at::ones_like(grad)));
    } else {
      grads[0] = apply_forward_mask(ctx, grad);
    }
    return grads;
  }

 private:
  // The forward's mask applied to `t` (below autograd): its kept elements scaled by
  // 1 / (1 - p), the others zeroed.
  static at::Tensor apply_forward_mask(AutogradContext* ctx, const at::Tensor& t) {
    static auto backward_op = internal_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>(
        "cifarnet::_dropout_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const double p = ctx->saved_data["p"].toDouble();
    const auto seed = ctx->saved_data.find("seed");
    if (seed != ctx->saved_data.end()) return dropout(t, seed->second.toTensor(), p);
    return backward_op.call(t, ctx->saved_data["seed_offset"].toTensor(), p);
  }
};

at::Tensor dropout_autograd(const at::Tensor& input, const OptionalTensor& seed, double p) {
  if (forward_needs_native_composition({input})) {
    // The input times the scaled mask (dropout of ones: scale or zero, in the input's dtype),
    // the product native dropout computes, so native's multiplication carries the tangent.
    at::Tensor scaled_mask;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      scaled_mask = dropout(at::ones_like(input), seed, p);
    }
    return at::mul(input, scaled_mask);
  }
  if (!(at::GradMode::is_enabled() && input.requires_grad())) {
    // No gradient to take: the op itself, which keeps no key (and stays one node for
    // torch.export and its ONNX translation).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dropout(input, seed, p);
  }
  return DropoutFunction::apply(input, seed, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace cifarnet::ops
