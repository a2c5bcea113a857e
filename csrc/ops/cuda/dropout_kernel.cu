// CUDA kernels of dropout with philox.h's counter-based mask: the CPU kernel's arithmetic, so a
// mask key gives the same output on either device. One thread per Philox block, whose four words
// go to four elements eight apart (consecutive threads write consecutive elements).
//
// Without an explicit seed the mask comes from the device's CUDA generator, as native dropout's
// does: its seed and Philox offset are read on the device (at::cuda::philox::unpack), so a
// launch captured in a CUDA graph draws a new mask at every replay, and no launch waits for the
// host. The forward writes the (seed, offset) it drew at to a device tensor, which its backward
// reads there.

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <torch/library.h>

#include <ATen/cuda/PhiloxUtils.cuh>
#include <mutex>
#include <optional>
#include <tuple>

#include "../dropout_common.h"
#include "../philox.h"
#include "cuda_common.cuh"

namespace cifarnet::cuda {
namespace {

// Where a launch finds its mask: an explicit seed's key (a kernel argument), the generator's
// Philox state (on the device while a graph is captured), or the (seed, offset) a forward
// wrote (its backward).
struct MaskSource {
  enum class Kind { kSeed, kGenerator, kSaved };
  Kind kind;
  philox::MaskKey seed_key;       // kSeed
  at::PhiloxCudaState generator;  // kGenerator
  const int64_t* saved;           // kSaved: seed, offset
  int64_t* save_to;               // kGenerator: where to write the seed and offset, or null

  // Every thread asks (a broadcast load where the values live on the device); the first writes
  // save_to.
  __device__ __forceinline__ philox::MaskKey key() const {
    if (kind == Kind::kSeed) return seed_key;
    if (kind == Kind::kSaved) {
      return philox::generator_mask_key(static_cast<uint64_t>(saved[0]),
                                        static_cast<uint64_t>(saved[1]));
    }
    const auto seed_offset = at::cuda::philox::unpack(generator);
    const uint64_t seed = std::get<0>(seed_offset), offset = std::get<1>(seed_offset);
    if (save_to != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
      save_to[0] = static_cast<int64_t>(seed);
      save_to[1] = static_cast<int64_t>(offset);
    }
    return philox::generator_mask_key(seed, offset);
  }
};

MaskSource seed_source(philox::MaskKey seed_key) {
  return {MaskSource::Kind::kSeed, seed_key, {}, nullptr, nullptr};
}

// The next mask of `device`'s default CUDA generator (which torch.manual_seed seeds).
MaskSource generator_source(c10::Device device, int64_t* save_to) {
  auto* generator = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      std::nullopt, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState philox;
  {
    // See Note [Acquire lock when using random generators]
    std::lock_guard<std::mutex> lock(generator->mutex_);
    philox = generator->philox_cuda_state(philox::kGeneratorIncrement);
  }
  return {MaskSource::Kind::kGenerator, {}, philox, nullptr, save_to};
}

MaskSource saved_source(const at::Tensor& seed_offset) {
  return {MaskSource::Kind::kSaved, {}, {}, seed_offset.const_data_ptr<int64_t>(), nullptr};
}

// Row-major elements, one thread per Philox block (grid-stride); the mask's key is read once per
// thread.
template <typename scalar_t, typename opmath_t>
__global__ void dropout_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               int64_t numel, int64_t blocks, MaskSource source, uint64_t threshold,
                               opmath_t scale) {
  const philox::MaskKey mask = source.key();
  CIFARNET_GRID_STRIDE_LOOP(block, blocks) {
    const int64_t first = philox::kElementsPerGroup * (block / philox::kBlocksPerGroup) +
                          block % philox::kBlocksPerGroup;
    if (first >= numel) continue;
    const philox::Words words = philox::block(static_cast<uint64_t>(block), mask);
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

// input with the mask of make_source() applied, which is asked for once there is something to
// launch (a forward that saves its seed and offset launches for an empty input too: the
// values it returns are then the generator's, not uninitialised memory).
template <typename MakeSource>
at::Tensor apply_mask(const at::Tensor& input, const ops::DropoutThreshold& keep, double p,
                      bool launch_when_empty, MakeSource make_source) {
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  ops::DropoutOutput out(input);
  const int64_t numel = x.numel();
  if (numel == 0 && !launch_when_empty) return out.output;
  const MaskSource source = make_source();
  const int64_t groups = (numel + philox::kElementsPerGroup - 1) / philox::kElementsPerGroup;
  const int64_t blocks = groups * philox::kBlocksPerGroup;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dropout_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    // drop_all: a threshold no 32-bit word reaches (and a scale nothing is multiplied by).
    const opmath_t scale =
        keep.drop_all ? opmath_t(0) : ops::native_dropout_scale<scalar_t, opmath_t>(p);
    dropout_kernel<scalar_t, opmath_t>
        <<<blocks_for(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
            x.const_data_ptr<scalar_t>(), out.row_major.mutable_data_ptr<scalar_t>(), numel, blocks,
            source, keep.threshold, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.finish();
}

at::Tensor dropout_cuda(const at::Tensor& input, const std::optional<at::Tensor>& seed, double p) {
  const ops::DropoutThreshold keep = ops::check_dropout_arguments(input, p);
  if (seed.has_value()) {
    const philox::MaskKey seed_key = ops::explicit_mask_key(*seed);
    return apply_mask(input, keep, p, false, [&] { return seed_source(seed_key); });
  }
  return apply_mask(input, keep, p, false,
                    [&] { return generator_source(input.device(), nullptr); });
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cuda(const at::Tensor& input, double p) {
  const ops::DropoutThreshold keep = ops::check_dropout_arguments(input, p);
  at::Tensor seed_offset = at::empty({2}, input.options().dtype(at::kLong));
  at::Tensor output = apply_mask(input, keep, p, true, [&] {
    return generator_source(input.device(), seed_offset.mutable_data_ptr<int64_t>());
  });
  return {output, seed_offset};
}

at::Tensor dropout_backward_cuda(const at::Tensor& grad_output, const at::Tensor& seed_offset,
                                 double p) {
  const ops::DropoutThreshold keep = ops::check_dropout_arguments(grad_output, p, "grad_output");
  ops::check_seed_offset(seed_offset, grad_output);
  const at::Tensor saved = seed_offset.contiguous();
  return apply_mask(grad_output, keep, p, false, [&] { return saved_source(saved); });
}

}  // namespace

TORCH_LIBRARY_IMPL(cifarnet, CUDA, m) {
  m.impl("dropout", &dropout_cuda);
  m.impl("_dropout_forward", &dropout_forward_cuda);
  m.impl("_dropout_backward", &dropout_backward_cuda);
}

}  // namespace cifarnet::cuda
