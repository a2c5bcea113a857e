// Winograd F(2x2, 5x5) and F(4x4, 3x3) convolutions on the CPU: the study's 5x5 convolutions
// (conv2, conv3) and 3x3 ones (ResNet's, VGG's) in the batch-norm chain (forward, both
// gradients), in batch norm -> ReLU -> conv (forward, both gradients) and in conv -> ReLU ->
// pool (forward; its sparse backward does a quarter of the dense arithmetic, no more than
// Winograd's 36% or 25%).
//
// Each 2 x 2 (4 x 4) block of outputs (a tile) comes from a 6 x 6 window of the input.
// Transformed (V = B^T d B per input channel, U = G g G^T per filter), the tile's outputs are
// A^T M A with M = sum over input channels of U * V elementwise: at each of the 36 points a
// matrix product [tiles x in_channels] x [in_channels x out_channels]. That is 36 multiplies
// per input channel for four outputs where direct convolution takes 100 (for sixteen where it
// takes 144): 2.8x (4x) fewer, which is what lets the convolutions beat oneDNN's direct ones
// on CPUs (AVX2) where those already run at the FMA units' peak. Tiles go in blocks sized so
// that a block's V and M stay in the L2 cache. bfloat16 tensors are computed in float32 and
// rounded once (see winograd_applies).
//
// Backward: the input gradient is the same forward over the output gradient with the filters
// flipped and transposed (padding r - 1 - p); the weight gradient is the adjoint of the
// forward: dU = sum over tiles of (A dY A^T) * V, a product [in_channels x tiles] x [tiles x
// out_channels] per point, then dW = G^T dU G.
//
// The transforms mix a tile's 36 inputs, so an infinity or NaN would spread over outputs whose
// windows never saw it; any non-finite value (in or out) sends the call to oneDNN, which gives
// native's pattern. Rounding: 1-3 times oneDNN's error on the study's layers (4-10 times on
// 64-channel 3x3 ones), but on the scale of a tile's outputs (a filter's, for the weight
// gradient) rather than each output's own (tests/test_winograd.py states the bounds).

#include "winograd_convolution.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "../convolution.h"
#include "cache_sizes.h"
#include "multiversion.h"
#include "simd.h"

