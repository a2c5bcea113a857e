#pragma once
// The typed dispatcher handle of one of the library's ops (internal ones have no ops.h entry
// point), looked up by its qualified name, e.g. "cifarnet::_batch_norm_forward".

#include <ATen/core/dispatch/Dispatcher.h>

namespace cifarnet::ops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> internal_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace cifarnet::ops
