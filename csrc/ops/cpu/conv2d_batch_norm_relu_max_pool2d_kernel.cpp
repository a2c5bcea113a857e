// CPU kernels of conv2d -> batch norm (training) -> ReLU -> max_pool2d.
//
// Forward: one oneDNN convolution of the whole batch (its output is kept for the backward,
// channels last), one pass for the batch statistics, and one epilogue pass that normalises,
// applies ReLU, pools and records the one-byte argmax. Neither the normalised nor the ReLU
// output is ever written.
// Backward: the pooled gradient reaches the normalised activation only at the argmax hits, so
// batch norm's two per-channel reductions only visit those; the convolution-output gradient
// is then one affine pass over the saved convolution output plus the hits, and goes to
// at::convolution_backward.
// bfloat16 and float16: the convolution and its backward run in that dtype (oneDNN: AMX or
// AVX512-BF16 where the CPU has them), the saved convolution output is stored in it, and
// everything else computes in float32 with statistics in double; the batch-norm parameters may
// be float32 (as native batch norm allows) and their gradients take their dtype.
// (Evaluation mode never comes here: it folds the batch norm into the convolution.)

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "../batch_norm_common.h"
#include "../conv_pool_geometry.h"
#include "batch_norm_cpu.h"
#include "multiversion.h"
#include "simd.h"

