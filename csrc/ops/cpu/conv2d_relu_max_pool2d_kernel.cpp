// CPU kernels of conv2d -> ReLU -> max_pool2d (forward and backward).
//
// Forward: the convolution goes through at::convolution (oneDNN for float32, which reaches
// ~240 GFLOP/s on the study's shapes here, more than an im2col + MKL SGEMM of the same tile at
// 85-145; Winograd F(2x2, 5x5) instead for the study's conv2 and conv3 on AVX2 CPUs, see
// winograd_convolution.h), a tile of samples at a time; ReLU, max pooling and the one-byte argmax then run over
// the tile while it is in cache, so the pre-pool activation never exists at full size. Where
// the batch shares out evenly over the threads, each thread convolves and pools its own chunks
// of samples, all in one parallel region (see forward_by_samples).
//
// Backward: the pre-pool gradient is zero but at one argmax per pool window, so the
// convolution gradients only visit those positions (see conv2d_relu_max_pool2d_loops.h): a
// quarter of a dense backward's arithmetic for 2x2 pools, in one parallel region whose threads
// take samples and chunks of output channels as they come free (see sparse_conv_gradients).
// Where pools are dense, or inputs are not finite, a dense scatter + at::convolution_backward
// takes over.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/AutogradState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../conv_pool_geometry.h"
#include "cache_sizes.h"
#include "multiversion.h"
#include "simd.h"
#include "winograd_convolution.h"

