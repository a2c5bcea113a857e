// Dropout: its schemas (the public op and the private forward and backward of its
// generator-drawn masks) and the C++ entry point that calls it through the dispatcher. Device
// kernels: cpu/ and cuda/dropout_kernel; autograd: autograd/dropout.cpp.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace cifarnet::ops {

at::Tensor dropout(const at::Tensor& input, const std::optional<at::Tensor>& seed, double p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::dropout", "")
                       .typed<decltype(dropout)>();
  return op.call(input, seed, p);
}

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  // Training dropout with a counter-based mask (philox.h): the mask is a function of its key
  // and each element's index, so the backward recomputes it rather than keeping it. The key is
  // an explicit seed (a one-element int64 CPU tensor), or without one the next mask of the
  // input device's default generator: on CUDA its Philox seed and offset, read on the device.
  // NB: nondeterministic_seeded, as native dropout: torch.compile neither folds it into a
  // constant nor recomputes it in the backward, and keeps its order with the other random ops.
  m.def("dropout(Tensor input, Tensor? seed=None, float p=0.5) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // The autograd formula's forward for a generator's mask: the output, and the (seed, offset)
  // the mask was drawn at (int64 Tensor[2] on the input's device) for _dropout_backward.
  m.def("_dropout_forward(Tensor input, float p) -> (Tensor output, Tensor seed_offset)",
        {at::Tag::nondeterministic_seeded});
  m.def("_dropout_backward(Tensor grad_output, Tensor seed_offset, float p) -> Tensor");
}

}  // namespace cifarnet::ops
