#pragma once
// What the ops' autograd formulas (csrc/ops/autograd/<op>.cpp) share.
//
// The formulas are in C++, at the dispatcher's Autograd key, as native ops have them: C++
// callers (ops.h) get gradients without Python, and a training step pays no Python round trip
// per op (a Python-registered formula costs tens of microseconds a call, which is a tenth of a
// batch norm of the study's deepest layer). Each forward saves only what its backward op needs.

#include <torch/autograd.h>

#include <array>
#include <cstddef>
#include <optional>
#include <tuple>

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