namespace cifarnet::ops {
namespace {

// Convolution output bytes per forward tile, from this CPU's caches: half the L2 of the
// threads that write and then pool it, or a sixteenth of the last level where that is more.
// Each tile is one oneDNN call with a fixed cost (primitive lookup, weight reorder, thread
// start): on a Xeon (2 MiB L2 per core, 480 MiB L3, two threads) larger tiles measured no
// faster and smaller ones slower, and the same kernels run with Zen 3's sizes (512 KiB L2,
// 32 MiB L3) were slower with 512 KiB tiles than with 2 MiB ones, which the last-level term
// gives there. bfloat16 on AMX: the whole batch in one call, up to half the last level (the
// epilogue then reads the output from there); AMX, ~3x faster than float32 on the study's
// convolutions, no longer hides the per-call cost: one call rather than four 2 MiB tiles took
// conv1's forward from 3.2 to 2.9 ms (one thread).
// Where the forward runs as one parallel region (forward_by_samples), a thread's chunk is its
// share of a tile, tile / threads bytes of whole samples, so each thread's output stays as
// cache-sized as under the tiles these sizes were measured with; where a last level of hundreds
// of MiB makes the tile the whole batch, each thread convolves its share in one call (what AMX
// wants, above). The region count is then one per forward whatever the caches.
// Under load shared tiles cost dearly: each is three parallel regions (oneDNN's two and the
// epilogue's), each of which waits for every thread, and a thread sharing its core with another
// process resumes only at its next time slice. Zen 3, two threads beside two busy processes:
// the study's conv1 forward (32x32 inputs, batch 128: 8 tiles, 24 regions) 184-192 ms, against
// 32 ms as one tile; on the quiet machine the tiles win (min of 120 calls: conv1 4.2 against
// 6.0 ms, conv2 17.0 against 37.6). As one region (28x28 inputs, batch 128, channels last, two
// threads beside two busy loops, median of 30 calls): conv1 15.7 ms against 89 as tiles and 51
// native, conv2 47 against 96 and 64, conv3 24 against 32 and 42; quiet, contiguous inputs, min
// of 100: within 3% of the tiles (conv1 4.95 against 5.14 ms, conv2 18.6 against 18.5, conv3
// 8.2 against 8.0).
// CIFARNET_FORWARD_TILE_BYTES sets the tile (for measurements; a value over the batch's output,
// e.g. 1099511627776, makes one tile).
int64_t forward_tile_bytes(at::ScalarType dtype) {
  if (const char* forced = std::getenv("CIFARNET_FORWARD_TILE_BYTES")) return std::atoll(forced);
  static const bool amx_bf16 = cpu_has_amx_bf16();
  const CacheSizes& caches = cache_sizes();
  const int64_t tile = std::max(caches.l2_bytes * at::get_num_threads() / 2, caches.llc_bytes / 16);
  return dtype == at::kBFloat16 && amx_bf16 ? std::max(tile, caches.llc_bytes / 2) : tile;
}

#define CIFARNET_LOOPS_HEADER "conv2d_relu_max_pool2d_loops.h"
#include "isa_variants.inc"
#include "pool_argmax.h"

// The convolution of a tile, channels last: Winograd with `winograd`'s filters where the
// forward chose it (see winograd_convolution.h) and every value is finite, else oneDNN.
at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const ConvPoolGeometry& g,
                       const WinogradFilters* winograd) {
  if (winograd != nullptr) {
    if (auto output = winograd_convolution(input, *winograd, bias, {g.pad_h, g.pad_w})) {
      return *output;
    }
  }
  return at::convolution(input, weight, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {1, 1},
                         /*transposed=*/false, {0, 0}, /*groups=*/1)
      .contiguous(at::MemoryFormat::ChannelsLast);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Whether the forward runs as one parallel region in which each thread convolves chunks of
// whole samples on its own (oneDNN inside a region runs on the calling thread alone) and pools
// each chunk while it is in that thread's cache, rather than as tiles of the batch that all
// threads convolve and then pool together (three regions a tile, see forward_tile_bytes).
// Chunks go to whichever thread is free (an atomic counter), so a thread slowed by another
// process on its core takes fewer. Needs a batch that shares out evenly enough in whole
// samples: the busiest thread's at most 5/4 of the mean (so 1 or 3 samples on 2 threads stay
// tiles, where oneDNN splits each sample's rows and channels over the threads instead). A rule
// of the batch and the thread count alone, which holds on any CPU: 64 threads give a batch of
// 128 two samples each, one region instead of three per tile.
// NB: oneDNN's forward convolutions are safe to run inside a region: a primitive's cache key
// holds the thread count (1 there), and their kernels share the work out by the count they are
// called with (1), not the one they were planned for (oneDNN 3.x's brgemm forward for AVX-512
// and AMX: balance211 over the count parallel() passes; the AVX2 ones: tested). The weight
// gradient's is not (see dense_conv_gradients), so the backward never does this.
// CIFARNET_CONV_FORWARD=samples or =tiles forces one (for tests and measurements).
bool forward_by_samples(int64_t batch, int64_t threads) {
  if (const char* forced = env_setting("CIFARNET_CONV_FORWARD", {"samples", "tiles"})) {
    return std::strcmp(forced, "samples") == 0;
  }
  if (threads < 2 || at::in_parallel_region()) return false;
  return 4 * ceil_div(batch, threads) * threads <= 5 * batch;
}

// Sets this thread's autograd state (grad mode, inference mode) for its lifetime.
class AutogradStateGuard {
 public:
  explicit AutogradStateGuard(const c10::AutogradState& state)
      : saved_(c10::AutogradState::get_tls_state()) {
    c10::AutogradState::set_tls_state(state);
  }
  ~AutogradStateGuard() { c10::AutogradState::set_tls_state(saved_); }
  AutogradStateGuard(const AutogradStateGuard&) = delete;
  AutogradStateGuard& operator=(const AutogradStateGuard&) = delete;

 private:
  const c10::AutogradState saved_;
};

// The forward as one parallel region: chunks of `chunk` samples, each convolved and then
// pooled by one thread, handed out in order by an atomic counter.
template <typename scalar_t>
void forward_samples_per_thread(const at::Tensor& input, const at::Tensor& weight_cl,
                                const std::optional<at::Tensor>& bias, const ConvPoolGeometry& g,
                                at::Tensor& output, at::Tensor& argmax, int64_t chunk,
                                const WinogradFilters* winograd) {
  const int64_t chunks = ceil_div(g.batch, chunk);
  std::atomic<int64_t> next_chunk{0};
  // The caller's dispatch keys (below autograd, autocast excluded) and grad and inference
  // modes for the workers' at::convolution calls: OpenMP's threads do not inherit thread-local
  // state. NB: not at::ThreadLocalState, which would also hand them the profiler's callbacks:
  // a worker's convolutions would then show as top-level events of its own thread, counted
  // beside the op that contains them.
  const c10::impl::LocalDispatchKeySet caller_keys = c10::impl::tls_local_dispatch_key_set();
  const c10::AutogradState caller_autograd = c10::AutogradState::get_tls_state();
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const c10::impl::ForceDispatchKeyGuard keys_guard(caller_keys);
    const AutogradStateGuard autograd_guard(caller_autograd);
    for (int64_t i = next_chunk++; i < chunks; i = next_chunk++) {
      const int64_t n0 = i * chunk, n1 = std::min(n0 + chunk, g.batch);
      const at::Tensor conv =
          convolution(input.narrow(0, n0, n1 - n0), weight_cl, bias, g, winograd);
      relu_max_pool2d_samples<scalar_t>(conv, n0, output, argmax, g, n0, n1, 0, g.out_h, nullptr,
                                        nullptr, nullptr);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_forward_kernel(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_relu_max_pool2d_args(
      input, weight, bias, stride, padding, pool_size, pool_stride, ceil_mode, pool_padding);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = pooled_output_memory_format(input, weight, g);
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
  const int64_t tile = std::max<int64_t>(
      1, forward_tile_bytes(input.scalar_type()) / std::max<int64_t>(1, sample_bytes));

  const int64_t threads = at::get_num_threads();
  // Where Winograd applies (winograd_convolution.h): filters transformed once for all tiles.
  const std::array<int64_t, 2> stride_hw{g.stride_h, g.stride_w}, padding_hw{g.pad_h, g.pad_w};
  std::optional<WinogradFilters> winograd;
  if (winograd_applies(input, weight, stride_hw, padding_hw)) winograd = winograd_filters(weight);
  const WinogradFilters* filters = winograd ? &*winograd : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "conv2d_relu_max_pool2d_forward", [&] {
    if (forward_by_samples(g.batch, threads)) {
      // A thread's tile is its share of the batch's: the same bytes per thread as below.
      const int64_t chunk = std::min(std::max<int64_t>(1, tile / threads), ceil_div(g.batch, threads));
      forward_samples_per_thread<scalar_t>(input, weight_cl, bias, g, output, argmax, chunk,
                                           filters);
      return;
    }
    for (int64_t n0 = 0; n0 < g.batch; n0 += tile) {
      const int64_t n1 = std::min(n0 + tile, g.batch);
      const at::Tensor conv =
          convolution(input.narrow(0, n0, n1 - n0), weight_cl, bias, g, filters);
      relu_max_pool2d<scalar_t>(conv, output, argmax, g, n0, n1, nullptr, nullptr, nullptr);
    }
  });
  return {output, argmax};
}

// The bias gradient: per channel, the sum of the pooled gradients that pass ReLU.
template <typename scalar_t>
at::Tensor bias_gradient(const at::Tensor& grad_output, const at::Tensor& argmax,
                         const ConvPoolGeometry& g) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  const WindowPositions window(g);
  at::Tensor partial =
      at::zeros({at::get_num_threads(), g.out_channels},
                grad_output.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* partial_data = partial.mutable_data_ptr<acc_t>();
  at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
    acc_t* sum = partial_data + at::get_thread_num() * g.out_channels;
    for (int64_t n = n_begin; n < n_end; ++n) {
      for_each_argmax_hit<scalar_t>(
          grad_output, argmax, g, window, n,
          [&](int64_t c, int64_t, int64_t, int64_t, int64_t, scalar_t grad) { sum[c] += grad; });
    }
  });
  return partial.sum(0).to(grad_output.scalar_type());
}

// t in the given dtype and memory format (t itself when it already is).
at::Tensor in_dtype_and_format(const at::Tensor& t, at::ScalarType dtype, at::MemoryFormat format) {
  if (t.scalar_type() == dtype) return t.contiguous(format);
  at::Tensor converted = at::empty(t.sizes(), t.options().dtype(dtype).memory_format(format));
  converted.copy_(t);
  return converted;
}

// The gradient of the convolution output, written whole by pool_gradient_rows (channels
// last, pool windows that do not overlap), threaded over the batch's convolution rows; with
// `bias`, the bias gradient too (its sum rides along the same pass).
template <typename scalar_t>
at::Tensor pool_gradient_channels_last(const at::Tensor& grad_output, const at::Tensor& argmax,
                                       const ConvPoolGeometry& g, at::Tensor* bias) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  using opmath_t = simd::opmath_t<scalar_t>;
  const auto channels_last = at::MemoryFormat::ChannelsLast;
  at::Tensor grad_conv =
      at::empty({g.batch, g.out_channels, g.conv_h, g.conv_w},
                grad_output.options().memory_format(channels_last));
  const at::Tensor grad_pooled = grad_output.contiguous(channels_last);
  const at::Tensor argmax_pooled = argmax.contiguous(channels_last);
  const int64_t threads = at::get_num_threads();
  at::Tensor partial;
  if (bias != nullptr) {
    partial = at::zeros({threads, g.out_channels},
                        grad_output.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  const int64_t pooled_sample = g.out_h * g.out_w * g.out_channels;
  const int64_t conv_sample = g.conv_h * g.conv_w * g.out_channels;
  const scalar_t* grad_data = grad_pooled.const_data_ptr<scalar_t>();
  const uint8_t* argmax_data = argmax_pooled.const_data_ptr<uint8_t>();
  scalar_t* conv_data = grad_conv.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.batch * g.conv_h, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> row_sum(g.out_channels + simd::Vec64<opmath_t>::lanes);
    acc_t* bias_total = bias != nullptr ? partial.mutable_data_ptr<acc_t>() +
                                              at::get_thread_num() * g.out_channels
                                        : nullptr;
    for (int64_t row = begin; row < end;) {
      const int64_t n = row / g.conv_h;
      const int64_t row_end = std::min(end, (n + 1) * g.conv_h);
      CIFARNET_ISA_DISPATCH(pool_gradient_rows<scalar_t>, grad_data + n * pooled_sample,
                            argmax_data + n * pooled_sample, conv_data + n * conv_sample, g,
                            row - n * g.conv_h, row_end - n * g.conv_h, row_sum.data(),
                            bias_total);
      row = row_end;
    }
  });
  if (bias != nullptr) *bias = partial.sum(0).to(grad_output.scalar_type());
  return grad_conv;
}