namespace cifarnet::ops {
namespace {

#define CIFARNET_LOOPS_HEADER "conv2d_batch_norm_relu_max_pool2d_loops.h"
#include "isa_variants.inc"
#include "pool_argmax.h"

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(input, weight, bias, stride, padding,
                                                               pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  const int64_t pixels = g.batch * g.conv_h * g.conv_w;
  TORCH_CHECK(pixels > 1,
              "Expected more than 1 value per channel when training, got convolution output size ",
              c10::IntArrayRef{g.batch, g.out_channels, g.conv_h, g.conv_w});
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const at::Tensor conv =
      at::convolution(input, weight.contiguous(at::MemoryFormat::ChannelsLast), bias, stride,
                      padding, {1, 1}, /*transposed=*/false, {0, 0}, /*groups=*/1)
          .contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  at::Tensor save_mean, save_var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d", [&] {
    using acc_t = stats_t<scalar_t>;
    using opmath_t = simd::opmath_t<scalar_t>;
    const auto stats = batch_statistics<scalar_t>(conv, /*channels_inner=*/true, g.out_channels,
                                                  pixels, g.out_channels);
    // y = (x - mean) * bn_weight / sqrt(var + eps) + bn_bias, as the batch norm op computes it.
    const SplitMean<opmath_t, acc_t> centre(stats.mean);
    const auto w = channel_values<acc_t>(bn_weight, g.out_channels, 1);
    const auto b = channel_values<acc_t>(bn_bias, g.out_channels, 0);
    std::vector<opmath_t> scale(g.out_channels), shift(g.out_channels);
    for (int64_t c = 0; c < g.out_channels; ++c) {
      const acc_t s = w[c] / std::sqrt(stats.var[c] + eps);
      scale[c] = static_cast<opmath_t>(s);
      shift[c] = static_cast<opmath_t>(b[c] - centre.lo[c] * s);
    }
    relu_max_pool2d<scalar_t>(conv, output, argmax, g, 0, g.batch, centre.hi.data(), scale.data(),
                              shift.data());
    save_mean = channel_tensor(stats.mean, input.options());
    save_var = channel_tensor(stats.var, input.options());
  });
  return {output, argmax, conv, save_mean, save_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, double eps,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, std::array<bool, 5> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  const int64_t channels = g.out_channels;
  const int64_t pixels = g.batch * g.conv_h * g.conv_w;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor grad_cl = grad_output.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor argmax_cl = argmax.contiguous(at::MemoryFormat::ChannelsLast);

  at::Tensor grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "conv2d_batch_norm_relu_max_pool2d_backward",
      [&] {
        using acc_t = stats_t<scalar_t>;
        using opmath_t = simd::opmath_t<scalar_t>;
        const SplitMean<opmath_t, acc_t> centre(channel_values<acc_t>(save_mean, channels, 0));
        const std::vector<opmath_t>& mean = centre.hi;  // x - mean == (x - hi) - lo
        const auto var = channel_values<acc_t>(save_var, channels, 1);
        const auto w = channel_values<acc_t>(bn_weight, channels, 1);
        std::vector<acc_t> invstd(channels);
        for (int64_t c = 0; c < channels; ++c) invstd[c] = 1 / std::sqrt(var[c] + eps);
        const scalar_t* conv_data = conv.const_data_ptr<scalar_t>();
        const WindowPositions window(g);
        auto conv_offset = [&](int64_t n, int64_t h, int64_t w_) {
          return ((n * g.conv_h + h) * g.conv_w + w_) * channels;
        };

        // Batch norm's reductions, sum(dy) and sum(dy * (x - mean)), over the argmax hits only:
        // elsewhere the gradient of the normalised activation is zero. Tiling windows are
        // walked densely and vectorised, with the argmax as a lane mask; others hit by hit, in
        // channels-last order, the order of the saved convolution output they read.
        const bool tiled = g.pool_stride_h == g.pool_h && g.pool_stride_w == g.pool_w &&
                           channels % simd::Vec64<opmath_t>::lanes == 0;
        const int64_t threads = at::get_num_threads();
        const int64_t pooled_sample = g.out_h * g.out_w * channels;
        const int64_t conv_sample = g.conv_h * g.conv_w * channels;
        const scalar_t* grad_data = grad_cl.const_data_ptr<scalar_t>();
        const uint8_t* argmax_data = argmax_cl.const_data_ptr<uint8_t>();
        std::vector<acc_t> partial_g(threads * channels), partial_gx(threads * channels);
        at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
          acc_t* sum_g = partial_g.data() + at::get_thread_num() * channels;
          acc_t* sum_gx = partial_gx.data() + at::get_thread_num() * channels;
          for (int64_t n = n_begin; n < n_end; ++n) {
            if (tiled) {
              CIFARNET_ISA_DISPATCH(tiled_hit_sums<scalar_t>, conv_data + n * conv_sample,
                                    grad_data + n * pooled_sample, argmax_data + n * pooled_sample,
                                    g, 0, g.out_h, mean.data(), sum_g, sum_gx);
              continue;
            }
            for_each_argmax_hit<scalar_t>(
                grad_cl, argmax_cl, g, window, n,
                [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w_, scalar_t grad) {
                  sum_g[c] += static_cast<acc_t>(grad);
                  sum_gx[c] += static_cast<acc_t>(grad) *
                               (static_cast<opmath_t>(conv_data[conv_offset(n, h, w_) + c]) - mean[c]);
                });
          }
        });
        std::vector<acc_t> sum_g(channels), sum_gx(channels);
        for (int64_t t = 0; t < threads; ++t) {
          for (int64_t c = 0; c < channels; ++c) {
            sum_g[c] += partial_g[t * channels + c];
            sum_gx[c] += partial_gx[t * channels + c];
          }
        }
        for (int64_t c = 0; c < channels; ++c) sum_gx[c] -= centre.lo[c] * sum_g[c];
        std::vector<acc_t> grad_w(channels);
        for (int64_t c = 0; c < channels; ++c) grad_w[c] = sum_gx[c] * invstd[c];
        const at::ScalarType grad_dtype = parameter_grad_dtype(bn_weight, input);
        if (output_mask[3]) grad_bn_weight = channel_tensor(grad_w, input.options()).to(grad_dtype);
        if (output_mask[4]) grad_bn_bias = channel_tensor(sum_g, input.options()).to(grad_dtype);
        if (!(output_mask[0] || output_mask[1] || output_mask[2])) return;

