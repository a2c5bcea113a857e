// CPU kernels of batch norm: forward (batch statistics or given ones) and backward.
//
// A dense input is either channels-outer (NCHW and other contiguous inputs: each (n, c) row is
// contiguous) or channels-inner (channels-last, and (N, C) inputs); each kernel is one or two
// passes vectorised along the contiguous dimension, threaded over rows or pixels with
// per-thread partial sums. Training statistics take one pass (shifted sums, accumulated in
// double), where native takes two. bfloat16 and float16 data are computed in float32 (see
// batch_norm_loops.h); weight, bias and running statistics may be float32 with them, as native
// allows. The parameter gradients come back in double, the statistics dtype (the autograd
// formula gives each its parameter's dtype). A ReLU after the batch norm fuses into both: the
// forward rectifies in its store, the backward takes the gradient through the ReLU (from its
// output) in both its passes, so neither the ReLU's own pass nor its gradient's is made.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "../batch_norm_common.h"
#include "batch_norm_cpu.h"
#include "cache_sizes.h"
#include "multiversion.h"
#include "simd.h"

namespace cifarnet::ops {
namespace {


#define CIFARNET_LOOPS_HEADER "batch_norm_loops.h"
#include "isa_variants.inc"

// A dense view of a batch-norm input: its data in one of the two layouts above.
struct BatchNormLayout {
  at::Tensor data;          // dense, in the layout below
  bool channels_inner;      // element (p, c) at p * C + c; else (n, c, s) at (n * C + c) * S + s
  int64_t channels, rows;   // rows: N * C (channels outer) or pixels N * S (channels inner)
  int64_t row_len;          // S (channels outer) or C (channels inner)
  at::MemoryFormat format;  // the memory format outputs take
};

// `input` dense in `format` (a copy where it is not already), in the layout that format gives.
BatchNormLayout dense_layout(const at::Tensor& input, at::MemoryFormat format) {
  const int64_t channels = input.size(1);
  const int64_t count = batch_norm_count(input).expect_int();
  if (batch_norm_channels_inner(input, format)) {
    return {input.contiguous(format), true, channels, count, channels, format};
  }
  const int64_t spatial = input.size(0) == 0 ? 0 : count / input.size(0);
  return {input.contiguous(format), false, channels, input.size(0) * channels, spatial, format};
}

// Sums per channel over the whole input, threaded with per-thread partials. `rows_kernel` and
// `pixels_kernel` add one thread's range to its partial sums (two acc_t arrays of C).
template <typename acc_t, typename Rows, typename Pixels>
std::pair<std::vector<acc_t>, std::vector<acc_t>> channel_sums(const BatchNormLayout& layout,
                                                               Rows&& rows_kernel,
                                                               Pixels&& pixels_kernel) {
  const int64_t channels = layout.channels;
  const int64_t threads = at::get_num_threads();
  std::vector<acc_t> partial_a(threads * channels), partial_b(threads * channels);
  // Rows of one channel are short in deep layers; chunks of whole rows keep threads busy.
  at::parallel_for(0, layout.rows, 1, [&](int64_t begin, int64_t end) {
    // Accumulate in this thread's own arrays: neighbouring threads' slices of the partials
    // share a cache line, which the per-pixel updates of the channels-inner walk would bounce.
    std::vector<acc_t> a(channels), b(channels);
    if (layout.channels_inner) {
      pixels_kernel(begin, end, a.data(), b.data());
    } else {
      rows_kernel(begin, end, a.data(), b.data());
    }
    const int64_t t = at::get_thread_num();
    for (int64_t c = 0; c < channels; ++c) {
      partial_a[t * channels + c] += a[c];
      partial_b[t * channels + c] += b[c];
    }
  });
  std::vector<acc_t> a(channels), b(channels);
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t c = 0; c < channels; ++c) {
      a[c] += partial_a[t * channels + c];
      b[c] += partial_b[t * channels + c];
    }
  }
  return {std::move(a), std::move(b)};
}

}  // namespace

int64_t streaming_store_threshold_bytes() { return cache_sizes().llc_bytes; }