// The dense backward: the full gradient of the convolution output, from the argmax, through
// at::convolution_backward (oneDNN: AVX-512 FMA for float32, AMX or AVX512-BF16 for
// bfloat16 where the CPU has them). Channels-last data with pool windows that do not overlap
// takes pool_gradient_channels_last (and `bias`, where given, is filled on the way);
// otherwise the gradient is scattered into zeros, overlapping windows adding several
// gradients into one element: for 16-bit data in float32, rounded once.
// NB: that runs once over the whole batch, outside any parallel region of ours: oneDNN's
// weight-gradient kernel plans its threads when its primitive is created and deadlocks when
// run inside a region with fewer threads than it planned for.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> dense_conv_gradients(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, const ConvPoolGeometry& g, at::MemoryFormat format,
    std::array<bool, 3> output_mask, at::Tensor* bias) {
  const bool overlapping = g.pool_stride_h < g.pool_h || g.pool_stride_w < g.pool_w;
  at::Tensor grad_conv;
  if (!overlapping && format == at::MemoryFormat::ChannelsLast) {
    grad_conv = pool_gradient_channels_last<scalar_t>(grad_output, argmax, g, bias);
  } else {
    if (bias != nullptr) *bias = bias_gradient<scalar_t>(grad_output, argmax, g);
    const bool add_in_float = overlapping && sizeof(scalar_t) == 2;
    // NB: at::empty, not at::zeros: at::zeros drops the memory format of its options, and a
    // gradient not in `format` costs convolution_backward a transposing copy.
    grad_conv = at::empty({g.batch, g.out_channels, g.conv_h, g.conv_w},
                          grad_output.options()
                              .dtype(add_in_float ? at::kFloat : grad_output.scalar_type())
                              .memory_format(format))
                    .zero_();
    const WindowPositions window(g);
    const Strides4d cs(grad_conv);
    auto scatter = [&](auto* conv_data) {
      // Windows overlap only within a sample: no two threads add to the same element.
      at::parallel_for(0, g.batch, 1, [&](int64_t n_begin, int64_t n_end) {
        for (int64_t n = n_begin; n < n_end; ++n) {
          for_each_argmax_hit<scalar_t>(
              grad_output, argmax, g, window, n,
              [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w, scalar_t grad) {
                conv_data[n * cs.n + c * cs.c + h * cs.h + w * cs.w] += grad;
              });
        }
      });
    };
    if (add_in_float) {
      scatter(grad_conv.mutable_data_ptr<float>());
      grad_conv = in_dtype_and_format(grad_conv, grad_output.scalar_type(), format);
    } else {
      scatter(grad_conv.mutable_data_ptr<scalar_t>());
    }
  }
  auto [grad_input, grad_weight, unused] = at::convolution_backward(
      grad_conv, input, weight, std::nullopt, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {1, 1},
      /*transposed=*/false, {0, 0}, /*groups=*/1, {output_mask[0], output_mask[1], false});
  return {grad_input, grad_weight};
}