        // dx = k (dy - sum_g / M - (x - mean) invstd^2 sum_gx / M), k = bn_weight * invstd:
        // ((x - hi) * slope + offset + dy) * k, with dy nonzero only at the hits.
        const acc_t count = static_cast<acc_t>(pixels);
        std::vector<opmath_t> k(channels), slope(channels), offset(channels);
        for (int64_t c = 0; c < channels; ++c) {
          const acc_t s = -invstd[c] * invstd[c] * sum_gx[c] / count;
          k[c] = static_cast<opmath_t>(w[c] * invstd[c]);
          slope[c] = static_cast<opmath_t>(s);
          offset[c] = static_cast<opmath_t>(-sum_g[c] / count - centre.lo[c] * s);
        }
        at::Tensor grad_conv = tiled ? at::empty_like(conv) : at::zeros_like(conv);
        scalar_t* grad_conv_data = grad_conv.mutable_data_ptr<scalar_t>();
        // input_grad over pixels [begin, end): ((x - hi) * slope + offset + dy) * k, dy read
        // from grad_conv itself (the scattered hits) or absent (uncovered positions).
        auto input_grad_pixels = [&](int64_t begin, int64_t end, bool with_hits) {
          CIFARNET_ISA_DISPATCH(input_grad_channels_inner<scalar_t>, grad_conv_data, conv_data,
                                with_hits ? grad_conv_data : nullptr, channels, begin, end,
                                mean.data(), slope.data(), offset.data(), k.data(),
                                /*stream=*/false);
        };
        // Tiled: one vectorised pass per window; positions no window covers (the remainder
        // rows and columns of a floor-mode pool) take the hit-free map.
        const int64_t covered_h = tiled ? std::min(g.out_h * g.pool_h, g.conv_h) : 0;
        const int64_t covered_w = tiled ? std::min(g.out_w * g.pool_w, g.conv_w) : 0;
        at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
          for (int64_t n = n_begin; n < n_end; ++n) {
            const int64_t sample_pixel = n * g.conv_h * g.conv_w;
            if (tiled) {
              CIFARNET_ISA_DISPATCH(tiled_grad_conv<scalar_t>, grad_conv_data + n * conv_sample,
                                    conv_data + n * conv_sample, grad_data + n * pooled_sample,
                                    argmax_data + n * pooled_sample, g, 0, g.out_h, mean.data(),
                                    slope.data(), offset.data(), k.data());
              for (int64_t h = 0; h < g.conv_h; ++h) {
                const int64_t first = h < covered_h ? covered_w : 0;
                input_grad_pixels(sample_pixel + h * g.conv_w + first,
                                  sample_pixel + (h + 1) * g.conv_w, false);
              }
              continue;
            }
            // Otherwise scatter dy first (windows may overlap: hits add up), so it cancels
            // against the mean terms before the scaling by k, as in native batch norm.
            for_each_argmax_hit<scalar_t>(
                grad_cl, argmax_cl, g, window, n,
                [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w_, scalar_t grad) {
                  grad_conv_data[conv_offset(n, h, w_) + c] += grad;
                });
            input_grad_pixels(sample_pixel, sample_pixel + g.conv_h * g.conv_w, true);
          }
        });
        std::tie(grad_input, grad_weight, grad_bias) = at::convolution_backward(
            grad_conv, input, weight.contiguous(at::MemoryFormat::ChannelsLast),
            at::IntArrayRef{channels}, stride, padding, {1, 1}, /*transposed=*/false, {0, 0},
            /*groups=*/1, {output_mask[0], output_mask[1], output_mask[2]});
      });
  // Fixed layouts, so the fake kernel can promise the same strides.
  if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training_backward",
         &conv2d_batch_norm_relu_max_pool2d_training_backward_kernel);
}

}  // namespace cifarnet::ops