namespace cifarnet::ops {
namespace {

// One convolution's sizes, channels last: input [n][height][width][channels], output
// [n][out_h][out_w][out_channels]; the padded channel counts are those of the block buffers.
struct Geometry {
  int64_t height, width, channels, channels_padded;
  int64_t out_h, out_w, out_channels, out_channels_padded;
  int64_t pad_h, pad_w, tiles_h, tiles_w;
  int64_t tile;  // outputs along a tile's side: 2 (5x5 filters) or 4 (3x3)
};

// The loops, compiled for AVX2 (x86-64-v3) alone: the only class they have been measured on
// (see winograd_applies_to_sizes). Where GCC cannot compile ISA variants, Winograd never runs.
#if CIFARNET_HAS_ISA_VARIANTS
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace isa_avx2 {
constexpr int kVectorRegisters = 16, kVectorRegisterBytes = 32;
#include "winograd_loops.h"
}  // namespace isa_avx2
#pragma GCC pop_options
#endif

constexpr int kPoints = 36;

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Floats per vector of the loops (AVX2).
constexpr int64_t kLanes = 8;

// What CIFARNET_CONV_ALGORITHM asks for.
enum class Algorithm { automatic, winograd, native };

Algorithm requested_algorithm() {
  const char* value = env_setting("CIFARNET_CONV_ALGORITHM", {"auto", "winograd", "native"});
  if (value == nullptr || std::strcmp(value, "auto") == 0) return Algorithm::automatic;
  return std::strcmp(value, "winograd") == 0 ? Algorithm::winograd : Algorithm::native;
}

// Outputs along a tile's side for a filter of this side: 6 transformed points either way.
int64_t tile_for_kernel(int64_t kernel) { return 7 - kernel; }

Geometry make_geometry(const at::Tensor& input, int64_t out_channels, int64_t kernel,
                       at::IntArrayRef padding) {
  Geometry g{};
  g.height = input.size(2), g.width = input.size(3);
  g.channels = input.size(1), g.channels_padded = round_up(g.channels, kLanes);
  g.pad_h = padding[0], g.pad_w = padding[1];
  g.out_h = g.height + 2 * g.pad_h - (kernel - 1), g.out_w = g.width + 2 * g.pad_w - (kernel - 1);
  g.out_channels = out_channels, g.out_channels_padded = round_up(out_channels, 2 * kLanes);
  g.tile = tile_for_kernel(kernel);
  g.tiles_h = (g.out_h + g.tile - 1) / g.tile, g.tiles_w = (g.out_w + g.tile - 1) / g.tile;
  return g;
}

// body(std::integral_constant<int, tile>{}) for the geometry's tile: the loops' template
// argument.
template <typename Body>
void with_tile(int64_t tile, const Body& body) {
  if (tile == 2) {
    body(std::integral_constant<int, 2>{});
  } else {
    TORCH_INTERNAL_ASSERT(tile == 4, "Winograd tiles are 2 or 4 outputs wide, got ", tile);
    body(std::integral_constant<int, 4>{});
  }
}

// The register blocks' rows, twice: the fewest tiles a block takes.
constexpr int64_t kMinBlockTiles = 12;

// Bytes of one tile in a block's two buffers (transformed inputs and products).
int64_t block_bytes_per_tile(int64_t channels_padded, int64_t out_channels_padded) {
  return kPoints * (channels_padded + out_channels_padded) * static_cast<int64_t>(sizeof(float));
}

// Tiles per block: as many (a multiple of 12) as keep the block's buffers within two thirds of
// one core's L2 (the rest: the filters being multiplied, the input rows being transformed),
// and at least 12. On a Zen 3 (512 KiB L2) the study's conv2 and conv3 ran fastest at 24 and
// 12 tiles, which this gives; half the L2 (12, 12) and 48 or more tiles were up to 20% slower.
int64_t block_tiles(const Geometry& g) {
  const int64_t fitting = cache_sizes().l2_bytes * 2 / 3 /
                          block_bytes_per_tile(g.channels_padded, g.out_channels_padded);
  return std::max(kMinBlockTiles, fitting / kMinBlockTiles * kMinBlockTiles);
}

// A buffer of `size` floats, 64-byte aligned (the CPU allocator's alignment, as the loops'
// aligned vector accesses need).
at::Tensor float_buffer(int64_t size) { return at::empty({size}, at::kFloat); }

#if CIFARNET_HAS_ISA_VARIANTS
// The filters transformed. With `adjoint`, those of the convolution by `weight` flipped with
// its channel axes swapped (whose forward is the input gradient of the convolution by
// `weight`).
WinogradFilters transform(const at::Tensor& bfloat16_or_float_weight, bool adjoint) {
  const at::Tensor weight = bfloat16_or_float_weight.to(at::kFloat);
  WinogradFilters filters;
  filters.channels = weight.size(adjoint ? 0 : 1);
  filters.out_channels = weight.size(adjoint ? 1 : 0);
  filters.kernel = weight.size(2);
  const int64_t c_pad = round_up(filters.channels, kLanes);
  const int64_t k_pad = round_up(filters.out_channels, 2 * kLanes);
  filters.transformed = float_buffer(kPoints * c_pad * k_pad);
  with_tile(tile_for_kernel(filters.kernel), [&](auto tile) {
    isa_avx2::winograd::transform_filters<decltype(tile)::value>(
        weight.data_ptr<float>(), weight.strides().data(), adjoint, filters.channels,
        filters.out_channels, c_pad, k_pad, filters.transformed.data_ptr<float>());
  });
  return filters;
}

// Tiles whose products are summed in float before the sum goes into the double one: a float
// running sum over thousands of tiles lost digits enough to miss the bound the ops' tests set
// against native (ten times native's error in the study's conv2 weight gradient), and adding
// every block (12-24 tiles) into double took half as long as the products themselves.
constexpr int64_t kTilesPerFloatSum = 96;

// How the weight gradient's work splits between threads: `partial_sums` runs of float sums,
// each run with a double sum of the whole transformed gradient (kPoints x channels x
// out_channels), and each run's output channels in `slices` ranges.
struct WeightGradientSplit {
  int64_t partial_sums, slices;
};

// A run per thread while the runs' sums (8 bytes a value, and 4 for a thread's float sum) take
// no more than `held_bytes`, the float input and output gradient the call holds (or one run
// where a sum takes more); threads beyond the runs split each run's output channels, and each
// of them transforms the run's inputs again. With one run per thread, 64 threads kept 64 sums of
// 7 MB (450 MB) for a 128-channel 3x3 convolution's 12 MB of input and output gradient.
WeightGradientSplit split_weight_gradient(const Geometry& g, int64_t float_sums,
                                          int64_t held_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t run_bytes = kPoints * g.channels_padded * g.out_channels_padded * 12;
  const int64_t fitting = std::max<int64_t>(1, held_bytes / run_bytes);
  const int64_t partial_sums = std::min({threads, float_sums, fitting});
  const int64_t column_groups = g.out_channels_padded / (2 * kLanes);
  return {partial_sums, std::min((threads + partial_sums - 1) / partial_sums, column_groups)};
}

// The weight gradient, in `format`; nullopt where a value was not finite. Blocks of at most
// kTilesPerFloatSum tiles; each float sum covers the same blocks whatever the thread count (its
// groups start at fixed block indices and no run splits one), so the threads change only how
// the double sums of those float sums are grouped: the float gradient came out the same for 1,
// 2 and 3 threads in the tests (where the float sums followed each thread's first block, it
// differed in the last bits). Each run adds its groups' sums in double, then the runs' sums are
// added in run order.
std::optional<at::Tensor> winograd_weight_gradient(const at::Tensor& grad_output,
                                                   const at::Tensor& input, int64_t kernel,
                                                   at::IntArrayRef padding,
                                                   at::MemoryFormat format) {
  const at::Tensor x = input.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = grad_output.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g = make_geometry(x, dy.size(1), kernel, padding);
  const int64_t tiles = x.size(0) * g.tiles_h * g.tiles_w;
  // NB: block_tiles is a multiple of kMinBlockTiles (12), as is kTilesPerFloatSum.
  const int64_t rows = std::min(block_tiles(g), kTilesPerFloatSum);
  const int64_t blocks = (tiles + rows - 1) / rows;
  const int64_t blocks_per_float_sum = kTilesPerFloatSum / rows;
  const int64_t float_sums = (blocks + blocks_per_float_sum - 1) / blocks_per_float_sum;
  const WeightGradientSplit split =
      split_weight_gradient(g, float_sums, (x.numel() + dy.numel()) * sizeof(float));
  const int64_t runs = split.partial_sums, slices = split.slices;
  const int64_t column_groups = g.out_channels_padded / (2 * kLanes);
  const int64_t widest = (column_groups + slices - 1) / slices * 2 * kLanes;
  const int64_t sum_rows = kPoints * g.channels_padded;
  // NB: not zeroed here: each item's first float sum is stored, not added, in its own part
  // (which the thread computing it so touches first, in parallel).
  std::vector<at::Tensor> sums(runs);
  for (at::Tensor& sum : sums) sum = at::empty({sum_rows * g.out_channels_padded}, at::kDouble);
  const float* in = x.data_ptr<float>();
  const float* grad = dy.data_ptr<float>();
  std::atomic<bool> not_finite{false};
  at::parallel_for(0, runs * slices, 1, [&](int64_t item_begin, int64_t item_end) {
    const at::Tensor v = float_buffer(kPoints * rows * g.channels_padded);
    const at::Tensor e = float_buffer(kPoints * rows * widest);
    const at::Tensor products = float_buffer(sum_rows * widest);
    float* product_sum = products.data_ptr<float>();
    for (int64_t item = item_begin; item < item_end; ++item) {
      const int64_t run = item / slices, slice = item % slices;
      const int64_t k_begin = column_groups * slice / slices * 2 * kLanes;
      const int64_t k_end = column_groups * (slice + 1) / slices * 2 * kLanes;
      const int64_t begin = float_sums * run / runs * blocks_per_float_sum;
      const int64_t end = std::min(blocks, float_sums * (run + 1) / runs * blocks_per_float_sum);
      for (int64_t block = begin; block < end; ++block) {
        const int64_t first = block * rows, count = std::min(rows, tiles - first);
        const bool starts_sum = block % blocks_per_float_sum == 0;
        const bool ends_sum = (block + 1) % blocks_per_float_sum == 0 || block + 1 == end;
        bool block_not_finite = false;
        with_tile(g.tile, [&](auto tile) {
          isa_avx2::winograd::weight_gradient_block<decltype(tile)::value>(
              in, grad, g, first, count, k_begin, k_end, v.data_ptr<float>(),
              e.data_ptr<float>(), product_sum, /*accumulate=*/!starts_sum, &block_not_finite);
        });
        if (block_not_finite) not_finite = true;
        if (ends_sum) {
          const bool first_sum = block < begin + blocks_per_float_sum;
          isa_avx2::winograd::add_products(product_sum, sum_rows, k_end - k_begin,
                                           sums[run].data_ptr<double>(), g.out_channels_padded,
                                           k_begin, /*accumulate=*/!first_sum);
        }
      }
    }
  });
  if (not_finite) return std::nullopt;
  std::vector<const double*> sum_data;
  for (const at::Tensor& sum : sums) sum_data.push_back(sum.data_ptr<double>());
  at::Tensor grad_weight =
      at::empty({g.out_channels, g.channels, kernel, kernel}, x.options().memory_format(format));
  bool weight_not_finite = false;
  with_tile(g.tile, [&](auto tile) {
    isa_avx2::winograd::transform_filter_gradients<decltype(tile)::value>(
        sum_data.data(), runs, g.channels, g.out_channels, g.channels_padded,
        g.out_channels_padded, grad_weight.data_ptr<float>(), grad_weight.strides().data(),
        &weight_not_finite);
  });
  if (weight_not_finite) return std::nullopt;
  return grad_weight.to(input.scalar_type());
}

// The input gradient: the forward over the output gradient with the filters flipped and their
// channel axes swapped, padded by r - 1 - p for r x r filters.
std::optional<at::Tensor> winograd_input_gradient(const at::Tensor& grad_output,
                                                  const at::Tensor& weight,
                                                  at::IntArrayRef padding) {
  const int64_t reach = weight.size(2) - 1;
  const std::array<int64_t, 2> adjoint_padding{reach - padding[0], reach - padding[1]};
  return winograd_convolution(grad_output, transform(weight, /*adjoint=*/true), std::nullopt,
                              adjoint_padding);
}

#endif  // CIFARNET_HAS_ISA_VARIANTS

}  // namespace

WinogradFilters winograd_filters(const at::Tensor& weight) {
#if CIFARNET_HAS_ISA_VARIANTS
  return transform(weight, /*adjoint=*/false);
#else
  TORCH_INTERNAL_ASSERT(false, "Winograd convolutions need GCC's ISA variants");
  return {};
#endif
}

std::optional<at::Tensor> winograd_convolution(const at::Tensor& input,
                                               const WinogradFilters& filters,
                                               const std::optional<at::Tensor>& bias,
                                               at::IntArrayRef padding) {
#if CIFARNET_HAS_ISA_VARIANTS
  const at::Tensor x = input.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  const Geometry g = make_geometry(x, filters.out_channels, filters.kernel, padding);
  std::vector<float> padded_bias;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor b = bias->to(at::kFloat).contiguous();
    padded_bias.assign(b.data_ptr<float>(), b.data_ptr<float>() + g.out_channels);
    padded_bias.resize(g.out_channels_padded, 0.0f);
  }
  at::Tensor output = at::empty({x.size(0), g.out_channels, g.out_h, g.out_w},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const int64_t tiles = x.size(0) * g.tiles_h * g.tiles_w, rows = block_tiles(g);
  const int64_t blocks = (tiles + rows - 1) / rows;
  const float* in = x.data_ptr<float>();
  const float* u = filters.transformed.data_ptr<float>();
  float* out = output.data_ptr<float>();
  std::atomic<bool> not_finite{false};
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor v = float_buffer(kPoints * rows * g.channels_padded);
    const at::Tensor m = float_buffer(kPoints * rows * g.out_channels_padded);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * rows, count = std::min(rows, tiles - first);
      bool block_not_finite = false;
      with_tile(g.tile, [&](auto tile) {
        isa_avx2::winograd::forward_block<decltype(tile)::value>(
            in, u, padded_bias.empty() ? nullptr : padded_bias.data(), g, first, count, rows,
            v.data_ptr<float>(), m.data_ptr<float>(), out, &block_not_finite);
      });
      if (block_not_finite) not_finite = true;
    }
  });
  if (not_finite) return std::nullopt;
  return output.to(input.scalar_type());