// Whether to take the sparse backward: with at most one argmax per two convolution outputs
// (2x2 pools: one per four), visiting only the argmax positions does at least 2x less
// arithmetic than a dense convolution backward. Non-finite inputs or weights go dense, where
// the zeros of the pre-pool gradient multiply them into NaN, as natively.
bool sparse_backward_applies(const at::Tensor& input, const at::Tensor& weight,
                             const ConvPoolGeometry& g) {
  if (2 * g.out_h * g.out_w > g.conv_h * g.conv_w) return false;
  // A non-finite element makes the sum non-finite (a finite sum may only overflow: then the
  // dense path is merely slower).
  return std::isfinite(input.sum().item<double>()) && std::isfinite(weight.sum().item<double>());
}

// CIFARNET_CONV_BACKWARD=sparse or =dense forces one backward (for tests and measurements);
// nullopt leaves the choice to the rules below.
std::optional<bool> forced_sparse_backward() {
  const char* forced = env_setting("CIFARNET_CONV_BACKWARD", {"sparse", "dense"});
  if (forced == nullptr) return std::nullopt;
  return std::strcmp(forced, "sparse") == 0;
}

// Whether the sparse backward (in float32) beats the dense one for 16-bit data, where the dense
// one hands a bfloat16/float16 gradient to oneDNN. Measured on the study's three layers (batch
// 128, 2 threads, 2x2 pools, time of the dense backward over the sparse one) on a Xeon with
// AMX-BF16 and AVX512-FP16 but no AMX-FP16:
//   bfloat16 with AMX:                          0.92, 0.74, 0.77  -> dense
//     (0.21, 0.22, 0.44 at 1 thread once the dense gradient was channels last, written in
//     one pass; the rows below predate that and may now favour dense more often)
//   bfloat16, oneDNN capped at AVX512-BF16:     12.7, 1.23, 0.99  -> sparse
//   bfloat16, oneDNN capped at AVX2:            3.7, 10.8, 6.9    -> sparse
//   float16 (no AMX-FP16):                      42 (conv1)        -> sparse
// So: dense where the CPU has AMX for the dtype, sparse elsewhere.
template <typename scalar_t>
bool low_precision_sparse_backward_wins() {
  static const bool amx_bf16 = cpu_has_amx_bf16();
  return !(std::is_same_v<scalar_t, c10::BFloat16> && amx_bf16);
}

