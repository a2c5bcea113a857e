// CPU kernels of conv2d -> ReLU -> max_pool2d (forward and backward).
//
// NB: the convolution itself goes through at::convolution, i.e. oneDNN for float32, which on
// these shapes reaches 240 GFLOP/s, more than an im2col + MKL SGEMM of the same tile (85-145
// GFLOP/s measured here). What this file fuses is everything around it: the batch is cut into
// tiles whose convolution output stays in L2, each thread convolves its own tile and runs ReLU,
// max pooling and the one-byte argmax over it before the next tile, so the pre-pool activation
// never exists at full size and is never written to or read from memory.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../conv_pool_geometry.h"
#include "multiversion.h"
#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace cifarnet::ops {
namespace {

// Convolution output bytes per batch tile: half of one core's L2 on the machines we tune for.
constexpr int64_t kTileBytes = 512 * 1024;

// Element strides of a 4-D (N, C, H, W) tensor, whatever its memory format.
struct Strides4d {
  int64_t n, c, h, w;
  explicit Strides4d(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

#define CIFARNET_LOOPS_HEADER "relu_max_pool2d_loops.h"
#include "isa_variants.inc"

// Pools rows [row_begin, row_end) of samples [n_begin, n_end) of a channels-last convolution
// output whose first sample is sample `conv_n0` of the batch.
template <typename scalar_t>
void relu_max_pool2d_samples(const at::Tensor& conv, int64_t conv_n0, at::Tensor& output,
                             at::Tensor& argmax, const ConvPoolGeometry& g, int64_t n_begin,
                             int64_t n_end, int64_t row_begin, int64_t row_end) {
  const Strides4d os(output);
  const int64_t conv_sample = g.conv_h * g.conv_w * g.out_channels;
  const scalar_t* conv_data = conv.const_data_ptr<scalar_t>();
  scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
  uint8_t* argmax_data = argmax.mutable_data_ptr<uint8_t>();
  for (int64_t n = n_begin; n < n_end; ++n) {
    CIFARNET_ISA_DISPATCH(relu_max_pool2d_rows<scalar_t>, conv_data + (n - conv_n0) * conv_sample,
                          out_data + n * os.n, argmax_data + n * os.n, os, g, row_begin, row_end);
  }
}

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const ConvPoolGeometry& g) {
  return at::convolution(input, weight, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {1, 1},
                         /*transposed=*/false, {0, 0}, /*groups=*/1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_forward_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(input, weight, bias, stride, padding,
                                                               pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::Tensor output =
      at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  // A channels-last weight makes the convolution produce the channels-last layout the
  // epilogue vectorises over.
  const at::Tensor weight_cl = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t sample_bytes = g.out_channels * g.conv_h * g.conv_w * input.element_size();
  static const int64_t tile_bytes = getenv("CIFARNET_TILE_BYTES") ? atoll(getenv("CIFARNET_TILE_BYTES")) : kTileBytes;
  const int64_t tile = std::max<int64_t>(1, tile_bytes / std::max<int64_t>(1, sample_bytes));

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_max_pool2d_forward", [&] {
    for (int64_t n0 = 0; n0 < g.batch; n0 += tile) {
      const int64_t n1 = std::min(n0 + tile, g.batch);
      const at::Tensor conv = convolution(input.narrow(0, n0, n1 - n0), weight_cl, bias, g);
      at::parallel_for(n0 * g.out_h, n1 * g.out_h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end;) {
          const int64_t n = row / g.out_h;
          const int64_t row_end = std::min(end, (n + 1) * g.out_h);
          relu_max_pool2d_samples<scalar_t>(conv, n0, output, argmax, g, n, n + 1,
                                            row - n * g.out_h, row_end - n * g.out_h);
          row = row_end;
        }
      });
    }
  });
  return {output, argmax};
}

