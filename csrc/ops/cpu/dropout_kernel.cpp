// CPU kernel of dropout with a counter-based mask (philox.h): one pass that draws each
// element's random word and scales or zeroes it, vectorised over 32-element groups and
// threaded over groups. The mask depends only on the seed and the element's index, not on the
// thread count or the ISA, and the backward recomputes it from the seed.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
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

at::Tensor dropout_kernel(const at::Tensor& input, const at::Tensor& seed, double p) {
  const DropoutArguments args = check_dropout_arguments(input, seed, p);
  const at::Tensor x = input.contiguous();
  DropoutOutput out(input);
  const int64_t numel = x.numel();
  const int64_t groups = numel / philox::kElementsPerGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout", [&] {
    using opmath = simd::opmath_t<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    scalar_t* result = out.row_major.mutable_data_ptr<scalar_t>();
    if (args.drop_all) {
      for (int64_t i = 0; i < numel; ++i) {
        result[i] = static_cast<scalar_t>(static_cast<opmath>(in[i]) * opmath(0));
      }
      return;
    }
    const opmath scale = native_dropout_scale<scalar_t, opmath>(p);
    const auto threshold = static_cast<uint32_t>(args.threshold);
    at::parallel_for(0, groups, kGroupsPerTask, [&](int64_t begin, int64_t end) {
      CIFARNET_ISA_DISPATCH(dropout_groups<scalar_t>, in, result, begin, end, args.key,
                            threshold, scale);
    });
    for (int64_t i = groups * philox::kElementsPerGroup; i < numel; ++i) {
      const opmath v = static_cast<opmath>(in[i]);
      const bool keep = philox::element_word(static_cast<uint64_t>(i), args.key) >= threshold;
      result[i] = static_cast<scalar_t>(keep ? v * scale : v * opmath(0));
    }
  });
  return out.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CPU, m) { m.impl("dropout", &dropout_kernel); }

}  // namespace cifarnet::ops
