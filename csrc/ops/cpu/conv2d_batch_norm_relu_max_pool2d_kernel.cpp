// CPU kernels of conv2d -> batch norm (training) -> ReLU -> max_pool2d.
//
// Forward: one convolution of the whole batch (oneDNN's, or Winograd's for the study's 5x5
// convolutions on AVX2 CPUs, see winograd_convolution.h; its output is kept for the backward,
// channels last), one pass for the batch statistics, and one epilogue pass that normalises,
// applies ReLU, pools and records the one-byte argmax. Neither the normalised nor the ReLU
// output is ever written.
// Backward: the pooled gradient reaches the normalised activation only at the argmax hits, so
// batch norm's two per-channel reductions only visit those; the convolution-output gradient
// is then one affine pass over the saved convolution output plus the hits, and goes to
// at::convolution_backward (or Winograd's gradients, as the forward).
// bfloat16 and float16: the convolution and its backward run in that dtype (oneDNN: AMX or
// AVX512-BF16 where the CPU has them), the saved convolution output is stored in it, and
// everything else computes in float32 with statistics in double; the batch-norm parameters may
// be float32 (as native batch norm allows) and their gradients take their dtype.
// (Evaluation mode never comes here: it folds the batch norm into the convolution.)
// Each of these is a phase below: statistics, epilogue; reduction, elementwise. The fused ops
// run them back to back; the phase ops one at a time, so that synchronized batch norm
// (cifarnet/_sync_batch_norm.py) can combine statistics and reductions over processes between
// them.

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
#include "../convolution.h"
#include "batch_norm_cpu.h"
#include "multiversion.h"
#include "simd.h"
#include "winograd_convolution.h"

