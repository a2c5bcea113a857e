// Hot loops of the CPU batch norm kernels: per-channel sums and per-channel affine maps over
// the two layouts a batch-norm input can have once dense:
//   channels outer, rows of one channel: (N, C, S) contiguous, element (n, c, s) at
//     (n * C + c) * S + s (NCHW, NCL, ...);
//   channels inner, pixels of all channels: element (p, c) at p * C + c (channels-last
//     NHWC, and (N, C) inputs).
// Sums accumulate in double (float data widened on load); values are shifted by a per-channel
// reference (an element of the channel) first, so that inputs with a mean far from zero keep
// their variance.
// Included once per ISA through isa_variants.inc (so: no include guard, no includes).

// Pixels of a channels-inner block whose channels are summed before the next block: small
// enough to stay in L1 while each group of eight channels walks it.
constexpr int64_t kPixelBlock = 64;

// Per-channel sums of (x - ref) and (x - ref)^2 over rows [row_begin, row_end) of a
// channels-outer input, added to sum[c] and sum_sq[c]. Accumulates in double (8 lanes).
template <typename scalar_t>
void shifted_sums_channels_outer(const scalar_t* x, int64_t channels, int64_t row_len,
                                 int64_t row_begin, int64_t row_end, const scalar_t* ref,
                                 double* sum, double* sum_sq) {
  using simd::doubles;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* data = x + row * row_len;
    const double shift = ref[c];
    doubles s0{}, s1{}, q0{}, q1{};
    int64_t i = 0;
    for (; i + 16 <= row_len; i += 16) {
      doubles a, b;
      simd::load_doubles(a, data + i);
      simd::load_doubles(b, data + i + 8);
      a -= shift;
      b -= shift;
      s0 += a;
      s1 += b;
      q0 += a * a;
      q1 += b * b;
    }
    s0 += s1;
    q0 += q1;
    double row_sum = 0, row_sum_sq = 0;
    for (int l = 0; l < 8; ++l) {
      row_sum += s0[l];
      row_sum_sq += q0[l];
    }
    for (; i < row_len; ++i) {
      const double d = data[i] - shift;
      row_sum += d;
      row_sum_sq += d * d;
    }
    sum[c] += row_sum;
    sum_sq[c] += row_sum_sq;
  }
}

// Per-channel sums of (x - ref) and (x - ref)^2 over pixels [pixel_begin, pixel_end) of a
// channels-inner input, added to sum[c] and sum_sq[c]. Accumulates in double.
template <typename scalar_t>
void shifted_sums_channels_inner(const scalar_t* x, int64_t channels, int64_t pixel_begin,
                                 int64_t pixel_end, const scalar_t* ref, double* sum,
                                 double* sum_sq) {
  using simd::doubles;
  for (int64_t block = pixel_begin; block < pixel_end; block += kPixelBlock) {
    const int64_t block_end = std::min(pixel_end, block + kPixelBlock);
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      doubles shift, s, q;
      simd::load_doubles(shift, ref + c);
      simd::load(s, sum + c);
      simd::load(q, sum_sq + c);
      for (int64_t p = block; p < block_end; ++p) {
        doubles d;
        simd::load_doubles(d, x + p * channels + c);
        d -= shift;
        s += d;
        q += d * d;
      }
      simd::store(sum + c, s);
      simd::store(sum_sq + c, q);
    }
    for (; c < channels; ++c) {
      for (int64_t p = block; p < block_end; ++p) {
        const double d = x[p * channels + c] - static_cast<double>(ref[c]);
        sum[c] += d;
        sum_sq[c] += d * d;
      }
    }
  }
}

// Per-channel sums of g and g * (x - mean) over rows [row_begin, row_end) of channels-outer
// gradient and input (the batch norm backward's reductions), in double.
template <typename scalar_t>
void grad_sums_channels_outer(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t row_len, int64_t row_begin, int64_t row_end,
                              const scalar_t* mean, double* sum_g, double* sum_gx) {
  using simd::doubles;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* g_row = g + row * row_len;
    const scalar_t* x_row = x + row * row_len;
    const double m = mean[c];
    doubles sg{}, sgx{};
    int64_t i = 0;
    for (; i + 8 <= row_len; i += 8) {
      doubles gv, xv;
      simd::load_doubles(gv, g_row + i);
      simd::load_doubles(xv, x_row + i);
      sg += gv;
      sgx += gv * (xv - m);
    }
    double row_g = 0, row_gx = 0;
    for (int l = 0; l < 8; ++l) {
      row_g += sg[l];
      row_gx += sgx[l];
    }
    for (; i < row_len; ++i) {
      row_g += g_row[i];
      row_gx += double(g_row[i]) * (double(x_row[i]) - m);
    }
    sum_g[c] += row_g;
    sum_gx[c] += row_gx;
  }
}

// The same over pixels [pixel_begin, pixel_end) of channels-inner gradient and input.
template <typename scalar_t>
void grad_sums_channels_inner(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const scalar_t* mean,
                              double* sum_g, double* sum_gx) {
  using simd::doubles;
  for (int64_t block = pixel_begin; block < pixel_end; block += kPixelBlock) {
    const int64_t block_end = std::min(pixel_end, block + kPixelBlock);
    int64_t c = 0;
    for (; c + 8 <= channels; c += 8) {
      doubles m, sg, sgx;
      simd::load_doubles(m, mean + c);
      simd::load(sg, sum_g + c);
      simd::load(sgx, sum_gx + c);
      for (int64_t p = block; p < block_end; ++p) {
        doubles gv, xv;
        simd::load_doubles(gv, g + p * channels + c);
        simd::load_doubles(xv, x + p * channels + c);
        sg += gv;
        sgx += gv * (xv - m);
      }
      simd::store(sum_g + c, sg);
      simd::store(sum_gx + c, sgx);
    }
    for (; c < channels; ++c) {
      for (int64_t p = block; p < block_end; ++p) {
        sum_g[c] += g[p * channels + c];
        sum_gx[c] += double(g[p * channels + c]) * (double(x[p * channels + c]) - double(mean[c]));
      }
    }
  }
}