// Scatters the pooled gradients of samples [n_begin, n_end) to the convolution output
// positions their argmax names, skipping windows whose maximum was not positive (ReLU's zero
// gradient), and adds what passes to bias_sum per channel: that sum is the bias gradient.
// grad_conv (zeroed; nullptr when only the bias gradient is wanted) holds samples from
// conv_n0 on. Windows overlap only within a sample, so callers may split samples across threads.
template <typename scalar_t, typename acc_t>
void scatter_pool_gradient(const at::Tensor& grad_output, const at::Tensor& argmax,
                           scalar_t* grad_conv, const Strides4d& cs, int64_t conv_n0,
                           const ConvPoolGeometry& g, int64_t n_begin, int64_t n_end,
                           acc_t* bias_sum) {
  const Strides4d gs(grad_output);
  const Strides4d as(argmax);
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();
  const uint8_t* argmax_data = argmax.const_data_ptr<uint8_t>();
  // Element offset of each window position from the window's corner: no divisions per element.
  std::array<int64_t, kMaxPoolWindowElements> window_offset{};
  for (int64_t k = 0; k < g.pool_h * g.pool_w; ++k) {
    window_offset[k] = (k / g.pool_w) * cs.h + (k % g.pool_w) * cs.w;
  }
  auto visit = [&](int64_t n, int64_t c, int64_t ph, int64_t pw) {
    const uint8_t offset = argmax_data[n * as.n + c * as.c + ph * as.h + pw * as.w];
    if (offset == kArgmaxReluZero) {
      return;
    }
    const scalar_t grad = grad_data[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w];
    bias_sum[c] += grad;
    if (grad_conv != nullptr) {
      grad_conv[(n - conv_n0) * cs.n + c * cs.c + ph * g.pool_stride_h * cs.h +
                pw * g.pool_stride_w * cs.w + window_offset[offset]] += grad;
    }
  };
  // Walk the argmax in its memory order.
  const bool channels_last = as.c == 1 && g.out_channels > 1;
  for (int64_t n = n_begin; n < n_end; ++n) {
    if (channels_last) {
      for (int64_t ph = 0; ph < g.out_h; ++ph)
        for (int64_t pw = 0; pw < g.out_w; ++pw)
          for (int64_t c = 0; c < g.out_channels; ++c) visit(n, c, ph, pw);
    } else {
      for (int64_t c = 0; c < g.out_channels; ++c)
        for (int64_t ph = 0; ph < g.out_h; ++ph)
          for (int64_t pw = 0; pw < g.out_w; ++pw) visit(n, c, ph, pw);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, std::nullopt, stride, padding, pool_size, pool_stride, ceil_mode);
  check_conv2d_relu_max_pool2d_backward_args(grad_output, argmax, input, g);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  const bool conv_grads = (output_mask[0] || output_mask[1]) && g.batch > 0;
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  at::Tensor grad_conv;
  if (conv_grads) {
    grad_conv = at::zeros({g.batch, g.out_channels, g.conv_h, g.conv_w},
                          grad_output.options().memory_format(format));
  }
  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_max_pool2d_backward", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor bias_partial =
        at::zeros({at::get_num_threads(), g.out_channels}, input.options().dtype(acc_dtype));
    acc_t* bias_data = bias_partial.mutable_data_ptr<acc_t>();
    scalar_t* grad_conv_data = conv_grads ? grad_conv.mutable_data_ptr<scalar_t>() : nullptr;
    const Strides4d conv_strides(conv_grads ? grad_conv : grad_output);
    at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
      scatter_pool_gradient<scalar_t, acc_t>(grad_output, argmax, grad_conv_data, conv_strides, 0,
                                             g, n_begin, n_end,
                                             bias_data + at::get_thread_num() * g.out_channels);
    });
    if (output_mask[2]) {
      grad_bias = bias_partial.sum(0).to(input.scalar_type());
    }
  });
  // NB: the convolution backward runs once over the whole batch, outside any parallel region of
  // ours: oneDNN's weight-gradient kernel plans its threads when its primitive is created and
  // deadlocks when run inside a region with fewer threads than it planned for.
  if (conv_grads) {
    std::tie(grad_input, grad_weight, std::ignore) = at::convolution_backward(
        grad_conv, input, weight, std::nullopt, stride, padding, {1, 1}, /*transposed=*/false,
        {0, 0}, /*groups=*/1, {output_mask[0], output_mask[1], false});
    if (grad_input.defined()) grad_input = grad_input.contiguous(format);
  } else {
    // Nothing flowed back (empty batch).
    if (output_mask[0]) grad_input = at::zeros(input.sizes(), input.options().memory_format(format));
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
  }
  // A fixed layout, so the fake kernel can promise the same strides.
  if (grad_weight.defined()) grad_weight = grad_weight.contiguous(weight.suggest_memory_format());
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax", &conv2d_relu_max_pool2d_forward_kernel);
  m.impl("_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_kernel);
}

}  // namespace cifarnet::ops
