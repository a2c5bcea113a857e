// CPU kernels of conv2d -> ReLU -> max_pool2d (forward and backward).
//
// NB: the convolution itself goes through at::convolution, i.e. oneDNN for float32, which on
// these shapes reaches 240 GFLOP/s, more than an im2col + MKL SGEMM of the same tile (85-145
// GFLOP/s measured here). What this file fuses is everything around it: the batch is cut into
// tiles whose convolution output stays in L2, each thread convolves its own tile and runs ReLU,
// max pooling and the one-byte argmax over it before the next tile, so the pre-pool activation
// never exists at full size and is never written to or read from memory.

#include "../conv_pool_geometry.h"
#include "multiversion.h"
#include "simd.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/AccumulateType.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

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
                          out_data + n * os.n, argmax_data + n * os.n, os, g, row_begin,
                          row_end);
  }
}

// How a batch is cut for the per-thread fused path: tiles of whole samples whose convolution
// output fits in kTileBytes, at least one tile per thread. With fewer samples than threads
// there is no such cut (per_thread = false) and the kernels thread inside each op instead.
struct BatchTiling {
  int64_t tile, tiles;
  bool per_thread;
};

BatchTiling batch_tiling(const ConvPoolGeometry& g, int64_t element_size) {
  const int64_t sample_bytes = std::max<int64_t>(1, g.out_channels * g.conv_h * g.conv_w * element_size);
  const int64_t threads = at::get_num_threads();
  int64_t tile = std::max<int64_t>(1, kTileBytes / sample_bytes);
  tile = std::min(tile, std::max<int64_t>(1, (g.batch + threads - 1) / threads));
  const int64_t tiles = (g.batch + tile - 1) / tile;
  return {tile, tiles, g.batch > 0 && tiles >= threads};
}

