#pragma once
// C++ API of the cifarnet ops. Each function calls the op through the PyTorch dispatcher, so it
// gets the device kernel, autograd (csrc/ops/autograd/) and any active mode, exactly as
// torch.ops.cifarnet.<op> does from Python.

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace cifarnet::ops {

// max_pool2d(relu(conv2d(input, weight, bias, stride, padding)), pool_size, pool_stride,
// pool_padding, ceil_mode=ceil_mode). input: Tensor[N, C_in, H, W]; weight: Tensor[C_out, C_in,
// kH, kW]; bias: Tensor[C_out] or nullopt; float32, float64, bfloat16 or float16 (16-bit data
// computed in float32). An empty pool_stride means pool_size; pool_padding (at most half of
// pool_size, as max_pool2d's) pads the pool windows with values that never win, as
// max_pool2d's -inf.
// NB: pool_padding comes last (the schemas' order too) so that calls written before it existed
// keep their meaning.
at::Tensor conv2d_relu_max_pool2d(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef pool_size,
                                  at::IntArrayRef pool_stride, bool ceil_mode,
                                  at::IntArrayRef pool_padding = {0, 0});

// Same, also returning the one-byte window argmax (uint8, the output's shape and layout): the
// offset of the maximum inside its pool window (padded positions counted, never named), or 255
// where the maximum was not positive.
std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_with_argmax(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding = {0, 0});

// Gradients (input, weight, bias) of conv2d_relu_max_pool2d; those not asked for in
// output_mask come back undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> _conv2d_relu_max_pool2d_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask);

// F.batch_norm's semantics: normalises input Tensor[N, C, *] per channel with the batch
// statistics (training; running_mean/running_var, if given, are updated in place with
// `momentum` and the unbiased batch variance) or with the running statistics (evaluation).
at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, bool training, double momentum,
                      double eps);

// max_pool2d(relu(batch_norm(conv2d(input, weight, bias, stride, padding), ...)), pool_size,
// pool_stride, pool_padding, ceil_mode=ceil_mode), running statistics updated as batch_norm
// does.
at::Tensor conv2d_batch_norm_relu_max_pool2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    bool training, double momentum, double eps, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding = {0, 0});

// conv2d(relu(batch_norm(input, ...)), weight, bias, stride, padding), running statistics
// updated as batch_norm does. input: Tensor[N, C_in, H, W]; running_mean, running_var,
// bn_weight, bn_bias: Tensor[C_in] or nullopt; weight: Tensor[C_out, C_in, kH, kW]; bias:
// Tensor[C_out] or nullopt. Dtypes as batch_norm's for the batch norm and as conv2d's for the
// convolution. In training the backward keeps input and the batch statistics, not the rectified
// tensor, which it recomputes.
at::Tensor batch_norm_relu_conv2d(const at::Tensor& input,
                                  const std::optional<at::Tensor>& running_mean,
                                  const std::optional<at::Tensor>& running_var,
                                  const std::optional<at::Tensor>& bn_weight,
                                  const std::optional<at::Tensor>& bn_bias,
                                  const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  bool training, double momentum, double eps,
                                  at::IntArrayRef stride, at::IntArrayRef padding);

// Training dropout: each element of input zeroed with probability p, the others scaled by
// 1 / (1 - p) (as native dropout computes it, in input's dtype). The mask is Philox4x32-10 over
// the elements' row-major indices, keyed by seed (a one-element int64 CPU tensor): the same
// seed gives the same mask on every device, thread count and layout. Without a seed, the mask
// is the next one of the input device's default generator (torch.manual_seed seeds it): on CUDA
// its Philox seed and offset are read on the device, so a captured CUDA graph draws a new mask
// at every replay; on the CPU a seed is drawn from the CPU generator. The backward applies the
// forward's mask. float32, float64, bfloat16 or float16; the output has the input's layout
// (contiguous or channels-last).
at::Tensor dropout(const at::Tensor& input, const std::optional<at::Tensor>& seed = std::nullopt,
                   double p = 0.5);

}  // namespace cifarnet::ops
