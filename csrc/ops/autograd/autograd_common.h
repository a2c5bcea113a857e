#pragma once
// What the ops' autograd formulas (csrc/ops/autograd/<op>.cpp) share.
//
// The formulas are in C++, at the dispatcher's Autograd key, as native ops have them: C++
// callers (ops.h) get gradients without Python, and a training step pays no Python round trip
// per op (a Python-registered formula costs tens of microseconds a call, which is a tenth of a
// batch norm of the study's deepest layer). Each forward saves only what its backward op needs.
//
// The fused formulas give first derivatives. Everything else autograd offers -- second
// derivatives (create_graph=True), forward-mode AD, torch.func transforms -- goes through each
// op's native composition (conv2d, batch_norm, relu, max_pool2d: ATen ops with every formula):
// a forward with a tangent or inside a transform runs as that composition, and a backward that
// must itself be differentiable recomputes the composition and differentiates it.

#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <vector>

namespace cifarnet::ops {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;

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

inline at::Tensor value_or_undefined(const OptionalTensor& t) { return t.value_or(at::Tensor()); }

// Whether `t` is a dual tensor of forward-mode AD. Level 0, as ATen's generated autograd
// kernels ask: torch.autograd.forward_ad has one level, and torch.func.jvp maps its own onto it.
inline bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(0).defined(); }

// Whether a torch.func transform (grad, vjp, jvp, vmap) is running, which refuses C++ autograd
// Functions: asked of the check Function::apply itself runs, which throws inside a transform.
// NB: the public way to ask; ATen/functorch/DynamicLayer.h, which could tell directly, needs
// headers torch does not ship.
inline bool inside_torch_func_transform() {
  const auto& functorch_state = at::functorch::functorchTLSAccessor();
  if (!functorch_state) return false;  // no transform ever ran on this thread
  try {
    functorch_state->checkSupportsCppAutogradFunction();
    return false;
  } catch (const c10::Error&) {
    return true;
  }
}

// Whether an op's forward must run as its native composition rather than its fused autograd
// Function: with a tangent on any input (a C++ Function has no jvp), or inside a torch.func
// transform.
inline bool forward_needs_native_composition(std::initializer_list<at::Tensor> inputs) {
  return std::any_of(inputs.begin(), inputs.end(), has_tangent) || inside_torch_func_transform();
}

// Whether a backward must itself be differentiable: it runs with create_graph=True (grad mode
// on), or what it reads carries tangents (forward-over-reverse).
inline bool backward_needs_graph(const variable_list& saved, const variable_list& grad_outputs) {
  return at::GradMode::is_enabled() || std::any_of(saved.begin(), saved.end(), has_tangent) ||
         std::any_of(grad_outputs.begin(), grad_outputs.end(), has_tangent);
}

// The differentiable backward: the gradients of `output`, the op's native composition
// recomputed from the saved inputs, with respect to those `inputs` that `needs` asks for (the
// rest undefined), as a graph that can be differentiated again.
template <size_t N>
variable_list native_composition_grads(const at::Tensor& output, const at::Tensor& grad_output,
                                       const variable_list& inputs,
                                       const std::array<bool, N>& needs) {
  TORCH_INTERNAL_ASSERT(inputs.size() == N);
  variable_list wanted;
  std::vector<size_t> positions;
  for (size_t i = 0; i < N; ++i) {
    if (needs[i] && inputs[i].defined() && inputs[i].requires_grad()) {
      wanted.push_back(inputs[i]);
      positions.push_back(i);
    }
  }
  variable_list grads(N);
  if (wanted.empty() || !output.requires_grad()) return grads;
  const variable_list found = torch::autograd::grad({output}, wanted, {grad_output},
                                                    /*retain_graph=*/true, /*create_graph=*/true,
                                                    /*allow_unused=*/true);
  for (size_t k = 0; k < positions.size(); ++k) grads[positions[k]] = found[k];
  return grads;
}

// The batch-norm formulas (batch norm, and the fused conv -> batch norm chain) save the dtypes
// the affine parameters' gradients take, and give them those: their backward ops return the
// gradients in the statistics dtype, for they see the weight but not the bias.
// NB: each parameter's own dtype, as native's: a float32 bias of bfloat16 data gets float32's
// dtype and precision whether or not there is a weight, and whatever the weight's dtype.
inline void save_parameter_grad_dtypes(AutogradContext* ctx, at::ScalarType weight_dtype,
                                       at::ScalarType bias_dtype) {
  ctx->saved_data["weight_grad_dtype"] = weight_dtype;
  ctx->saved_data["bias_grad_dtype"] = bias_dtype;
}

inline std::tuple<at::Tensor, at::Tensor> in_parameter_grad_dtypes(AutogradContext* ctx,
                                                                   const at::Tensor& grad_weight,
                                                                   const at::Tensor& grad_bias) {
  auto in_dtype = [](const at::Tensor& grad, const at::IValue& dtype) {
    return grad.defined() ? grad.to(dtype.toScalarType()) : grad;
  };
  return {in_dtype(grad_weight, ctx->saved_data["weight_grad_dtype"]),
          in_dtype(grad_bias, ctx->saved_data["bias_grad_dtype"])};
}

}  // namespace cifarnet::ops
