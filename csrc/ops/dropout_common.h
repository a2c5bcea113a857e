#pragma once
// Argument checks and arithmetic the CPU and CUDA dropout kernels share.

#include <ATen/ATen.h>

#include <cstdint>

#include "philox.h"

namespace cifarnet::ops {

// Which words keep their element: those of at least `threshold`; none when drop_all (p == 1,
// or so close that no 32-bit word reaches the threshold).
struct DropoutThreshold {
  uint64_t threshold;
  bool drop_all;
};

// The checks on what dropout applies its mask to (the input, or a backward's output gradient,
// named by `name`), and the threshold of p.
inline DropoutThreshold check_dropout_arguments(const at::Tensor& input, double p,
                                                const char* name = "input") {
  TORCH_CHECK(p >= 0 && p <= 1, "dropout probability p must be between 0 and 1, got ", p);
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "dropout ", name,
              " must be float32, float64, bfloat16 or float16, got ", input.scalar_type());
  const uint64_t threshold = philox::keep_threshold(p);
  return {threshold, threshold > 0xffffffffu};
}

// The mask of an explicit seed: a one-element int64 CPU tensor, read on the host (stream 0).
inline philox::MaskKey explicit_mask_key(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
              "dropout seed must be a one-element int64 tensor on the CPU, got a ",
              seed.scalar_type(), " tensor of ", seed.numel(), " elements on ", seed.device());
  return {static_cast<uint64_t>(seed.item<int64_t>()), 0};
}

// The (seed, offset) a forward drew its mask at, which its backward reads: an int64 Tensor[2]
// on the gradient's device (written there, and read there, by the kernels: on a GPU never on
// the host).
inline void check_seed_offset(const at::Tensor& seed_offset, const at::Tensor& grad_output) {
  TORCH_CHECK(seed_offset.dim() == 1 && seed_offset.numel() == 2 &&
                  seed_offset.scalar_type() == at::kLong &&
                  seed_offset.device() == grad_output.device(),
              "dropout seed_offset must be an int64 tensor of 2 elements on grad_output's device (",
              grad_output.device(), "), got a ", seed_offset.scalar_type(), " tensor of shape ",
              seed_offset.sizes(), " on ", seed_offset.device());
}

// Native dropout's factor for the kept elements: 1 / (1 - p) computed in opmath_t and rounded
// to scalar_t (it scales a mask of scalar_t ones), so kept elements match native's bit for bit.
template <typename scalar_t, typename opmath_t>
opmath_t native_dropout_scale(double p) {
  return static_cast<opmath_t>(
      static_cast<scalar_t>(opmath_t(1) / static_cast<opmath_t>(1 - p)));
}

// The output in native dropout's layout, empty_like(input)'s (the input's strides where it is
// dense, else its suggested format), and where the kernels write it: the mask is keyed by each
// element's row-major index, so they compute in row-major order, straight into the output where
// that is row-major (contiguous inputs), else into a row-major buffer that finish() copies in.
struct DropoutOutput {
  at::Tensor output, row_major;
  explicit DropoutOutput(const at::Tensor& input)
      : output(at::empty_like(input)),
        row_major(output.is_contiguous() ? output : at::empty(input.sizes(), input.options())) {}
  at::Tensor finish() {
    if (!row_major.is_same(output)) output.copy_(row_major);
    return output;
  }
};

}  // namespace cifarnet::ops
