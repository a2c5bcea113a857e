#pragma once
// Batch-norm building blocks on CUDA, shared by the batch norm kernels and the fused
// conv -> batch norm -> ReLU -> max-pool kernels. Per-channel tensors are of the accumulation
// dtype (float32 for float16/bfloat16/float32, float64 for float64) and are computed on the
// device, each step in one launch: no host synchronisation, no per-channel ATen ops.

#include <ATen/core/Tensor.h>

#include <optional>

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

// The normalisation out = (x - mean) * scale + shift, with scale = weight / sqrt(var + eps) and
// shift = bias, and the statistics it came from.
struct Normalization {
  at::Tensor mean, var;  // Tensor[C]; var is the biased variance
  at::Tensor affine;     // Tensor[2, C]: scale, shift (undefined for statistics alone)
};

// A training batch's statistics in one launch: per-channel mean and biased variance (Welford,
// one pass), without (statistics alone) or with the affine parameters, when the same launch
// computes the normalisation's scale and shift.
Normalization batch_norm_statistics(const at::Tensor& dense, const DenseLayout& layout);
Normalization batch_norm_statistics(const at::Tensor& dense, const DenseLayout& layout,
                                    const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias, double eps);

// The normalisation with given statistics (evaluation's running statistics, synchronized batch
// norm's whole batch's) in one launch; its mean and var are copies in the accumulation dtype.
// `like` is the normalised tensor (device and dtype).
Normalization batch_norm_normalization(const at::Tensor& like, const at::Tensor& mean,
                                       const at::Tensor& var,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps);

// out = (x - mean) * scale + shift, per channel, rectified with `relu` (torch.relu's rule on
// the rounded value), one launch (out may alias nothing).
void batch_norm_normalize(at::Tensor& out, const at::Tensor& x, const Normalization& normalization,
                          const DenseLayout& layout, bool relu = false);

// What the input gradient needs besides the backward's sums.
struct InputGradArgs {
  at::Tensor var;                    // the variance normalised with, Tensor[C]
  std::optional<at::Tensor> weight;  // Tensor[C]
  double eps;
  int64_t count;  // values per channel of the whole batch (more than x holds under synchronized
                  // batch norm)
  bool training;  // evaluation: the statistics are constants, dx = weight * invstd * g
};

// The backward's per-channel reduction.
struct GradReduction {
  at::Tensor sum_g, sum_gx;  // sum(g) and sum(g * (x - mean)), Tensor[C]
  // With InputGradArgs: the weight's gradient sum_gx * invstd, Tensor[C], and the input
  // gradient dx = k ((x - mean) slope + offset + g), k = weight * invstd,
  // slope = -invstd^2 sum_gx / count, offset = -sum_g / count (evaluation: slope = offset = 0).
  at::Tensor grad_weight;
  at::Tensor coefficients;  // Tensor[3, C]: k, slope, offset
};

// The sums of g and x dense in one layout, in one launch; with `args` (else nullptr), the same
// launch also computes the weight's gradient and the input gradient's coefficients. Given
// relu_output (dense in that layout), g is the gradient of the ReLU after the batch norm and
// is taken through it (threshold_backward's rule) as it is read.
GradReduction batch_norm_grad_sums(const at::Tensor& g, const at::Tensor& x, const at::Tensor& mean,
                                   const DenseLayout& layout, const InputGradArgs* args,
                                   const at::Tensor& relu_output = at::Tensor());

// The input gradient's coefficients from given sums (synchronized batch norm's whole batch's),
// or in evaluation from none (undefined sum_g and sum_gx), in one launch.
GradReduction batch_norm_grad_coefficients(const at::Tensor& like, const InputGradArgs& args,
                                           const at::Tensor& sum_g, const at::Tensor& sum_gx);

// out = k ((x - mean) slope + offset + g) in training, k g in evaluation, one launch (out may
// be g itself); g through the ReLU whose output is relu_output, where given, as in the sums.
void batch_norm_input_grad(at::Tensor& out, const at::Tensor& g, const at::Tensor& x,
                           const at::Tensor& mean, const GradReduction& reduction,
                           const DenseLayout& layout, bool training,
                           const at::Tensor& relu_output = at::Tensor());

}  // namespace cifarnet::cuda