#else
  TORCH_INTERNAL_ASSERT(false, "Winograd convolutions need GCC's ISA variants");
  return std::nullopt;
#endif
}

bool winograd_applies_to_sizes(int64_t channels, int64_t out_channels, int64_t height,
                               int64_t width, at::IntArrayRef kernel, at::IntArrayRef stride,
                               at::IntArrayRef padding) {
  if (!CIFARNET_HAS_ISA_VARIANTS) return false;
  // By default on the AVX2 class (no AVX-512, or capped at it with CIFARNET_CPU_ISA=avx2),
  // where oneDNN's direct convolutions already run at the FMA units' peak and Winograd was
  // measured faster; CIFARNET_CONV_ALGORITHM=winograd also runs it on AVX-512 CPUs (with these
  // AVX2 loops; not measured there yet), =native never.
  switch (requested_algorithm()) {
    case Algorithm::native:
      return false;
    case Algorithm::winograd:
      if (cpu_isa() != CpuIsa::avx2 && cpu_isa() != CpuIsa::avx512) return false;
      break;
    case Algorithm::automatic:
      if (cpu_isa() != CpuIsa::avx2) return false;
      break;
  }
  const int64_t r = kernel[0];
  if (channels <= 0 || out_channels <= 0 || (r != 3 && r != 5) || kernel[1] != r ||
      stride[0] != 1 || stride[1] != 1 || padding[0] < 0 || padding[1] < 0 || padding[0] > r - 1 ||
      padding[1] > r - 1) {
    return false;
  }
  // Every filter element meets the image somewhere (height + padding >= r): the transforms
  // spread rounding over the whole filter, which would leave a few ulps of the filter's scale
  // in gradients that are exactly zero (elements that only ever meet padding); such inputs
  // are a few pixels across, where direct convolution is as fast.
  if (height + padding[0] < r || width + padding[1] < r) return false;
  // Multiplies: 36 per tile and (padded) channel pair against direct's r^2 per output and
  // channel pair, counting the outputs a partial tile computes past the edge, in both
  // directions (the input gradient, a convolution of the output gradient padded by r - 1 - p,
  // swaps the channel counts and the image sizes). Winograd must take at most half: the rest
  // pays for the transforms.
  const int64_t m = tile_for_kernel(r);
  const auto pays = [&](int64_t in, int64_t out, int64_t h, int64_t w) {
    const int64_t tiles = ((h + m - 1) / m) * ((w + m - 1) / m);
    return 2 * 36 * tiles * round_up(in, kLanes) * round_up(out, 2 * kLanes) <=
           r * r * h * w * in * out;
  };
  const int64_t out_h = height + 2 * padding[0] - (r - 1), out_w = width + 2 * padding[1] - (r - 1);
  if (!pays(channels, out_channels, out_h, out_w) || !pays(out_channels, channels, height, width)) {
    return false;
  }
  // The smallest block's buffers fit in one core's L2. With more channels a block's
  // transformed values leave the cache between the transforms and the products, and the
  // transformed filters (36 C K floats, read once per block) outgrow the caches: on a Zen 3
  // (512 KiB L2; 12 tiles of 128 and 128 channels take 432 KiB) ResNet's 3x3 convolutions ran
  // at 1.7-2.5x oneDNN's speed with 64 and 128 channels, level with 256 and 0.2x with 512.
  const auto fits = [&](int64_t in, int64_t out) {
    return kMinBlockTiles * block_bytes_per_tile(round_up(in, kLanes), round_up(out, 2 * kLanes)) <=
           cache_sizes().l2_bytes;
  };
  return fits(channels, out_channels) && fits(out_channels, channels);
}

