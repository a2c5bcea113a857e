#pragma once
// Batch-norm building blocks on CUDA, shared by the batch norm kernels and the fused
// conv -> batch norm -> ReLU -> max-pool kernels. Statistics and per-channel coefficients are
// tensors of the accumulation dtype (float32 for float16/bfloat16/float32, float64 for float64).

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace cifarnet::cuda {

// A dense batch-norm input: channels-outer (element (n, c, s) at (n * C + c) * S + s) or
// channels-inner (element (p, c) at p * C + c, p = n * S + s).
struct DenseLayout {
  bool channels_inner;
  int64_t batch, channels, spatial;
};

// The layout of a tensor dense in `format` (channels-last formats and 2-D tensors are
// channels-inner).
DenseLayout dense_layout_of(const at::Tensor& dense, at::MemoryFormat format);

// Per-channel mean and biased variance, one pass (Welford, two-stage block reduction).
std::tuple<at::Tensor, at::Tensor> batch_norm_statistics(const at::Tensor& dense,
                                                         const DenseLayout& layout);

// Per-channel sum(g) and sum(g * (x - mean)), g and x dense in the same layout.
std::tuple<at::Tensor, at::Tensor> batch_norm_grad_sums(const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& mean,
                                                        const DenseLayout& layout);

// out = (x - mean) * weight / sqrt(var + eps) + bias, per channel (out may alias nothing).
void batch_norm_normalize(at::Tensor& out, const at::Tensor& x, const at::Tensor& mean,
                          const at::Tensor& var, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const DenseLayout& layout);

// The training input gradient, k ((x - mean) slope + offset + g) with k = weight * invstd,
// slope = -invstd^2 sum_gx / M, offset = -sum_g / M, M = count (the values per channel of the
// whole batch: more than x holds under synchronized batch norm); out may be g itself.
void batch_norm_input_grad(at::Tensor& out, const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& mean, const at::Tensor& var,
                           const std::optional<at::Tensor>& weight, const at::Tensor& sum_g,
                           const at::Tensor& sum_gx, double eps, int64_t count,
                           const DenseLayout& layout);

// Per-channel (grad_weight, grad_bias) = (sum_gx * invstd, sum_g), in the statistics dtype
// (the autograd formula gives each its parameter's dtype).
std::tuple<at::Tensor, at::Tensor> batch_norm_affine_grads(const at::Tensor& sum_g,
                                                           const at::Tensor& sum_gx,
                                                           const at::Tensor& var, double eps);

}  // namespace cifarnet::cuda
