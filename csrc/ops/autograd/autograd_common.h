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

}  // namespace cifarnet::ops
