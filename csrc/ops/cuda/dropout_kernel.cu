// CUDA kernel of dropout with philox.h's counter-based mask: the CPU kernel's arithmetic, so a
// seed gives the same output on either device. One thread per Philox block, whose four words
// go to four elements eight apart (consecutive threads write consecutive elements).

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../dropout_common.h"
#include "../philox.h"
#include "cuda_common.cuh"

namespace cifarnet::cuda {
namespace {

template <typename scalar_t, typename opmath_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               int64_t numel, int64_t blocks, uint64_t key, uint64_t threshold,
                               opmath_t scale) {
  CIFARNET_GRID_STRIDE_LOOP(block, blocks) {
    const int64_t first = philox::kElementsPerGroup * (block / philox::kBlocksPerGroup) +
                          block % philox::kBlocksPerGroup;
    if (first >= numel) continue;
    const philox::Words words = philox::block(static_cast<uint64_t>(block), key);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t e = first + w * philox::kBlocksPerGroup;
      if (e < numel) {
        const opmath_t v = static_cast<opmath_t>(x[e]);
        out[e] = static_cast<scalar_t>(words.w[w] >= threshold ? v * scale : v * opmath_t(0));
      }
    }
  }
}

at::Tensor dropout_cuda(const at::Tensor& input, const at::Tensor& seed, double p) {
  const ops::DropoutArguments args = ops::check_dropout_arguments(input, seed, p);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  ops::DropoutOutput out(input);
  const int64_t numel = x.numel();
  if (numel == 0) return out.output;
  const int64_t groups = (numel + philox::kElementsPerGroup - 1) / philox::kElementsPerGroup;
  const int64_t blocks = groups * philox::kBlocksPerGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // drop_all: a threshold no 32-bit word reaches (and a scale nothing is multiplied by).
    const opmath_t scale =
        args.drop_all ? opmath_t(0) : ops::native_dropout_scale<scalar_t, opmath_t>(p);
    dropout_kernel<scalar_t, opmath_t>
        <<<blocks_for(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), out.row_major.mutable_data_ptr<scalar_t>(), numel,
            blocks, args.key, args.threshold, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) { m.impl("dropout", &dropout_cuda); }

}  // namespace cifarnet::cuda