bool winograd_applies(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                      at::IntArrayRef padding) {
  // First, so that a bad CIFARNET_CONV_ALGORITHM is refused for every call, not only for the
  // dtypes and devices Winograd could take.
  const Algorithm algorithm = requested_algorithm();
  // bfloat16 where the CPU has no bfloat16 arithmetic (the AVX2 class; anywhere with
  // CIFARNET_CONV_ALGORITHM=winograd), computed in float32 and rounded once, as oneDNN's
  // bfloat16 convolution accumulates in float32 and rounds: on such CPUs oneDNN emulates
  // bfloat16 at a fraction of float32's speed (a 64-channel 3x3 layer: 7x slower).
  const bool dtype_applies =
      input.scalar_type() == at::kFloat ||
      (input.scalar_type() == at::kBFloat16 &&
       (cpu_isa() == CpuIsa::avx2 || algorithm == Algorithm::winograd));
  if (input.device().type() != at::kCPU || !dtype_applies ||
      weight.scalar_type() != input.scalar_type() || input.dim() != 4 || weight.dim() != 4 ||
      weight.size(1) != input.size(1)) {
    return false;
  }
  return winograd_applies_to_sizes(input.size(1), weight.size(0), input.size(2), input.size(3),
                                   {weight.size(2), weight.size(3)}, stride, padding);
}