// The sparse loops vectorise along a kernel row of C_in x kW input values. Where a row is
// shorter than one 64-byte vector they run mostly masked lanes, while oneDNN's channels-last
// backward handles such layers well: the study's conv1 (3 channels, 5 wide) in float32,
// channels-last, batch 128, 2 threads on a Xeon with AVX-512, forward+backward 7.2-7.5 ms dense
// against 14-16 ms sparse; contiguous inputs a tie (13.0-13.9 against 13.4-13.6), so they stay
// sparse; conv2 and conv3 (rows of 160 and 320 values) sparse or a tie either way. (16-bit
// data has its own rule, low_precision_sparse_backward_wins: its sparse loops run in float32.)
template <typename scalar_t>
bool narrow_rows_go_dense(const ConvPoolGeometry& g, at::MemoryFormat format) {
  return format == at::MemoryFormat::ChannelsLast &&
         g.in_channels * g.kernel_w * static_cast<int64_t>(sizeof(scalar_t)) < 64;
}

// Zero-padded channels-last copy [N][H + 2 pH][W + 2 pW][C] of an (N, C, H, W) tensor, flat,
// in `dtype`, with 64 bytes of slack at the end for the vector loops' whole-vector loads.
at::Tensor padded_channels_last(const at::Tensor& tensor, int64_t pad_h, int64_t pad_w,
                                at::ScalarType dtype) {
  const int64_t n = tensor.size(0), c = tensor.size(1), h = tensor.size(2), w = tensor.size(3);
  const int64_t numel = n * (h + 2 * pad_h) * (w + 2 * pad_w) * c;
  at::Tensor flat =
      at::zeros({numel + 64 / static_cast<int64_t>(c10::elementSize(dtype))}, tensor.options().dtype(dtype));
  flat.narrow(0, 0, numel)
      .view({n, h + 2 * pad_h, w + 2 * pad_w, c})
      .narrow(1, pad_h, h)
      .narrow(2, pad_w, w)
      .copy_(tensor.permute({0, 2, 3, 1}));
  return flat;
}