// The elementwise passes, over rows [row_begin, row_end) of channels-outer tensors or pixels
// [pixel_begin, pixel_end) of channels-inner ones:
//   normalize:  out = (x - mean[c]) * scale[c] + shift[c]
//   input_grad: out = ((x - mean[c]) * slope[c] + offset[c] + g) * k[c]   (g optional)
// Centring first keeps float32 exact for data whose mean is far from zero, where
// x * scale + (shift - mean * scale) would cancel; input_grad factors k out as native batch
// norm does, so its terms cancel before they are scaled by a possibly large 1 / std.

template <typename scalar_t>
inline __attribute__((always_inline)) scalar_t input_grad_value(scalar_t x, scalar_t g,
                                                                scalar_t mean, scalar_t slope,
                                                                scalar_t offset, scalar_t k) {
  return ((x - mean) * slope + offset + g) * k;
}

template <typename scalar_t>
void normalize_channels_outer(scalar_t* out, const scalar_t* x, int64_t channels, int64_t row_len,
                              int64_t row_begin, int64_t row_end, const scalar_t* mean,
                              const scalar_t* scale, const scalar_t* shift) {
  using V = simd::Vec64<scalar_t>;
  using vec = typename V::type;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* x_row = x + row * row_len;
    scalar_t* out_row = out + row * row_len;
    const vec m = vec{} + mean[c], a = vec{} + scale[c], b = vec{} + shift[c];
    int64_t i = 0;
    for (; i + V::lanes <= row_len; i += V::lanes) {
      vec xv;
      simd::load(xv, x_row + i);
      simd::store(out_row + i, vec((xv - m) * a + b));
    }
    for (; i < row_len; ++i) out_row[i] = (x_row[i] - mean[c]) * scale[c] + shift[c];
  }
}

template <typename scalar_t>
void normalize_channels_inner(scalar_t* out, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const scalar_t* mean,
                              const scalar_t* scale, const scalar_t* shift) {
  using V = simd::Vec64<scalar_t>;
  using vec = typename V::type;
  for (int64_t p = pixel_begin; p < pixel_end; ++p) {
    const int64_t base = p * channels;
    int64_t c = 0;
    for (; c + V::lanes <= channels; c += V::lanes) {
      vec xv, m, a, b;
      simd::load(xv, x + base + c);
      simd::load(m, mean + c);
      simd::load(a, scale + c);
      simd::load(b, shift + c);
      simd::store(out + base + c, vec((xv - m) * a + b));
    }
    for (; c < channels; ++c) out[base + c] = (x[base + c] - mean[c]) * scale[c] + shift[c];
  }
}

template <typename scalar_t>
void input_grad_channels_outer(scalar_t* out, const scalar_t* x, const scalar_t* g,
                               int64_t channels, int64_t row_len, int64_t row_begin,
                               int64_t row_end, const scalar_t* mean, const scalar_t* slope,
                               const scalar_t* offset, const scalar_t* k) {
  using V = simd::Vec64<scalar_t>;
  using vec = typename V::type;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* x_row = x + row * row_len;
    const scalar_t* g_row = g != nullptr ? g + row * row_len : nullptr;
    scalar_t* out_row = out + row * row_len;
    const vec m = vec{} + mean[c], s = vec{} + slope[c], o = vec{} + offset[c], kv = vec{} + k[c];
    int64_t i = 0;
    for (; i + V::lanes <= row_len; i += V::lanes) {
      vec xv, gv{};
      simd::load(xv, x_row + i);
      if (g_row != nullptr) simd::load(gv, g_row + i);
      simd::store(out_row + i, vec(((xv - m) * s + o + gv) * kv));
    }
    for (; i < row_len; ++i) {
      out_row[i] = input_grad_value(x_row[i], g_row != nullptr ? g_row[i] : scalar_t(0), mean[c],
                                    slope[c], offset[c], k[c]);
    }
  }
}

template <typename scalar_t>
void input_grad_channels_inner(scalar_t* out, const scalar_t* x, const scalar_t* g,
                               int64_t channels, int64_t pixel_begin, int64_t pixel_end,
                               const scalar_t* mean, const scalar_t* slope, const scalar_t* offset,
                               const scalar_t* k) {
  using V = simd::Vec64<scalar_t>;
  using vec = typename V::type;
  for (int64_t p = pixel_begin; p < pixel_end; ++p) {
    const int64_t base = p * channels;
    int64_t c = 0;
    for (; c + V::lanes <= channels; c += V::lanes) {
      vec xv, gv{}, m, s, o, kv;
      simd::load(xv, x + base + c);
      if (g != nullptr) simd::load(gv, g + base + c);
      simd::load(m, mean + c);
      simd::load(s, slope + c);
      simd::load(o, offset + c);
      simd::load(kv, k + c);
      simd::store(out + base + c, vec(((xv - m) * s + o + gv) * kv));
    }
    for (; c < channels; ++c) {
      out[base + c] = input_grad_value(x[base + c], g != nullptr ? g[base + c] : scalar_t(0),
                                       mean[c], slope[c], offset[c], k[c]);
    }
  }
}