namespace cifarnet::ops {
namespace {

#define CIFARNET_LOOPS_HEADER "conv2d_batch_norm_relu_max_pool2d_loops.h"
#include "isa_variants.inc"
#include "pool_argmax.h"

// ---------------------------------------------------------------------------------------------
// The phases.

// The pooled output and its one-byte argmax, uninitialised, in native conv2d's layout.
std::pair<at::Tensor, at::Tensor> empty_pooled_output(const at::Tensor& input,
                                                      const at::Tensor& weight,
                                                      const ConvPoolGeometry& g) {
  const at::MemoryFormat format = pooled_output_memory_format(input, weight, g);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  return {output, argmax};
}

// Statistics phase: per-channel mean and biased variance of the channels-last convolution
// output (in double); zeros for an empty batch.
template <typename scalar_t>
BatchNormStats<stats_t<scalar_t>> conv_output_statistics(const at::Tensor& conv,
                                                         const ConvPoolGeometry& g) {
  const int64_t pixels = g.batch * g.conv_h * g.conv_w;
  if (pixels == 0) {
    return {std::vector<stats_t<scalar_t>>(g.out_channels, 0),
            std::vector<stats_t<scalar_t>>(g.out_channels, 0)};
  }
  return batch_statistics<scalar_t>(conv, /*channels_inner=*/true, g.out_channels, pixels,
                                    g.out_channels);
}

// Epilogue phase: y = (x - mean) * bn_weight / sqrt(var + eps) + bn_bias, as the batch norm op
// computes it, then ReLU and pooling with the argmax, in one pass; y is never written.
template <typename scalar_t>
void normalise_relu_max_pool2d(const at::Tensor& conv, at::Tensor& output, at::Tensor& argmax,
                               const ConvPoolGeometry& g,
                               const BatchNormStats<stats_t<scalar_t>>& stats,
                               const std::optional<at::Tensor>& bn_weight,
                               const std::optional<at::Tensor>& bn_bias, double eps) {
  using acc_t = stats_t<scalar_t>;
  using opmath_t = simd::opmath_t<scalar_t>;
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
}

// The backward's inputs in the one layout its loops walk: channels last.
struct BackwardInputs {
  at::Tensor conv, grad, argmax;
  BackwardInputs(const at::Tensor& conv_output, const at::Tensor& grad_output,
                 const at::Tensor& pool_argmax)
      : conv(conv_output.contiguous(at::MemoryFormat::ChannelsLast)),
        grad(grad_output.contiguous(at::MemoryFormat::ChannelsLast)),
        argmax(pool_argmax.contiguous(at::MemoryFormat::ChannelsLast)) {}
};

// Whether the pool windows tile the convolution output (stride == size, from its first row
// and column) over whole vectors of channels: the backward then walks windows densely, with
// the argmax as a lane mask.
// NB: padded pools take the hit-by-hit paths, which read window positions through
// WindowPositions; the tiled loops assume windows that start inside the convolution output.
template <typename scalar_t>
bool windows_tile(const ConvPoolGeometry& g) {
  return g.pool_stride_h == g.pool_h && g.pool_stride_w == g.pool_w && g.pool_pad_h == 0 &&
         g.pool_pad_w == 0 && g.out_channels % simd::Vec64<simd::opmath_t<scalar_t>>::lanes == 0;
}

int64_t conv_offset(const ConvPoolGeometry& g, int64_t n, int64_t h, int64_t w) {
  return ((n * g.conv_h + h) * g.conv_w + w) * g.out_channels;
}

// Reduction phase: batch norm's two per-channel sums, sum(dy) and sum(dy * (x - mean)), over
// the argmax hits only: elsewhere the gradient of the normalised activation is zero. Tiling
// windows are walked densely and vectorised; others hit by hit, in channels-last order, the
// order of the saved convolution output they read.
template <typename scalar_t>
std::pair<std::vector<stats_t<scalar_t>>, std::vector<stats_t<scalar_t>>> hit_sums(
    const BackwardInputs& in, const ConvPoolGeometry& g,
    const SplitMean<simd::opmath_t<scalar_t>, stats_t<scalar_t>>& centre) {
  using acc_t = stats_t<scalar_t>;
  using opmath_t = simd::opmath_t<scalar_t>;
  const int64_t channels = g.out_channels;
  const std::vector<opmath_t>& mean = centre.hi;  // x - mean == (x - hi) - lo
  const bool tiled = windows_tile<scalar_t>(g);
  const WindowPositions window(g);
  const int64_t threads = at::get_num_threads();
  const int64_t pooled_sample = g.out_h * g.out_w * channels;
  const int64_t conv_sample = g.conv_h * g.conv_w * channels;
  const scalar_t* conv_data = in.conv.const_data_ptr<scalar_t>();
  const scalar_t* grad_data = in.grad.const_data_ptr<scalar_t>();
  const uint8_t* argmax_data = in.argmax.const_data_ptr<uint8_t>();
  std::vector<acc_t> partial_g(threads * channels), partial_gx(threads * channels);
  at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
    acc_t* sum_g = partial_g.data() + at::get_thread_num() * channels;
    acc_t* sum_gx = partial_gx.data() + at::get_thread_num() * channels;
    for (int64_t n = n_begin; n < n_end; ++n) {
      if (tiled) {
        CIFARNET_ISA_DISPATCH(tiled_hit_sums<scalar_t>, conv_data + n * conv_sample,
                              grad_data + n * pooled_sample, argmax_data + n * pooled_sample, g,
                              0, g.out_h, mean.data(), sum_g, sum_gx);
        continue;
      }
      for_each_argmax_hit<scalar_t>(
          in.grad, in.argmax, g, window, n,
          [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w, scalar_t grad) {
            sum_g[c] += static_cast<acc_t>(grad);
            sum_gx[c] += static_cast<acc_t>(grad) *
                         (static_cast<opmath_t>(conv_data[conv_offset(g, n, h, w) + c]) - mean[c]);
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
  return {std::move(sum_g), std::move(sum_gx)};
}

// Elementwise phase: the convolution output's gradient
// dx = k (dy - sum_g / M - (x - mean) invstd^2 sum_gx / M), k = bn_weight * invstd, M = count
// (the values per channel of the whole, possibly synchronized, batch): computed as
// ((x - hi) * slope + offset + dy) * k, with dy nonzero only at the hits.
template <typename scalar_t>
at::Tensor conv_output_grad(const BackwardInputs& in, const ConvPoolGeometry& g,
                            const SplitMean<simd::opmath_t<scalar_t>, stats_t<scalar_t>>& centre,
                            const std::vector<stats_t<scalar_t>>& invstd,
                            const std::vector<stats_t<scalar_t>>& w,
                            const std::vector<stats_t<scalar_t>>& sum_g,
                            const std::vector<stats_t<scalar_t>>& sum_gx, int64_t count) {
  const int64_t channels = g.out_channels;
  // (x - hi) * slope + offset as f's (x - mean) * a + b
  const auto f = training_grad_map(centre, invstd, w, sum_g, sum_gx, count);
  const auto &mean = f.mean, &slope = f.a, &offset = f.b, &k = f.k;
  const bool tiled = windows_tile<scalar_t>(g);
  const WindowPositions window(g);
  const int64_t pooled_sample = g.out_h * g.out_w * channels;
  const int64_t conv_sample = g.conv_h * g.conv_w * channels;
  const scalar_t* conv_data = in.conv.const_data_ptr<scalar_t>();
  const scalar_t* grad_data = in.grad.const_data_ptr<scalar_t>();
  const uint8_t* argmax_data = in.argmax.const_data_ptr<uint8_t>();
  // Overlapping windows add several hits into one position. In 16-bit data they add in float,
  // as native max-pool backward's do: added in 16 bits, hits that cancel would keep the
  // rounding of their partial sums (8 hits of a 4x2 window of stride 1, summing to a third of
  // their sizes, put 38 roundings of the sum into the gradient).
  const bool add_in_float = !tiled && sizeof(scalar_t) == 2 &&
                            (g.pool_stride_h < g.pool_h || g.pool_stride_w < g.pool_w);
  // (zero-filled only where the hits add into it in place)
  at::Tensor grad_conv =
      tiled || add_in_float ? at::empty_like(in.conv) : at::zeros_like(in.conv);
  scalar_t* grad_conv_data = grad_conv.mutable_data_ptr<scalar_t>();
  const at::Tensor hits_in_float =
      add_in_float ? at::zeros_like(in.conv, in.conv.options().dtype(at::kFloat)) : at::Tensor();
  float* hits_data = add_in_float ? hits_in_float.mutable_data_ptr<float>() : nullptr;
  // input_grad over pixels [begin, end): ((x - hi) * slope + offset + dy) * k, dy read
  // from the scattered hits (in float, or in grad_conv itself) or absent (uncovered positions).
  auto input_grad_pixels = [&](int64_t begin, int64_t end, bool with_hits) {
    if constexpr (sizeof(scalar_t) == 2) {
      if (with_hits && add_in_float) {
        CIFARNET_ISA_DISPATCH(input_grad_channels_inner<scalar_t>, grad_conv_data, conv_data,
                              static_cast<const float*>(hits_data), channels, begin, end,
                              mean.data(), slope.data(), offset.data(), k.data(),
                              /*stream=*/false);
        return;
      }
    }
    CIFARNET_ISA_DISPATCH(input_grad_channels_inner<scalar_t>, grad_conv_data, conv_data,
                          with_hits ? grad_conv_data : nullptr, channels, begin, end, mean.data(),
                          slope.data(), offset.data(), k.data(), /*stream=*/false);
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
          in.grad, in.argmax, g, window, n,
          [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w_, scalar_t grad) {
            if (add_in_float) {
              hits_data[conv_offset(g, n, h, w_) + c] += static_cast<float>(grad);
            } else {
              grad_conv_data[conv_offset(g, n, h, w_) + c] += grad;
            }
          });
      input_grad_pixels(sample_pixel, sample_pixel + g.conv_h * g.conv_w, true);
    }
  });
  return grad_conv;
}

void check_cpu(const at::Tensor& input) {
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
}

// ---------------------------------------------------------------------------------------------
// The fused op: every phase in one call.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_training_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    double eps, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cpu(input);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  const int64_t pixels = g.batch * g.conv_h * g.conv_w;
  TORCH_CHECK_VALUE(pixels > 1,
              "Expected more than 1 value per channel when training, got convolution output size ",
              c10::IntArrayRef{g.batch, g.out_channels, g.conv_h, g.conv_w});
  check_batch_norm_eps(eps, /*training=*/true);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  const at::Tensor conv = cpu_channels_last_convolution(input, weight, bias, g, stride, padding);
  at::Tensor output, argmax;  // NB: not structured bindings, which C++17 lambdas cannot capture
  std::tie(output, argmax) = empty_pooled_output(input, weight, g);
  at::Tensor save_mean, save_var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d", [&] {
    const auto stats = conv_output_statistics<scalar_t>(conv, g);
    normalise_relu_max_pool2d<scalar_t>(conv, output, argmax, g, stats, bn_weight, bn_bias, eps);
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
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding,
    std::array<bool, 5> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cpu(input);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const BackwardInputs in(conv_output, grad_output, argmax);

