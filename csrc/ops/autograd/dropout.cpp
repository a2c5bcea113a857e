// The autograd formula of dropout.

#include <torch/autograd.h>
#include <torch/library.h>

#include "../ops.h"
#include "autograd_common.h"

namespace cifarnet::ops {
namespace {

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

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, Autograd, m) { m.impl("dropout", &dropout_autograd); }

}  // namespace cifarnet::ops