namespace {

// The normalize pass (g == nullptr; rectified with `relu`) or the input_grad pass (g taken
// through the ReLU whose output is relu_output, where given), threaded over rows or pixels.
template <typename scalar_t>
void apply_channel_map(const BatchNormLayout& layout, scalar_t* out, const scalar_t* x,
                       const scalar_t* g, const ChannelMap<simd::opmath_t<scalar_t>>& f,
                       bool input_grad, bool relu = false, const scalar_t* relu_output = nullptr) {
  // A pass over more than the last-level cache holds has evicted its first output lines by its
  // end anyway: its stores may as well skip reading the lines in first. Vector stores are at
  // multiples of 32 bytes from a row's start; streaming needs them 16-byte aligned.
  const int64_t tensors = 2 + (g != nullptr) + (relu_output != nullptr);
  const int64_t pass_bytes = tensors * layout.data.numel() * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t threshold = streaming_store_threshold_bytes();
  const bool stream = pass_bytes > threshold && threshold > 0 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                      layout.row_len * sizeof(scalar_t) % 16 == 0;
  at::parallel_for(0, layout.rows, 1, [&](int64_t begin, int64_t end) {
    if (!input_grad && layout.channels_inner) {
      CIFARNET_ISA_DISPATCH(normalize_channels_inner<scalar_t>, out, x, layout.channels, begin, end,
                            f.mean.data(), f.a.data(), f.b.data(), stream, relu);
    } else if (!input_grad) {
      CIFARNET_ISA_DISPATCH(normalize_channels_outer<scalar_t>, out, x, layout.channels,
                            layout.row_len, begin, end, f.mean.data(), f.a.data(), f.b.data(),
                            stream, relu);
    } else if (layout.channels_inner) {
      CIFARNET_ISA_DISPATCH(input_grad_channels_inner<scalar_t>, out, x, g, layout.channels, begin,
                            end, f.mean.data(), f.a.data(), f.b.data(), f.k.data(), stream,
                            relu_output);
    } else {
      CIFARNET_ISA_DISPATCH(input_grad_channels_outer<scalar_t>, out, x, g, layout.channels,
                            layout.row_len, begin, end, f.mean.data(), f.a.data(), f.b.data(),
                            f.k.data(), stream, relu_output);
    }
    if (stream) simd::stream_fence();
  });
}

}  // namespace

template <typename scalar_t>
BatchNormStats<stats_t<scalar_t>> batch_statistics(const at::Tensor& dense, bool channels_inner,
                                                   int64_t channels, int64_t rows,
                                                   int64_t row_len) {
  using acc_t = stats_t<scalar_t>;
  const BatchNormLayout layout{dense, channels_inner, channels,
                               rows,  row_len,        at::MemoryFormat::Contiguous};
  const scalar_t* x = dense.const_data_ptr<scalar_t>();
  // Shift by an element of each channel: sums of (x - ref) keep the variance of inputs whose
  // mean is far from zero. Not by an infinite one (inf - inf would make the mean NaN).
  std::vector<scalar_t> ref(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const scalar_t first = x[channels_inner ? c : c * row_len];
    ref[c] = std::isfinite(static_cast<double>(first)) ? first : scalar_t(0);
  }
  auto [sum, sum_sq] = channel_sums<acc_t>(
      layout,
      [&](int64_t begin, int64_t end, acc_t* s, acc_t* q) {
        CIFARNET_ISA_DISPATCH(shifted_sums_channels_outer, x, channels, row_len, begin, end,
                              ref.data(), s, q);
      },
      [&](int64_t begin, int64_t end, acc_t* s, acc_t* q) {
        CIFARNET_ISA_DISPATCH(shifted_sums_channels_inner, x, channels, begin, end, ref.data(), s,
                              q);
      });
  const acc_t count = static_cast<acc_t>(dense.numel() / std::max<int64_t>(1, channels));
  BatchNormStats<acc_t> stats{std::vector<acc_t>(channels), std::vector<acc_t>(channels)};
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t shifted_mean = sum[c] / count;
    stats.mean[c] = ref[c] + shifted_mean;
    // NB: not std::max(0, var), which turns a NaN variance (a NaN in the channel) into 0 where
    // native gives NaN; only rounding's small negative values clamp to 0.
    const acc_t var = sum_sq[c] / count - shifted_mean * shifted_mean;
    stats.var[c] = var < 0 ? 0 : var;
  }
  return stats;
}

template BatchNormStats<double> batch_statistics<float>(const at::Tensor&, bool, int64_t, int64_t,
                                                        int64_t);
template BatchNormStats<double> batch_statistics<double>(const at::Tensor&, bool, int64_t, int64_t,
                                                         int64_t);
template BatchNormStats<double> batch_statistics<c10::BFloat16>(const at::Tensor&, bool, int64_t,
                                                                int64_t, int64_t);
