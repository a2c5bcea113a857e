// Dropout: its schema and the C++ entry point that calls it through the dispatcher. Device
// kernels: cpu/ and cuda/dropout_kernel; autograd: autograd/dropout.cpp.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "ops.h"

namespace cifarnet::ops {

at::Tensor dropout(const at::Tensor& input, const at::Tensor& seed, double p) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::dropout", "")
                       .typed<decltype(dropout)>();
  return op.call(input, seed, p);
}

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  // Training dropout with a counter-based mask (philox.h): the mask is a function of the seed
  // and each element's index, so the backward is the same op on the gradient.
  m.def("dropout(Tensor input, Tensor seed, float p=0.5) -> Tensor");
}

}  // namespace cifarnet::ops
