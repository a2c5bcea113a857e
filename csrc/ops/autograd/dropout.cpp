// The autograd formula of dropout.

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

// Dropout is linear with a diagonal mask: its backward is the same op, same seed, on the
// gradient (through the dispatcher, so with create_graph=True it is differentiable again).
// Nothing but a copy of the seed is kept.
class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& seed,
                            double p) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->set_materialize_grads(false);
    // NB: a copy of the seed, rather than the caller's tensor (an in-place change of which
    // would give the backward another mask) or save_for_backward's version check (which would
    // make that change an error): advancing one seed tensor in place for the next layer or step
    // is a natural way to draw masks, and the gradient of the forward that ran is well defined,
    // as native dropout's is with its saved mask. A one-element copy costs nothing.
    ctx->saved_data["seed"] = seed.clone();
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
  return DropoutFunction::apply(input, seed, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace cifarnet::ops
