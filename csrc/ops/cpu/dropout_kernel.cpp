// CPU kernels of dropout with a counter-based mask (philox.h): one pass that draws each
// element's random word and scales or zeroes it, vectorised over 32-element groups and
// threaded over groups. The mask depends only on its key (a seed, or a generator's seed and
// offset) and the element's index, not on the thread count or the ISA, and the backward
// recomputes it from the key.

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../dropout_common.h"
#include "../philox.h"
#include "multiversion.h"
#include "simd.h"

namespace cifarnet::ops {
namespace {

#define CIFARNET_LOOPS_HEADER "dropout_loops.h"
#include "isa_variants.inc"

// Groups per task: enough work (~64K elements) to be worth a thread.
constexpr int64_t kGroupsPerTask = 2048;

// input with `mask` applied: zeroed where its word is below the threshold, else scaled by
// 1 / (1 - p).
at::Tensor apply_mask(const at::Tensor& input, philox::MaskKey mask, const DropoutThreshold& keep,
                      double p) {
  const at::Tensor x = input.contiguous();
  DropoutOutput out(input);
  const int64_t numel = x.numel();
  const int64_t groups = numel / philox::kElementsPerGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout", [&] {
    using opmath = simd::opmath_t<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* result = out.row_major.mutable_data_ptr<scalar_t>();
    if (keep.drop_all) {
      for (int64_t i = 0; i < numel; ++i) {
        result[i] = static_cast<scalar_t>(static_cast<opmath>(in[i]) * opmath(0));
      }
      return;
    }
    const opmath scale = native_dropout_scale<scalar_t, opmath>(p);
    const auto threshold = static_cast<uint32_t>(keep.threshold);
    at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
      CIFARNET_ISA_DISPATCH(dropout_groups<scalar_t>, in, result, begin, end, mask, threshold,
                            scale);
    });
    for (int64_t i = groups * philox::kElementsPerGroup; i < numel; ++i) {
      const opmath v = static_cast<opmath>(in[i]);
      const bool kept = philox::element_word(static_cast<uint64_t>(i), mask) >= threshold;
      result[i] = static_cast<scalar_t>(kept ? v * scale : v * opmath(0));
    }
  });
  return out.finish();
}

// A seed drawn from the default CPU generator (which torch.manual_seed seeds), at offset 0: the
// CPU generator has no Philox offset, and a fresh 64-bit seed is a fresh mask.
std::array<int64_t, 2> draw_seed_offset() {
  auto* generator = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  // See Note [Acquire lock when using random generators]
  std::lock_guard<std::mutex> lock(generator->mutex_);
  return {static_cast<int64_t>(generator->random64()), 0};
}

philox::MaskKey mask_key_of(const std::array<int64_t, 2>& seed_offset) {
  return philox::generator_mask_key(static_cast<uint64_t>(seed_offset[0]),
                                    static_cast<uint64_t>(seed_offset[1]));
}

at::Tensor dropout_kernel(const at::Tensor& input, const std::optional<at::Tensor>& seed,
                          double p) {
  const DropoutThreshold keep = check_dropout_arguments(input, p);
  const philox::MaskKey mask =
      seed.has_value() ? explicit_mask_key(*seed) : mask_key_of(draw_seed_offset());
  return apply_mask(input, mask, keep, p);
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_kernel(const at::Tensor& input, double p) {
  const DropoutThreshold keep = check_dropout_arguments(input, p);
  const std::array<int64_t, 2> seed_offset = draw_seed_offset();
  at::Tensor saved = at::empty({2}, input.options().dtype(at::kLong));
  std::copy(seed_offset.begin(), seed_offset.end(), saved.mutable_data_ptr<int64_t>());
  return {apply_mask(input, mask_key_of(seed_offset), keep, p), saved};
}

at::Tensor dropout_backward_kernel(const at::Tensor& grad_output, const at::Tensor& seed_offset,
                                   double p) {
  const DropoutThreshold keep = check_dropout_arguments(grad_output, p, "grad_output");
  check_seed_offset(seed_offset, grad_output);
  const at::Tensor saved = seed_offset.contiguous();
  const int64_t* values = saved.const_data_ptr<int64_t>();
  return apply_mask(grad_output, mask_key_of({values[0], values[1]}), keep, p);
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) {
  m.impl("dropout", &dropout_kernel);
  m.impl("_dropout_forward", &dropout_forward_kernel);
  m.impl("_dropout_backward", &dropout_backward_kernel);
}

}  // namespace cifarnet::ops