template BatchNormStats<double> batch_statistics<c10::Half>(const at::Tensor&, bool, int64_t,
                                                            int64_t, int64_t);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_kernel(
    const at::Tensor& input, const std::optional<at::Tensor>& mean,
    const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, bool training, double eps, bool relu) {
  check_batch_norm_forward_args(input, mean, var, weight, bias, training, eps);
  const BatchNormLayout layout = dense_layout(input, batch_norm_output_memory_format(input));
  const int64_t channels = layout.channels;
  at::Tensor output = at::empty(input.sizes(), input.options().memory_format(layout.format));
  at::Tensor save_mean, save_var;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "batch_norm_forward", [&] {
    using acc_t = stats_t<scalar_t>;
    using opmath_t = simd::opmath_t<scalar_t>;
    const BatchNormStats<acc_t> stats =
        training ? batch_statistics<scalar_t>(layout.data, layout.channels_inner, channels,
                                              layout.rows, layout.row_len)
                 : BatchNormStats<acc_t>{channel_values<acc_t>(mean, channels, 0),
                                         channel_values<acc_t>(var, channels, 1)};
    save_mean = channel_tensor(stats.mean, input.options());
    save_var = channel_tensor(stats.var, input.options());
    if (output.numel() == 0) return;
    // y = (x - mean) * weight / sqrt(var + eps) + bias.
    const SplitMean<opmath_t, acc_t> centre(stats.mean);
    const auto w = channel_values<acc_t>(weight, channels, 1);
    const auto b = channel_values<acc_t>(bias, channels, 0);
    ChannelMap<opmath_t> f(channels);
    f.mean = centre.hi;
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t scale = w[c] / std::sqrt(stats.var[c] + eps);
      f.a[c] = static_cast<opmath_t>(scale);
      f.b[c] = static_cast<opmath_t>(b[c] - centre.lo[c] * scale);
    }
    apply_channel_map<scalar_t>(layout, output.mutable_data_ptr<scalar_t>(),
                                layout.data.const_data_ptr<scalar_t>(), nullptr, f,
                                /*input_grad=*/false, relu);
  });
  return {output, save_mean, save_var};
}

// The backward's reduction phase: sum_g = sum(g), sum_gx = sum(g * (x - mean)) per channel,
// as sum(g * (x - hi)) - lo * sum_g; g taken through the ReLU whose output is relu_output,
// where given.
template <typename scalar_t>
std::pair<std::vector<stats_t<scalar_t>>, std::vector<stats_t<scalar_t>>> grad_sums(
    const BatchNormLayout& layout, const scalar_t* g,
    const SplitMean<simd::opmath_t<scalar_t>, stats_t<scalar_t>>& centre,
    const scalar_t* relu_output = nullptr) {
  using acc_t = stats_t<scalar_t>;
  const int64_t channels = layout.channels;
  if (layout.data.numel() == 0) {
    return {std::vector<acc_t>(channels), std::vector<acc_t>(channels)};
  }
  const scalar_t* x = layout.data.const_data_ptr<scalar_t>();
  auto [sum_g, sum_gx] = channel_sums<acc_t>(
      layout,
      [&](int64_t begin, int64_t end, acc_t* sg, acc_t* sgx) {
        CIFARNET_ISA_DISPATCH(grad_sums_channels_outer, g, x, channels, layout.row_len, begin, end,
                              centre.hi.data(), sg, sgx, relu_output);
      },
      [&](int64_t begin, int64_t end, acc_t* sg, acc_t* sgx) {
        CIFARNET_ISA_DISPATCH(grad_sums_channels_inner, g, x, channels, begin, end,
                              centre.hi.data(), sg, sgx, relu_output);
      });
  for (int64_t c = 0; c < channels; ++c) sum_gx[c] -= centre.lo[c] * sum_g[c];
  return {std::move(sum_g), std::move(sum_gx)};
}

