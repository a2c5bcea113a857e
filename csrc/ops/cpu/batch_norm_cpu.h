#pragma once
// Batch-norm statistics on the CPU, shared by the batch norm kernel and the fused
// conv -> batch norm -> ReLU -> max-pool kernel.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>

#include <cmath>
#include <optional>
#include <vector>

namespace cifarnet::ops {

// Statistics accumulate and are saved in double for every input dtype on the CPU (float32,
// bfloat16 and float16 alike; at::acc_type would give float for the 16-bit types).
template <typename scalar_t>
using stats_t = double;

// Per-channel mean and biased (population) variance.
template <typename acc_t>
struct BatchNormStats {
  std::vector<acc_t> mean, var;
};

// Statistics of a dense tensor laid out channels-inner (element (p, c) at p * channels + c,
// `rows` pixels) or channels-outer (element (n, c, s) at (n * channels + c) * row_len + s,
// `rows` = N * channels). One threaded pass; sums accumulate in double, shifted by an element
// of each channel.
template <typename scalar_t>
BatchNormStats<stats_t<scalar_t>> batch_statistics(const at::Tensor& dense, bool channels_inner,
                                                   int64_t channels, int64_t rows, int64_t row_len);

// Normalising and input-gradient passes over more bytes than this write with non-temporal
// stores: the last-level cache size (cache_sizes(), which tests override), 0 (never) where
// unknown.
int64_t streaming_store_threshold_bytes();

// The values of an optional per-channel tensor as T (fallback where it is absent).
template <typename T>
std::vector<T> channel_values(const std::optional<at::Tensor>& t, int64_t channels, T fallback) {
  if (!t.has_value() || !t->defined()) return std::vector<T>(channels, fallback);
  const at::Tensor values =
      t->detach().to(at::kCPU, c10::CppTypeToScalarType<T>::value).contiguous();
  return {values.const_data_ptr<T>(), values.const_data_ptr<T>() + channels};
}

// A mean split as x - mean == (x - hi) - lo, hi in the type the data are computed in. x - hi is exact for x
// within a factor of two of the mean (Sterbenz), so centring data far from zero loses nothing
// to the rounding of the mean; lo, small, folds into the constant terms.
template <typename scalar_t, typename acc_t>
struct SplitMean {
  std::vector<scalar_t> hi;
  std::vector<acc_t> lo;
  explicit SplitMean(const std::vector<acc_t>& mean) : hi(mean.size()), lo(mean.size()) {
    for (size_t c = 0; c < mean.size(); ++c) {
      hi[c] = static_cast<scalar_t>(mean[c]);
      lo[c] = mean[c] - static_cast<acc_t>(hi[c]);
    }
  }
};

// Per-channel coefficients: out = (x - mean) * a + b (normalize), or
// out = ((x - mean) * a + b + g) * k (input_grad; see batch_norm_loops.h).
template <typename scalar_t>
struct ChannelMap {
  std::vector<scalar_t> mean, a, b, k;
  explicit ChannelMap(int64_t channels) : mean(channels), a(channels), b(channels), k(channels) {}
};

template <typename acc_t>
std::vector<acc_t> inverse_std(const std::vector<acc_t>& var, double eps) {
  std::vector<acc_t> invstd(var.size());
  for (size_t c = 0; c < var.size(); ++c) invstd[c] = 1 / std::sqrt(var[c] + eps);
  return invstd;
}

// The training backward's input-gradient map: dx = k (g - sum_g / M - (x - mean) invstd^2
// sum_gx / M), k = w invstd, M = count (the values per channel of the whole, possibly
// synchronized, batch), as input_grad with slope -invstd^2 sum_gx / M around centre.hi.
template <typename opmath_t, typename acc_t>
ChannelMap<opmath_t> training_grad_map(const SplitMean<opmath_t, acc_t>& centre,
                                       const std::vector<acc_t>& invstd,
                                       const std::vector<acc_t>& w,
                                       const std::vector<acc_t>& sum_g,
                                       const std::vector<acc_t>& sum_gx, int64_t count) {
  const int64_t channels = static_cast<int64_t>(invstd.size());
  const acc_t m = static_cast<acc_t>(count);
  ChannelMap<opmath_t> f(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t slope = -invstd[c] * invstd[c] * sum_gx[c] / m;
    f.mean[c] = centre.hi[c];
    f.a[c] = static_cast<opmath_t>(slope);
    f.b[c] = static_cast<opmath_t>(-sum_g[c] / m - centre.lo[c] * slope);
    f.k[c] = static_cast<opmath_t>(w[c] * invstd[c]);
  }
  return f;
}

// A per-channel tensor of the given values (in T's dtype).
template <typename T>
at::Tensor channel_tensor(const std::vector<T>& values, const at::TensorOptions& options) {
  at::Tensor t = at::empty({static_cast<int64_t>(values.size())},
                           options.dtype(c10::CppTypeToScalarType<T>::value));
  std::copy(values.begin(), values.end(), t.mutable_data_ptr<T>());
  return t;
}

}  // namespace cifarnet::ops
