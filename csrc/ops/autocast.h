#pragma once
// The autocast rule of the convolution ops, shared by their AutocastCPU and AutocastCUDA
// kernels (conv2d_relu_max_pool2d.cpp, conv2d_batch_norm_relu_max_pool2d.cpp).

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/DispatchKey.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <optional>
#include <utility>

namespace cifarnet::ops {

// Under torch.autocast("cuda") and torch.autocast("cpu"), the convolution ops run in the
// autocast dtype (float16 or bfloat16), as F.conv2d does: input, weight and bias are cast to
// it; batch-norm parameters and statistics stay in float32, as native batch norm keeps them.
template <c10::DeviceType device, c10::DispatchKey autocast_key, typename Op, typename... Rest>
auto call_autocast(Op& op, const at::Tensor& input, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, Rest&&... rest) {
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(device);
  return op.call(at::autocast::cached_cast(dtype, input, device),
                 at::autocast::cached_cast(dtype, weight, device),
                 at::autocast::cached_cast(dtype, bias, device), std::forward<Rest>(rest)...);
}

}  // namespace cifarnet::ops