// The backward's elementwise phase in training (training_grad_map's map over the input), g
// taken through the ReLU whose output is relu_output, where given.
template <typename scalar_t>
void training_input_grad(const BatchNormLayout& layout, scalar_t* out, const scalar_t* g,
                         const SplitMean<simd::opmath_t<scalar_t>, stats_t<scalar_t>>& centre,
                         const std::vector<stats_t<scalar_t>>& invstd,
                         const std::vector<stats_t<scalar_t>>& w,
                         const std::vector<stats_t<scalar_t>>& sum_g,
                         const std::vector<stats_t<scalar_t>>& sum_gx, int64_t count,
                         const scalar_t* relu_output = nullptr) {
  if (layout.data.numel() == 0) return;
  const auto f = training_grad_map(centre, invstd, w, sum_g, sum_gx, count);
  apply_channel_map<scalar_t>(layout, out, layout.data.const_data_ptr<scalar_t>(), g, f,
                              /*input_grad=*/true, /*relu=*/false, relu_output);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& save_mean,
    const at::Tensor& save_var, const std::optional<at::Tensor>& weight, bool training, double eps,
    std::array<bool, 3> output_mask, const std::optional<at::Tensor>& relu_output) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(save_mean, "save_mean", input);
  check_per_channel(save_var, "save_var", input);
  check_per_channel(weight, "weight", input);
  check_relu_output(relu_output, input);
  const BatchNormLayout layout =
      dense_layout(input, batch_norm_grad_input_memory_format(input, grad_output));
  // The gradient (and the ReLU's output) in the input's layout, so all walk the same element
  // order. NB: evaluation's input gradient is a normalize pass over g, which takes no mask:
  // there the gradient goes through the ReLU first (no fused op backpropagates evaluation).
  const bool relu = defined(relu_output);
  const at::Tensor grad =
      relu && !training
          ? at::threshold_backward(grad_output, *relu_output, 0).contiguous(layout.format)
          : grad_output.contiguous(layout.format);
  const at::Tensor mask =
      relu && training ? relu_output->contiguous(layout.format) : at::Tensor();
  const int64_t channels = layout.channels;
  at::Tensor grad_input, grad_weight, grad_bias;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = stats_t<scalar_t>;
    using opmath_t = simd::opmath_t<scalar_t>;
    const auto w = channel_values<acc_t>(weight, channels, 1);
    const SplitMean<opmath_t, acc_t> centre(channel_values<acc_t>(save_mean, channels, 0));
    const auto invstd = inverse_std(channel_values<acc_t>(save_var, channels, 1), eps);
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* r = mask.defined() ? mask.const_data_ptr<scalar_t>() : nullptr;
    std::vector<acc_t> sum_g(channels), sum_gx(channels);
    if (training || output_mask[1] || output_mask[2]) {
      std::tie(sum_g, sum_gx) = grad_sums<scalar_t>(layout, g, centre, r);
    }
    if (output_mask[0]) {
      grad_input = at::empty(input.sizes(), input.options().memory_format(layout.format));
      scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
      if (training) {
        training_input_grad<scalar_t>(layout, out, g, centre, invstd, w, sum_g, sum_gx,
                                      batch_norm_count(input).expect_int(), r);
      } else if (grad_input.numel() > 0) {
        // Evaluation: dx = k g, i.e. normalize of g with mean 0 and scale k = w invstd.
        ChannelMap<opmath_t> f(channels);
        for (int64_t c = 0; c < channels; ++c) {
          f.a[c] = static_cast<opmath_t>(w[c] * invstd[c]);
        }
        apply_channel_map<scalar_t>(layout, out, g, nullptr, f, false);
      }
    }
    std::vector<acc_t> grad_w(channels);
    for (int64_t c = 0; c < channels; ++c) grad_w[c] = sum_gx[c] * invstd[c];
    // In the statistics dtype: the autograd formula gives each its parameter's dtype.
    if (output_mask[1]) grad_weight = channel_tensor(grad_w, input.options());
    if (output_mask[2]) grad_bias = channel_tensor(sum_g, input.options());
  });
  return {grad_input, grad_weight, grad_bias};
}

