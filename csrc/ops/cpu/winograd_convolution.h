#pragma once
// Winograd F(2x2, 5x5) and F(4x4, 3x3) convolutions on the CPU, where they apply and pay: the
// batch-norm chain's convolution and its gradients, conv -> ReLU -> pool's forward, and batch
// norm -> ReLU -> conv's convolution and its gradients. oneDNN (at::convolution) everywhere
// else.

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "../conv_pool_geometry.h"

namespace cifarnet::ops {

// Whether conv2d(input, weight) with this stride and padding runs as Winograd (F(2x2, 5x5) or
// F(4x4, 3x3)): a float32 (or bfloat16, which the AVX2 class has no arithmetic for: computed in
// float32 and rounded once) 5x5 or 3x3 convolution with stride 1 and padding at most r - 1 on
// an image every filter element meets, with enough channels and outputs that the transformed
// product takes under half of direct convolution's multiplies (not the study's conv1 with its
// three input channels, nor a 3x3 one on a 2x2 image) and few enough that a block of tiles
// fits in L2, on a CPU of the AVX2 class.
// CIFARNET_CONV_ALGORITHM (read at each call) overrides: "native" never, "winograd" on any CPU
// with AVX2 (AVX-512 ones included), "auto" (or unset) as above.
bool winograd_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding);

// The same for a float32 CPU convolution of these sizes (kernel, stride, padding: {h, w}).
bool winograd_applies_to_sizes(int64_t channels, int64_t out_channels, int64_t height,
                               int64_t width, at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding);

// A convolution's filters, transformed once for every tile (and every call) that uses them.
struct WinogradFilters {
  at::Tensor transformed;  // U[point][channels padded][out_channels padded], float32
  int64_t channels = 0, out_channels = 0, kernel = 0;
};

// The filters of a [out_channels][channels][r][r] float32 weight (r = 3 or 5, any strides).
WinogradFilters winograd_filters(const at::Tensor& weight);

// conv2d(input, weight, bias, stride 1, padding) as Winograd, channels last, where
// winograd_applies; nullopt where an input, filter or output value was not finite (the caller
// then runs oneDNN, whose NaN and infinity pattern the transforms would not reproduce).
std::optional<at::Tensor> winograd_convolution(const at::Tensor& input,
                                               const WinogradFilters& filters,
                                               const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef padding);

// winograd_convolution with the weight's filters where winograd_applies (and the batch is not
// empty); nullopt where it does not apply or a value was not finite: the caller runs oneDNN.
std::optional<at::Tensor> winograd_convolution_where_it_applies(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding);

// channels_last_convolution (../convolution.h) on the CPU.
at::Tensor cpu_channels_last_convolution(const at::Tensor& input, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const ConvPoolGeometry& g, at::IntArrayRef stride,
                                         at::IntArrayRef padding);

// convolution_grads (../convolution.h) on the CPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_convolution_grads(
    const at::Tensor& grad_conv, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 3> output_mask);

}  // namespace cifarnet::ops