std::optional<at::Tensor> winograd_convolution_where_it_applies(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding) {
#if CIFARNET_HAS_ISA_VARIANTS
  if (input.size(0) > 0 && winograd_applies(input, weight, stride, padding)) {
    return winograd_convolution(input, winograd_filters(weight), bias, padding);
  }
#endif
  return std::nullopt;
}

at::Tensor cpu_channels_last_convolution(const at::Tensor& input, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias,
                                         const ConvPoolGeometry& g, at::IntArrayRef stride,
                                         at::IntArrayRef padding) {
  if (auto output = winograd_convolution_where_it_applies(input, weight, bias, stride, padding)) {
    return *output;
  }
  return channels_last_convolution(input, weight, bias, g, stride, padding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cpu_convolution_grads(
    const at::Tensor& grad_conv, const at::Tensor& input, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 3> output_mask) {
#if CIFARNET_HAS_ISA_VARIANTS
  if (input.size(0) == 0 || !winograd_applies(input, weight, stride, padding)) {
    return convolution_grads(grad_conv, input, weight, stride, padding, output_mask);
  }
  std::optional<at::Tensor> grad_input, grad_weight;
  if (output_mask[0]) grad_input = winograd_input_gradient(grad_conv, weight, padding);
  const at::MemoryFormat format = conv_output_memory_format(input, weight);
  if (output_mask[1]) {
    grad_weight = winograd_weight_gradient(grad_conv, input, weight.size(2), padding, format);
  }
  if ((output_mask[0] && !grad_input) || (output_mask[1] && !grad_weight)) {
    return convolution_grads(grad_conv, input, weight, stride, padding, output_mask);
  }
  at::Tensor grad_bias;
  if (output_mask[2]) grad_bias = grad_conv.sum({0, 2, 3});
  return {grad_input ? grad_input->contiguous(format) : at::Tensor(),
          grad_weight ? grad_weight->contiguous(format) : at::Tensor(), grad_bias};
#else
  return convolution_grads(grad_conv, input, weight, stride, padding, output_mask);
#endif
}

}  // namespace cifarnet::ops