  at::Tensor grad_conv, grad_bn_weight, grad_bn_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "conv2d_batch_norm_relu_max_pool2d_backward",
      [&] {
        using acc_t = stats_t<scalar_t>;
        using opmath_t = simd::opmath_t<scalar_t>;
        const int64_t channels = g.out_channels;
        const SplitMean<opmath_t, acc_t> centre(channel_values<acc_t>(save_mean, channels, 0));
        const auto invstd = inverse_std(channel_values<acc_t>(save_var, channels, 1), eps);
        const auto [sum_g, sum_gx] = hit_sums<scalar_t>(in, g, centre);
        std::vector<acc_t> grad_w(channels);
        for (int64_t c = 0; c < channels; ++c) grad_w[c] = sum_gx[c] * invstd[c];
        // In the statistics dtype: the autograd formula gives each its parameter's dtype.
        if (output_mask[3]) grad_bn_weight = channel_tensor(grad_w, input.options());
        if (output_mask[4]) grad_bn_bias = channel_tensor(sum_g, input.options());
        if (!(output_mask[0] || output_mask[1] || output_mask[2])) return;
        grad_conv = conv_output_grad<scalar_t>(in, g, centre, invstd,
                                               channel_values<acc_t>(bn_weight, channels, 1),
                                               sum_g, sum_gx, g.batch * g.conv_h * g.conv_w);
      });
  at::Tensor grad_input, grad_weight, grad_bias;
  if (grad_conv.defined()) {
    std::tie(grad_input, grad_weight, grad_bias) = cpu_convolution_grads(
        grad_conv, input, weight, stride, padding, {output_mask[0], output_mask[1], output_mask[2]});
  }
  return {grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias};
}