// The (N, C, H, W) view of the unpadded interior of a padded_channels_last buffer.
at::Tensor padded_interior(const at::Tensor& flat, at::IntArrayRef sizes, int64_t pad_h,
                           int64_t pad_w) {
  const int64_t n = sizes[0], c = sizes[1], h = sizes[2], w = sizes[3];
  return flat.narrow(0, 0, n * (h + 2 * pad_h) * (w + 2 * pad_w) * c)
      .view({n, h + 2 * pad_h, w + 2 * pad_w, c})
      .narrow(1, pad_h, h)
      .narrow(2, pad_w, w)
      .permute({0, 3, 1, 2});
}

// Argmax hits of one sample grouped by convolution position (a counting sort): begin[p] ..
// begin[p + 1] index the weight offsets and gradients of position p.
template <typename scalar_t>
struct HitLists {
  std::vector<int64_t> begin, offsets;
  std::vector<scalar_t> grads;
  HitLists(int64_t keys, int64_t capacity) : begin(keys + 1), offsets(capacity), grads(capacity) {}
};

// One thread's share of the sparse backward's input gradient: the samples it takes from
// `next_sample` (shared by the threads) until none is left. Per sample the argmax hits are
// decoded and sorted by convolution position, then accumulated into the sample's padded
// channels-last gradient [H + 2 pH][W + 2 pW][C_in] (grad_input_padded, sample_stride apart).
// Each sample is written by one thread alone, whichever: the same bits however they share out.
template <typename scalar_t>
void sparse_input_gradient_samples(scalar_t* grad_input_padded, const at::Tensor& grad_output,
                                   const at::Tensor& argmax, const scalar_t* weight_rows,
                                   const ConvPoolGeometry& g, int64_t row_stride,
                                   int64_t sample_stride, std::atomic<int64_t>& next_sample) {
  const WindowPositions window(g);
  const int64_t channel_len = g.kernel_h * g.kernel_w * g.in_channels;
  const int64_t positions = g.conv_h * g.conv_w;
  const int64_t windows = g.out_channels * g.out_h * g.out_w;
  const int64_t l1d_bytes = cache_sizes().l1d_bytes;
  HitLists<scalar_t> by_position(positions, windows);
  std::vector<int64_t> hit_channel(windows), hit_position(windows);
  std::vector<scalar_t> hit_grad(windows);
  for (int64_t n = next_sample++; n < g.batch; n = next_sample++) {
    int64_t hits = 0;
    for_each_argmax_hit<scalar_t>(
        grad_output, argmax, g, window, n,
        [&](int64_t c, int64_t, int64_t, int64_t h, int64_t w, scalar_t grad) {
          hit_channel[hits] = c;
          hit_position[hits] = h * g.conv_w + w;
          hit_grad[hits] = grad;
          ++hits;
        });
    std::vector<int64_t>& begin = by_position.begin;
    std::fill(begin.begin(), begin.end(), 0);
    for (int64_t i = 0; i < hits; ++i) ++begin[hit_position[i] + 1];
    for (size_t p = 1; p < begin.size(); ++p) begin[p] += begin[p - 1];
    for (int64_t i = 0; i < hits; ++i) {
      const int64_t slot = begin[hit_position[i]]++;
      by_position.offsets[slot] = hit_channel[i] * channel_len;
      by_position.grads[slot] = hit_grad[i];
    }
    // The fill advanced each begin to the next position's: shift back.
    for (size_t p = begin.size() - 1; p > 0; --p) begin[p] = begin[p - 1];
    begin[0] = 0;
    CIFARNET_ISA_DISPATCH(sparse_input_grad_sample<scalar_t>,
                          grad_input_padded + n * sample_stride, g, row_stride, weight_rows,
                          by_position.begin.data(), by_position.offsets.data(),
                          by_position.grads.data(), l1d_bytes);
  }
}

// Output channels per chunk of the sparse weight gradient: about four chunks a thread, so a
// thread slowed by another process on its core leaves at most one chunk's wait at the end.
// Smaller chunks would read each tile of the padded input into L2 once more per chunk.
int64_t weight_gradient_channel_chunk(int64_t out_channels, int64_t threads) {
  return std::max<int64_t>(1, out_channels / (4 * threads));
}