// The phase ops of synchronized batch norm: statistics, and the backward's reduction and
// elementwise phases, each on this process's part of the batch; the forward normalises with
// the combined statistics through _batch_norm_forward in evaluation mode.

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_kernel(const at::Tensor& input) {
  check_batch_norm_input(input, /*training=*/false);
  const BatchNormLayout layout = dense_layout(input, batch_norm_output_memory_format(input));
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "batch_norm_stats", [&] {
    using acc_t = stats_t<scalar_t>;
    const BatchNormStats<acc_t> stats =
        input.numel() == 0
            ? BatchNormStats<acc_t>{std::vector<acc_t>(layout.channels),
                                    std::vector<acc_t>(layout.channels)}
            : batch_statistics<scalar_t>(layout.data, layout.channels_inner, layout.channels,
                                         layout.rows, layout.row_len);
    mean = channel_tensor(stats.mean, input.options());
    var = channel_tensor(stats.var, input.options());
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_kernel(const at::Tensor& grad_output,
                                                                     const at::Tensor& input,
                                                                     const at::Tensor& mean) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(mean, "mean", input);
  const BatchNormLayout layout =
      dense_layout(input, batch_norm_grad_input_memory_format(input, grad_output));
  const at::Tensor grad = grad_output.contiguous(layout.format);
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "batch_norm_backward_reduce", [&] {
    using acc_t = stats_t<scalar_t>;
    const SplitMean<simd::opmath_t<scalar_t>, acc_t> centre(
        channel_values<acc_t>(mean, layout.channels, 0));
    const auto [sum_g, sum_gx] = grad_sums<scalar_t>(layout, grad.const_data_ptr<scalar_t>(), centre);
    sum_dy = channel_tensor(sum_g, input.options());
    sum_dy_xmu = channel_tensor(sum_gx, input.options());
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elementwise_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
    const at::Tensor& var, const std::optional<at::Tensor>& weight, const at::Tensor& sum_dy,
    const at::Tensor& sum_dy_xmu, int64_t count, double eps) {
  check_batch_norm_input(input, /*training=*/false);
  check_batch_norm_grad_output(grad_output, input);
  check_per_channel(mean, "mean", input);
  check_per_channel(var, "var", input);
  check_per_channel(weight, "weight", input);
  TORCH_CHECK(eps >= 0, "eps must be non-negative, got ", eps);
  const BatchNormLayout layout =
      dense_layout(input, batch_norm_grad_input_memory_format(input, grad_output));
  check_backward_sums(sum_dy, sum_dy_xmu, count, layout.channels,
                      batch_norm_count(input).expect_int(), input.device());
  const at::Tensor grad = grad_output.contiguous(layout.format);
  at::Tensor grad_input = at::empty(input.sizes(), input.options().memory_format(layout.format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "batch_norm_backward_elementwise", [&] {
    using acc_t = stats_t<scalar_t>;
    const int64_t channels = layout.channels;
    const SplitMean<simd::opmath_t<scalar_t>, acc_t> centre(
        channel_values<acc_t>(mean, channels, 0));
    training_input_grad<scalar_t>(
        layout, grad_input.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), centre,
        inverse_std(channel_values<acc_t>(var, channels, 1), eps),
        channel_values<acc_t>(weight, channels, 1), channel_values<acc_t>(sum_dy, channels, 0),
        channel_values<acc_t>(sum_dy_xmu, channels, 0), count);
  });
  return grad_input;
}

// running = (1 - momentum) * running + momentum * factor * batch, in place, in one loop: the
// composite of ATen ops other devices use costs more than the forward of a small layer.
void blend_running_stat(at::Tensor& running, const at::Tensor& batch, double momentum,
                        double factor) {
  at::Tensor dense = running.is_contiguous() ? running : running.contiguous();
  const at::Tensor values = batch.to(at::kDouble).contiguous();
  const double* v = values.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(),
                                  "batch_norm_update_running_stats", [&] {
    scalar_t* r = dense.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < dense.numel(); ++c) {
      r[c] = static_cast<scalar_t>((1 - momentum) * static_cast<double>(r[c]) +
                                   momentum * factor * v[c]);
    }
  });
  if (!dense.is_same(running)) running.copy_(dense);
}

void batch_norm_update_running_stats_kernel(at::Tensor& running_mean, at::Tensor& running_var,
                                            const at::Tensor& save_mean,
                                            const at::Tensor& save_var, double momentum,
                                            c10::SymInt symbolic_count) {
  const double unbiased = unbiased_variance_factor(symbolic_count.expect_int());
  TORCH_CHECK(save_mean.numel() == running_mean.numel() && save_var.numel() == running_var.numel(),
              "running statistics of ", running_mean.numel(), " and ", running_var.numel(),
              " channels cannot take batch statistics of ", save_mean.numel(), " and ",
              save_var.numel());
  const at::NoGradGuard no_grad;
  blend_running_stat(running_mean, save_mean, momentum, 1);
  blend_running_stat(running_var, save_var, momentum, unbiased);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("_batch_norm_forward", &batch_norm_forward_kernel);
  m.impl("_batch_norm_backward", &batch_norm_backward_kernel);
  m.impl("_batch_norm_update_running_stats", &batch_norm_update_running_stats_kernel);
  m.impl("_batch_norm_stats", &batch_norm_stats_kernel);
  m.impl("_batch_norm_backward_reduce", &batch_norm_backward_reduce_kernel);
  m.impl("_batch_norm_backward_elementwise", &batch_norm_backward_elementwise_kernel);
}

}  // namespace cifarnet::ops