// ---------------------------------------------------------------------------------------------
// The phase ops: one phase each, statistics and sums in and out as per-channel tensors.

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_stats_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_cpu(input);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = cpu_channels_last_convolution(input, weight, bias, g, stride, padding);
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d_stats", [&] {
    const auto stats = conv_output_statistics<scalar_t>(conv, g);
    mean = channel_tensor(stats.mean, input.options());
    var = channel_tensor(stats.var, input.options());
  });
  return {conv, mean, var};
}

std::tuple<at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_epilogue_kernel(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_output,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_epilogue_args(
      input, weight, conv_output, mean, var, bn_weight, bn_bias, eps, stride, padding, pool_size,
      pool_stride, ceil_mode, pool_padding);
  check_cpu(input);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor conv = conv_output.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor output, argmax;  // NB: not structured bindings, which C++17 lambdas cannot capture
  std::tie(output, argmax) = empty_pooled_output(input, weight, g);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d_epilogue", [&] {
    using acc_t = stats_t<scalar_t>;
    const BatchNormStats<acc_t> stats{channel_values<acc_t>(mean, g.out_channels, 0),
                                      channel_values<acc_t>(var, g.out_channels, 1)};
    normalise_relu_max_pool2d<scalar_t>(conv, output, argmax, g, stats, bn_weight, bn_bias, eps);
  });
  return {output, argmax};
}

std::tuple<at::Tensor, at::Tensor> conv2d_batch_norm_relu_max_pool2d_backward_reduce_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& argmax,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_pooled_grad_args(
      grad_output, input, weight, conv_output, argmax, stride, padding, pool_size, pool_stride,
      ceil_mode, pool_padding);
  check_per_output_channel(save_mean, "save_mean", weight);
  check_cpu(input);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const BackwardInputs in(conv_output, grad_output, argmax);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d_backward_reduce", [&] {
    using acc_t = stats_t<scalar_t>;
    const SplitMean<simd::opmath_t<scalar_t>, acc_t> centre(
        channel_values<acc_t>(save_mean, g.out_channels, 0));
    const auto [sum_g, sum_gx] = hit_sums<scalar_t>(in, g, centre);
    sum_dy = channel_tensor(sum_g, input.options());
    sum_dy_xmu = channel_tensor(sum_gx, input.options());
  });
  return {sum_dy, sum_dy_xmu};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor>
conv2d_batch_norm_relu_max_pool2d_backward_elementwise_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu, int64_t count, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_backward_args(
      grad_output, input, weight, conv_output, save_mean, save_var, bn_weight, argmax, stride,
      padding, pool_size, pool_stride, ceil_mode, pool_padding);
  check_backward_sums(sum_dy, sum_dy_xmu, count, weight.size(0), g.batch * g.conv_h * g.conv_w,
                      input.device());
  check_cpu(input);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const BackwardInputs in(conv_output, grad_output, argmax);
  at::Tensor grad_conv;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_batch_norm_relu_max_pool2d_backward_elementwise", [&] {
    using acc_t = stats_t<scalar_t>;
    const int64_t channels = g.out_channels;
    const SplitMean<simd::opmath_t<scalar_t>, acc_t> centre(
        channel_values<acc_t>(save_mean, channels, 0));
    grad_conv = conv_output_grad<scalar_t>(
        in, g, centre, inverse_std(channel_values<acc_t>(save_var, channels, 1), eps),
        channel_values<acc_t>(bn_weight, channels, 1), channel_values<acc_t>(sum_dy, channels, 0),
        channel_values<acc_t>(sum_dy_xmu, channels, 0), count);
  });
  return cpu_convolution_grads(grad_conv, input, weight, stride, padding, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training",
         &conv2d_batch_norm_relu_max_pool2d_training_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_training_backward",
         &conv2d_batch_norm_relu_max_pool2d_training_backward_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_stats", &conv2d_batch_norm_relu_max_pool2d_stats_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_epilogue",
         &conv2d_batch_norm_relu_max_pool2d_epilogue_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_backward_reduce",
         &conv2d_batch_norm_relu_max_pool2d_backward_reduce_kernel);
  m.impl("_conv2d_batch_norm_relu_max_pool2d_backward_elementwise",
         &conv2d_batch_norm_relu_max_pool2d_backward_elementwise_kernel);
}

}  // namespace cifarnet::ops