// One thread's share of the sparse backward's weight gradient, [C_out][kH][kW * C_in]: the
// chunks of output channels it takes from `next_chunk` (shared by the threads) until none is
// left. The thread owns its channels' rows of the one gradient (memory independent of the
// thread count, no reduction) and walks the batch in tiles of samples whose padded input fits
// half an L2 cache, so the tile stays there across the chunk's channels. Per channel and tile,
// the argmax hits are listed and accumulated in one pass over the weight rows, tile after tile:
// the same sums in the same order whichever thread takes the chunk.
template <typename scalar_t>
void sparse_weight_gradient_channels(scalar_t* grad_weight, const at::Tensor& grad_output,
                                     const at::Tensor& argmax, const scalar_t* input_padded,
                                     const ConvPoolGeometry& g, int64_t row_stride,
                                     int64_t sample_stride, int64_t channel_chunk,
                                     std::atomic<int64_t>& next_chunk) {
  const Strides4d gs(grad_output), as(argmax);
  const WindowPositions window(g);
  const int64_t channel_len = g.kernel_h * g.kernel_w * g.in_channels;
  const int64_t sample_bytes = sample_stride * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t tile =
      std::clamp<int64_t>(cache_sizes().l2_bytes / 2 / std::max<int64_t>(1, sample_bytes), 1,
                          g.batch);
  const int64_t chunks = ceil_div(g.out_channels, channel_chunk);
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>();
  const uint8_t* argmax_data = argmax.const_data_ptr<uint8_t>();
  std::vector<int64_t> offsets(tile * g.out_h * g.out_w);
  std::vector<scalar_t> grads(offsets.size());
  for (int64_t i = next_chunk++; i < chunks; i = next_chunk++) {
    const int64_t c_begin = i * channel_chunk;
    const int64_t c_end = std::min(c_begin + channel_chunk, g.out_channels);
    for (int64_t n0 = 0; n0 < g.batch; n0 += tile) {
      const int64_t n1 = std::min(n0 + tile, g.batch);
      for (int64_t c = c_begin; c < c_end; ++c) {
        int64_t hits = 0;
        for (int64_t n = n0; n < n1; ++n) {
          for (int64_t ph = 0; ph < g.out_h; ++ph) {
            for (int64_t pw = 0; pw < g.out_w; ++pw) {
              const uint8_t offset = argmax_data[n * as.n + c * as.c + ph * as.h + pw * as.w];
              if (offset == kArgmaxReluZero) continue;
              const int64_t h = ph * g.pool_stride_h + window.row[offset];
              const int64_t w = pw * g.pool_stride_w + window.column[offset];
              offsets[hits] = (n - n0) * sample_stride + h * g.stride_h * row_stride +
                              w * g.stride_w * g.in_channels;
              grads[hits] = grad_data[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w];
              ++hits;
            }
          }
        }
        if (hits == 0) continue;
        CIFARNET_ISA_DISPATCH(sparse_weight_grad_channel<scalar_t>, grad_weight + c * channel_len,
                              g, row_stride, input_padded + n0 * sample_stride, offsets.data(),
                              grads.data(), hits);
      }
    }
  }
}

