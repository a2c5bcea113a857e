// conv2d -> ReLU -> max_pool2d: its schemas, the C++ entry points that call them through the
// dispatcher, and its composite and autocast kernels. Device kernels: cpu/ and cuda/
// conv2d_relu_max_pool2d_kernel; autograd: autograd/conv2d_relu_max_pool2d.cpp.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "autocast.h"
#include "internal_op.h"
#include "ops.h"

namespace cifarnet::ops {

at::Tensor conv2d_relu_max_pool2d(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef pool_size,
                                  at::IntArrayRef pool_stride, bool ceil_mode,
                                  at::IntArrayRef pool_padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_relu_max_pool2d", "")
                       .typed<decltype(conv2d_relu_max_pool2d)>();
  return op.call(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode,
                 pool_padding);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::conv2d_relu_max_pool2d_with_argmax", "")
                       .typed<decltype(conv2d_relu_max_pool2d_with_argmax)>();
  return op.call(input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode,
                 pool_padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::_conv2d_relu_max_pool2d_backward", "")
                       .typed<decltype(_conv2d_relu_max_pool2d_backward)>();
  return op.call(grad_output, input, weight, argmax, stride, padding, pool_size, pool_stride,
                 ceil_mode, pool_padding, output_mask);
}

namespace {

// NB: like native max_pool2d over max_pool2d_with_indices, the public op is a composite of the
// op that also returns the argmax; autograd, fake kernels and device kernels live on that one.
at::Tensor conv2d_relu_max_pool2d_composite(const at::Tensor& input, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias,
                                            at::IntArrayRef stride, at::IntArrayRef padding,
                                            at::IntArrayRef pool_size, at::IntArrayRef pool_stride,
                                            bool ceil_mode, at::IntArrayRef pool_padding) {
  return std::get<0>(conv2d_relu_max_pool2d_with_argmax(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding));
}

template <c10::DeviceType device, c10::DispatchKey autocast_key>
std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax_autocast(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  static auto op = internal_op<decltype(conv2d_relu_max_pool2d_with_argmax)>(
      "cifarnet::conv2d_relu_max_pool2d_with_argmax");
  return call_autocast<device, autocast_key>(op, input, weight, bias, stride, padding, pool_size,
                                             pool_stride, ceil_mode, pool_padding);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  // NB: pool_padding, added last with a default, keeps positional calls made before it valid;
  // the private ops take it at the same place, after ceil_mode.
  m.def(
      "conv2d_relu_max_pool2d(Tensor input, Tensor weight, Tensor? bias=None, int[2] stride=1, "
      "int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], bool ceil_mode=False, "
      "int[2] pool_padding=0) -> Tensor");
  m.def(
      "conv2d_relu_max_pool2d_with_argmax(Tensor input, Tensor weight, Tensor? bias=None, "
      "int[2] stride=1, int[2] padding=0, int[2] pool_size=2, int[2] pool_stride=[], "
      "bool ceil_mode=False, int[2] pool_padding=0) -> (Tensor output, Tensor argmax)");
  m.def(
      "_conv2d_relu_max_pool2d_backward(Tensor grad_output, Tensor input, Tensor weight, "
      "Tensor argmax, int[2] stride, int[2] padding, int[2] pool_size, int[2] pool_stride, "
      "bool ceil_mode, int[2] pool_padding, bool[3] output_mask) -> (Tensor grad_input, "
      "Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeImplicitAutograd, m) {
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_composite);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCUDA, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax",
         &conv2d_relu_max_pool2d_with_argmax_autocast<at::kCUDA, c10::DispatchKey::AutocastCUDA>);
}

TORCH_LIBRARY_IMPL(cifarnet, AutocastCPU, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax",
         &conv2d_relu_max_pool2d_with_argmax_autocast<at::kCPU, c10::DispatchKey::AutocastCPU>);
}

}  // namespace cifarnet::ops
