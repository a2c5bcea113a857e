// Helpers of the CPU kernels that pool a channels-last convolution output and walk the
// one-byte argmax back. Include after isa_variants.inc has compiled
// conv2d_relu_max_pool2d_loops.h, inside the kernel's anonymous namespace (no include guard:
// each kernel file includes it once).

// Pools rows [row_begin, row_end) of samples [n_begin, n_end) of a channels-last convolution
// output whose first sample is sample `conv_n0` of the batch, through (x - mean) * scale +
// shift per channel (in opmath_t<scalar_t>) when those are given (a batch norm in front of the
// ReLU).
template <typename scalar_t>
void relu_max_pool2d_samples(const at::Tensor& conv, int64_t conv_n0, at::Tensor& output,
                             at::Tensor& argmax, const ConvPoolGeometry& g, int64_t n_begin,
                             int64_t n_end, int64_t row_begin, int64_t row_end,
                             const simd::opmath_t<scalar_t>* mean,
                             const simd::opmath_t<scalar_t>* scale,
                             const simd::opmath_t<scalar_t>* shift) {
  const Strides4d os(output);
  const int64_t conv_sample = g.conv_h * g.conv_w * g.out_channels;
  const scalar_t* conv_data = conv.const_data_ptr<scalar_t>();
  scalar_t* out_data = output.mutable_data_ptr<scalar_t>();
  uint8_t* argmax_data = argmax.mutable_data_ptr<uint8_t>();
  for (int64_t n = n_begin; n < n_end; ++n) {
    CIFARNET_ISA_DISPATCH(relu_max_pool2d_rows<scalar_t>, conv_data + (n - conv_n0) * conv_sample,
                          out_data + n * os.n, argmax_data + n * os.n, os, g, row_begin, row_end,
                          mean, scale, shift);
  }
}

// Pools a whole channels-last convolution output, threaded over pooled rows.
template <typename scalar_t>
void relu_max_pool2d(const at::Tensor& conv, at::Tensor& output, at::Tensor& argmax,
                     const ConvPoolGeometry& g, int64_t n_begin, int64_t n_end,
                     const simd::opmath_t<scalar_t>* mean, const simd::opmath_t<scalar_t>* scale,
                     const simd::opmath_t<scalar_t>* shift) {
  at::parallel_for(n_begin * g.out_h, n_end * g.out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      const int64_t n = row / g.out_h;
      const int64_t row_end = std::min(end, (n + 1) * g.out_h);
      relu_max_pool2d_samples<scalar_t>(conv, n_begin, output, argmax, g, n, n + 1,
                                        row - n * g.out_h, row_end - n * g.out_h, mean, scale,
                                        shift);
      row = row_end;
    }
  });
}

// Row and column of each argmax offset relative to (ph * pool_stride_h, pw * pool_stride_w):
// its place inside the pool window less the pool padding, so that adding them gives the
// convolution position (never a padded one: those never win). No divisions per element.
struct WindowPositions {
  std::array<int64_t, kMaxPoolWindowElements> row{}, column{};
  explicit WindowPositions(const ConvPoolGeometry& g) {
    for (int64_t k = 0; k < g.pool_h * g.pool_w; ++k) {
      row[k] = k / g.pool_w - g.pool_pad_h;
      column[k] = k % g.pool_w - g.pool_pad_w;
    }
  }
};

// Calls visit(c, ph, pw, h, w, grad) for each window of sample n whose maximum was positive
// (others pass no gradient: ReLU's zero), with (h, w) the convolution position of its argmax,
// walking the argmax in its memory order.
template <typename scalar_t, typename Visit>
void for_each_argmax_hit(const at::Tensor& grad_output, const at::Tensor& argmax,
                         const ConvPoolGeometry& g, const WindowPositions& window, int64_t n,
                         Visit&& visit) {
  const Strides4d gs(grad_output), as(argmax);
  const scalar_t* grad_data = grad_output.const_data_ptr<scalar_t>() + n * gs.n;
  const uint8_t* argmax_data = argmax.const_data_ptr<uint8_t>() + n * as.n;
  auto one = [&](int64_t c, int64_t ph, int64_t pw) {
    const uint8_t offset = argmax_data[c * as.c + ph * as.h + pw * as.w];
    if (offset != kArgmaxReluZero) {
      visit(c, ph, pw, ph * g.pool_stride_h + window.row[offset],
            pw * g.pool_stride_w + window.column[offset],
            grad_data[c * gs.c + ph * gs.h + pw * gs.w]);
    }
  };
  if (as.c == 1 && g.out_channels > 1) {  // channels last
    for (int64_t ph = 0; ph < g.out_h; ++ph)
      for (int64_t pw = 0; pw < g.out_w; ++pw)
        for (int64_t c = 0; c < g.out_channels; ++c) one(c, ph, pw);
  } else {
    for (int64_t c = 0; c < g.out_channels; ++c)
      for (int64_t ph = 0; ph < g.out_h; ++ph)
        for (int64_t pw = 0; pw < g.out_w; ++pw) one(c, ph, pw);
  }
}
