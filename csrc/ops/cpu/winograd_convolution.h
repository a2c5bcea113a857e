#pragma once
// The CPU convolution of the batch-norm chain: Winograd F(2x2, 5x5) where it applies and pays,
// oneDNN (at::convolution) everywhere else.

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "../conv_pool_geometry.h"

namespace cifarnet::ops {

// Whether conv2d(input, weight) with this stride and padding runs as Winograd F(2x2, 5x5): a
// float32 5x5 convolution with stride 1 and padding at most 4 on an image every filter element
// meets, with enough channels that the transformed product takes under half of direct
// convolution's multiplies (not conv1's three input channels), on a CPU of the AVX2 class.
// CIFARNET_CONV_ALGORITHM (read at each call) overrides: "native" never, "winograd" on any CPU
// with AVX2 (AVX-512 ones included), "auto" (or unset) as above.
bool winograd_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding);

// The same for a float32 CPU convolution of these sizes (kernel, stride, padding: {h, w}).
bool winograd_applies_to_sizes(int64_t channels, int64_t out_channels, int64_t height,
                               int64_t width, at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding);

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