// The sparse backward (see conv2d_relu_max_pool2d_loops.h) as one parallel region: the
// threads take samples of the input gradient from one atomic counter, then chunks of output
// channels of the weight gradient from another, so a thread that shares its core with another
// process takes less of the work instead of holding the others at the end of a static share
// (and one region rather than two: each waits for every thread, see forward_tile_bytes).
// Computes in scalar_t (float or double); 16-bit input and weight are widened to float32 by the
// padded copies the loops read anyway, and grad_output must be scalar_t.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> sparse_conv_gradients(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, const ConvPoolGeometry& g, std::array<bool, 3> output_mask) {
  const int64_t row_stride = (g.in_w + 2 * g.pad_w) * g.in_channels;  // one padded input row
  const int64_t sample_stride = (g.in_h + 2 * g.pad_h) * row_stride;
  const int64_t weight_numel = g.out_channels * g.kernel_h * g.kernel_w * g.in_channels;
  const int64_t slack = 64 / sizeof(scalar_t);  // for whole-vector loads past the end
  const at::ScalarType dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const at::TensorOptions options = input.options().dtype(dtype);

  // The weight as [C_out][kH][kW * C_in] rows; the input gradient is accumulated padded.
  at::Tensor weight_rows, grad_input_padded;
  if (output_mask[0]) {
    weight_rows = at::empty({weight_numel + slack}, options);
    weight_rows.narrow(0, 0, weight_numel)
        .view({g.out_channels, g.kernel_h, g.kernel_w, g.in_channels})
        .copy_(weight.permute({0, 2, 3, 1}));
    grad_input_padded = at::zeros({g.batch * sample_stride}, options);
  }
  at::Tensor input_padded, grad_weight_rows;
  if (output_mask[1]) {
    input_padded = padded_channels_last(input, g.pad_h, g.pad_w, dtype);
    grad_weight_rows = at::zeros({g.out_channels, g.kernel_h, g.kernel_w, g.in_channels}, options);
  }
  const int64_t threads = at::get_num_threads();
  const int64_t channel_chunk = weight_gradient_channel_chunk(g.out_channels, threads);
  std::atomic<int64_t> next_sample{0}, next_channel_chunk{0};
  // NB: the workers call no ATen op (raw loops on data pointers), so they need none of the
  // caller's thread-local state that forward_samples_per_thread hands its workers.
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    if (output_mask[0]) {
      sparse_input_gradient_samples<scalar_t>(
          grad_input_padded.mutable_data_ptr<scalar_t>(), grad_output, argmax,
          weight_rows.const_data_ptr<scalar_t>(), g, row_stride, sample_stride, next_sample);
    }
    if (output_mask[1]) {
      sparse_weight_gradient_channels<scalar_t>(
          grad_weight_rows.mutable_data_ptr<scalar_t>(), grad_output, argmax,
          input_padded.const_data_ptr<scalar_t>(), g, row_stride, sample_stride, channel_chunk,
          next_channel_chunk);
    }
  });
  at::Tensor grad_input, grad_weight;
  if (output_mask[0]) grad_input = padded_interior(grad_input_padded, input.sizes(), g.pad_h, g.pad_w);
  if (output_mask[1]) grad_weight = grad_weight_rows.permute({0, 3, 1, 2});
  return {grad_input, grad_weight};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_max_pool2d_backward_kernel(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& argmax, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding, std::array<bool, 3> output_mask) {
  const ConvPoolGeometry g =
      check_conv2d_relu_max_pool2d_args(input, weight, std::nullopt, stride, padding, pool_size,
                                        pool_stride, ceil_mode, pool_padding);
  check_conv2d_relu_max_pool2d_backward_args(grad_output, argmax, input, g);
  TORCH_CHECK(input.is_cpu(), "input must be a CPU tensor for the CPU kernel, got ",
              input.device());
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, input.scalar_type(), "conv2d_relu_max_pool2d_backward", [&] {
        const bool conv_gradients = g.batch > 0 && (output_mask[0] || output_mask[1]);
        // The cheap test first: where 16-bit data goes dense anyway, the finiteness sums
        // over input and weight are not worth reading them for.
        const bool sparse =
            conv_gradients &&
            forced_sparse_backward().value_or(
                sizeof(scalar_t) == 2 ? low_precision_sparse_backward_wins<scalar_t>()
                                      : !narrow_rows_go_dense<scalar_t>(g, format)) &&
            sparse_backward_applies(input, weight, g);
        if (conv_gradients && !sparse) {
          std::tie(grad_input, grad_weight) = dense_conv_gradients<scalar_t>(
              grad_output, input, weight, argmax, g, format, output_mask,
              output_mask[2] ? &grad_bias : nullptr);
          return;
        }
        if (output_mask[2]) {
          grad_bias = bias_gradient<scalar_t>(grad_output, argmax, g);
        }
        if (!conv_gradients) {
          return;
        }
        if constexpr (sizeof(scalar_t) == 2) {
          // 16-bit data: the sparse loops run in float32 on widened copies.
          std::tie(grad_input, grad_weight) = sparse_conv_gradients<float>(
              grad_output.to(at::kFloat), input, weight, argmax, g, output_mask);
        } else {
          std::tie(grad_input, grad_weight) = sparse_conv_gradients<scalar_t>(
              grad_output, input, weight, argmax, g, output_mask);
        }
      });
  if (g.batch == 0) {  // nothing flowed back
    if (output_mask[0]) grad_input = at::zeros(input.sizes(), input.options());
    if (output_mask[1]) grad_weight = at::zeros(weight.sizes(), weight.options());
  }
  // Fixed dtypes, and the convolution's layout for both, as native conv2d's gradients (the
  // fake kernel promises the same).
  if (grad_input.defined()) grad_input = in_dtype_and_format(grad_input, input.scalar_type(), format);
  if (grad_weight.defined()) {
    grad_weight = in_dtype_and_format(grad_weight, weight.scalar_type(), format);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("conv2d_relu_max_pool2d_with_argmax", &conv2d_relu_max_pool2d_forward_kernel);
  m.impl("_conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_kernel);
}

}  // namespace cifarnet::ops