// Makes the ops a thread calls inside one of our parallel regions single-threaded, and sure of
// it. NB: oneDNN sizes its work by omp_get_max_threads(), which nested regions do not lower;
// its weight-gradient kernel then waits at a barrier for threads that never come. Setting the
// thread count inside the region only changes this implicit task's copy of it.
// Also excludes autograd: worker threads do not inherit the caller's thread-local state, so
// grad mode may be on there, and the inner ops must not record history.
struct InnerOpGuard {
  InnerOpGuard() {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
};

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const ConvPoolGeometry& g) {
  return at::convolution(input, weight, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w},
                         {1, 1}, /*transposed=*/false, {0, 0}, /*groups=*/1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_forward_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::Tensor output = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                                input.options().memory_format(format));
  at::Tensor argmax = at::empty_like(output, output.options().dtype(at::kByte));
  if (output.numel() == 0) {
    return {output, argmax};
  }
  // A channels-last weight makes the convolution produce the channels-last layout the
  // epilogue vectorises over.
  const at::Tensor weight_cl = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const BatchTiling tiling = batch_tiling(g, input.element_size());

  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_max_pool2d_forward", [&] {
    if (tiling.per_thread) {
      // Each thread convolves a tile (oneDNN runs single-threaded inside a parallel region)
      // and pools it while it is still in cache.
      at::parallel_for(0, tiling.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
        InnerOpGuard inner_ops;
        for (int64_t t = tile_begin; t < tile_end; ++t) {
          const int64_t n0 = t * tiling.tile;
          const int64_t n1 = std::min(n0 + tiling.tile, g.batch);
          const at::Tensor conv = convolution(input.narrow(0, n0, n1 - n0), weight_cl, bias, g);
          relu_max_pool2d_samples<scalar_t>(conv, n0, output, argmax, g, n0, n1, 0, g.out_h);
        }
      });
    } else {
      // Fewer samples than threads: a threaded convolution of the whole batch, then the
      // epilogue parallel over pooled rows.
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const at::Tensor conv = convolution(input, weight_cl, bias, g);
      at::parallel_for(0, g.batch * g.out_h, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end;) {
          const int64_t n = row / g.out_h;
          const int64_t row_end = std::min(end, (n + 1) * g.out_h);
          relu_max_pool2d_samples<scalar_t>(conv, 0, output, argmax, g, n, n + 1,
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
  const BatchTiling tiling = batch_tiling(g, input.element_size());
  const int64_t threads = at::get_num_threads();

  at::Tensor grad_input, grad_weight, grad_bias;
  if (output_mask[0]) {
    grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    if (g.batch == 0) grad_input.zero_();
  }
  if (output_mask[1]) {
    grad_weight = at::zeros(weight.sizes(), weight.options());
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv2d_relu_max_pool2d_backward", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor bias_partial = at::zeros({threads, g.out_channels}, input.options().dtype(acc_dtype));
    acc_t* bias_data = bias_partial.mutable_data_ptr<acc_t>();
    auto bias_row = [&] { return bias_data + at::get_thread_num() * g.out_channels; };

    if (!conv_grads) {
      at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
        scatter_pool_gradient<scalar_t, acc_t>(grad_output, argmax, nullptr, Strides4d(grad_output),
                                               0, g, n_begin, n_end, bias_row());
      });
    } else if (tiling.per_thread) {
      // Per tile: the convolution-output gradient is built in a cache-sized buffer and fed
      // straight to a single-threaded convolution backward; weight gradients are summed per
      // thread. The full-size gradient of the pre-pool activation never exists.
      const at::Tensor weight_cl = weight.contiguous(at::MemoryFormat::ChannelsLast);
      at::Tensor weight_partial;
      if (output_mask[1]) weight_partial = at::zeros({threads, g.out_channels, g.in_channels, g.kernel_h, g.kernel_w}, weight.options());
      at::parallel_for(0, tiling.tiles, 1, [&](int64_t tile_begin, int64_t tile_end) {
        InnerOpGuard inner_ops;
        const int64_t thread = at::get_thread_num();
        const at::Tensor grad_conv_buffer =
            at::empty({tiling.tile, g.out_channels, g.conv_h, g.conv_w},
                      grad_output.options().memory_format(at::MemoryFormat::ChannelsLast));
        for (int64_t t = tile_begin; t < tile_end; ++t) {
          const int64_t n0 = t * tiling.tile;
          const int64_t n1 = std::min(n0 + tiling.tile, g.batch);
          at::Tensor grad_conv = grad_conv_buffer.narrow(0, 0, n1 - n0).zero_();
          scatter_pool_gradient<scalar_t, acc_t>(grad_output, argmax,
                                                 grad_conv.mutable_data_ptr<scalar_t>(),
                                                 Strides4d(grad_conv), n0, g, n0, n1, bias_row());
          auto [tile_grad_input, tile_grad_weight, unused] = at::convolution_backward(
              grad_conv, input.narrow(0, n0, n1 - n0), weight_cl, std::nullopt, stride, padding,
              {1, 1}, /*transposed=*/false, {0, 0}, /*groups=*/1,
              {output_mask[0], output_mask[1], false});
          if (output_mask[0]) grad_input.narrow(0, n0, n1 - n0).copy_(tile_grad_input);
          if (output_mask[1]) weight_partial[thread].add_(tile_grad_weight);
        }
      });
      if (output_mask[1]) grad_weight = weight_partial.sum(0);
    } else {
      // Fewer samples than threads: scatter the whole batch, then one threaded backward.
      at::Tensor grad_conv = at::zeros({g.batch, g.out_channels, g.conv_h, g.conv_w},
                                       grad_output.options().memory_format(format));
      at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
        scatter_pool_gradient<scalar_t, acc_t>(grad_output, argmax,
                                               grad_conv.mutable_data_ptr<scalar_t>(),
                                               Strides4d(grad_conv), 0, g, n_begin, n_end,
                                               bias_row());
      });
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      at::Tensor whole_grad_input, whole_grad_weight;
      std::tie(whole_grad_input, whole_grad_weight, std::ignore) = at::convolution_backward(
          grad_conv, input, weight, std::nullopt, stride, padding, {1, 1}, /*transposed=*/false,
          {0, 0}, /*groups=*/1, {output_mask[0], output_mask[1], false});
      if (output_mask[0]) grad_input.copy_(whole_grad_input);
      if (output_mask[1]) grad_weight = whole_grad_weight;
    }
    if (output_mask[2]) {
      grad_bias = bias_partial.sum(0).to(input.scalar_type());
    }
  });
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
