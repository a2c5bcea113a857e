// Hot loops of the CPU batch norm kernels: per-channel sums and per-channel affine maps over
// the two layouts a batch-norm input can have once dense:
//   channels outer, rows of one channel: (N, C, S) contiguous, element (n, c, s) at
//     (n * C + c) * S + s (NCHW, NCL, ...);
//   channels inner, pixels of all channels: element (p, c) at p * C + c (channels-last
//     NHWC, and (N, C) inputs).
// Sums accumulate in double (float data widened on load; channels-inner data after runs of 16
// pixels summed in registers); values are shifted by a per-channel reference (an element of
// the channel) first, so that inputs with a mean far from zero keep their variance.
// bfloat16 and float16 data are stored in 16 bits and computed in float
// (opmath_t<scalar_t>): widened on load, rounded on store (simd.h's load/store overloads);
// per-channel coefficients are given in that type.
// Included once per ISA through isa_variants.inc (so: no include guard, no includes).

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
      const double d = static_cast<double>(data[i]) - shift;
      row_sum += d;
      row_sum_sq += d * d;
    }
    sum[c] += row_sum;
    sum_sq[c] += row_sum_sq;
  }
}

// One value (T = opmath_t<scalar_t>) or one vector of them from p.
template <typename T, typename scalar_t>
inline __attribute__((always_inline)) void load_lanes(T& v, const scalar_t* p) {
  if constexpr (std::is_arithmetic_v<T>) {
    v = static_cast<T>(*p);
  } else {
    simd::load(v, p);
  }
}

// Adds the vector v (of float or double) to the doubles at sum, widening float lanes. Vectors
// of 32 bytes (AVX2) go as halves of four doubles: GCC moves 64-byte vectors of doubles
// through the stack there.
template <typename vec>
inline __attribute__((always_inline)) void add_to_doubles(double* sum, const vec& v) {
  using simd::doubles;
  using simd::four_doubles;
  if constexpr (sizeof(vec) == 32 && sizeof(v[0]) == sizeof(double)) {
    four_doubles s;
    simd::load(s, sum);
    simd::store(sum, four_doubles(s + v));
  } else if constexpr (sizeof(vec) == 32) {
    four_doubles s0, s1;
    simd::load(s0, sum);
    simd::load(s1, sum + 4);
    simd::store(sum, four_doubles(
                         s0 + __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3),
                                                      four_doubles)));
    simd::store(sum + 4, four_doubles(s1 + __builtin_convertvector(
                                               __builtin_shufflevector(v, v, 4, 5, 6, 7),
                                               four_doubles)));
  } else if constexpr (sizeof(v[0]) == sizeof(double)) {
    doubles s;
    simd::load(s, sum);
    simd::store(sum, doubles(s + v));
  } else {
    typedef float eight __attribute__((vector_size(32)));
    const eight low = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    const eight high = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    doubles s0, s1;
    simd::load(s0, sum);
    simd::load(s1, sum + 8);
    simd::store(sum, doubles(s0 + __builtin_convertvector(low, doubles)));
    simd::store(sum + 8, doubles(s1 + __builtin_convertvector(high, doubles)));
  }
}

// The vector the channels-inner sums keep in registers.
template <typename scalar_t>
using SumVec = simd::RegisterVec<kVectorRegisterBytes, scalar_t>;

// Pixels whose terms a channels-inner reduction adds up in scalar_t registers before adding
// them to its double sums: few enough that float rounding stays at a few ulps of a run's sum.
constexpr int64_t kRegisterRun = 16;

// The terms of J channel vectors [c, c + J * lanes) over pixels [run, run_end), summed in
// registers and then added to sum_a and sum_b.
template <int J, typename scalar_t, typename Terms>
inline __attribute__((always_inline)) void channel_block_sums(int64_t c, int64_t run,
                                                              int64_t run_end, double* sum_a,
                                                              double* sum_b, Terms& terms) {
  using V = SumVec<scalar_t>;
  typename V::type a[J] = {}, b[J] = {};
  for (int64_t p = run; p < run_end; ++p) {
    for (int j = 0; j < J; ++j) terms(a[j], b[j], p, c + j * V::lanes);
  }
  for (int j = 0; j < J; ++j) {
    add_to_doubles(sum_a + c + j * V::lanes, a[j]);
    add_to_doubles(sum_b + c + j * V::lanes, b[j]);
  }
}

// Two per-channel sums over pixels [pixel_begin, pixel_end) of channels-inner data, added to
// sum_a[c] and sum_b[c]; terms(a, b, p, c) adds the terms of the vector of channels [c, c +
// lanes) at pixel p to the register accumulators a and b. Walking runs of kRegisterRun pixels
// with the accumulators of a few channel vectors in registers reads memory nearly in order
// and stores only once a run, where per-pixel double accumulators in memory would spend twice
// the vector work on widening and most of the rest on loads and stores.
template <typename scalar_t, typename Terms>
inline __attribute__((always_inline)) void channels_inner_sums(int64_t channels,
                                                               int64_t pixel_begin,
                                                               int64_t pixel_end, double* sum_a,
                                                               double* sum_b, Terms&& terms) {
  using V = SumVec<scalar_t>;
  constexpr int64_t lanes = V::lanes;
  // Two accumulators per channel vector plus temporaries, in a quarter of the registers.
  constexpr int kVectors =
      std::max<int>(1, kVectorRegisters * kVectorRegisterBytes / sizeof(typename V::type) / 8);
  for (int64_t run = pixel_begin; run < pixel_end; run += kRegisterRun) {
    const int64_t run_end = std::min(pixel_end, run + kRegisterRun);
    int64_t c = 0;
    for (; c + kVectors * lanes <= channels; c += kVectors * lanes) {
      channel_block_sums<kVectors, scalar_t>(c, run, run_end, sum_a, sum_b, terms);
    }
    // Then half a block where it fits (32 channels of float32 with AVX-512): one block per
    // pixel keeps the reads in memory order, where one vector at a time would walk each
    // run once per vector.
    if constexpr (kVectors >= 4) {
      if (c + 2 * lanes <= channels) {
        channel_block_sums<2, scalar_t>(c, run, run_end, sum_a, sum_b, terms);
        c += 2 * lanes;
      }
    }
    for (; c + lanes <= channels; c += lanes) {
      channel_block_sums<1, scalar_t>(c, run, run_end, sum_a, sum_b, terms);
    }
    if (c < channels) {
      // The last channels, fewer than a vector, one at a time.
      for (int64_t p = run; p < run_end; ++p) {
        for (int64_t r = c; r < channels; ++r) {
          simd::opmath_t<scalar_t> ta = 0, tb = 0;
          terms(ta, tb, p, r);
          sum_a[r] += ta;
          sum_b[r] += tb;
        }
      }
    }
  }
}

// Per-channel sums of (x - ref) and (x - ref)^2 over pixels [pixel_begin, pixel_end) of a
// channels-inner input, added to sum[c] and sum_sq[c].
template <typename scalar_t>
void shifted_sums_channels_inner(const scalar_t* x, int64_t channels, int64_t pixel_begin,
                                 int64_t pixel_end, const scalar_t* ref, double* sum,
                                 double* sum_sq) {
  channels_inner_sums<scalar_t>(channels, pixel_begin, pixel_end, sum, sum_sq,
                                [&](auto& s, auto& q, int64_t p, int64_t c) {
                                  std::decay_t<decltype(s)> d, shift;
                                  load_lanes(d, x + p * channels + c);
                                  load_lanes(shift, ref + c);
                                  d -= shift;
                                  s += d;
                                  q += d * d;
                                });
}

// Per-channel sums of g and g * (x - mean) over rows [row_begin, row_end) of channels-outer
// gradient and input (the batch norm backward's reductions), in double.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void grad_sums_channels_outer(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t row_len, int64_t row_begin, int64_t row_end,
                              const T* mean, double* sum_g, double* sum_gx) {
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
      row_g += static_cast<double>(g_row[i]);
      row_gx += static_cast<double>(g_row[i]) * (static_cast<double>(x_row[i]) - m);
    }
    sum_g[c] += row_g;
    sum_gx[c] += row_gx;
  }
}

// The same over pixels [pixel_begin, pixel_end) of channels-inner gradient and input.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void grad_sums_channels_inner(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const T* mean,
                              double* sum_g, double* sum_gx) {
  channels_inner_sums<scalar_t>(channels, pixel_begin, pixel_end, sum_g, sum_gx,
                                [&](auto& sg, auto& sgx, int64_t p, int64_t c) {
                                  std::decay_t<decltype(sg)> gv, xv, m;
                                  load_lanes(gv, g + p * channels + c);
                                  load_lanes(xv, x + p * channels + c);
                                  load_lanes(m, mean + c);
                                  sg += gv;
                                  sgx += gv * (xv - m);
                                });
}

// The elementwise passes, over rows [row_begin, row_end) of channels-outer tensors or pixels
// [pixel_begin, pixel_end) of channels-inner ones:
//   normalize:  out = (x - mean[c]) * scale[c] + shift[c]
//   input_grad: out = ((x - mean[c]) * slope[c] + offset[c] + g) * k[c]   (g optional)
// Centring first keeps float32 exact for data whose mean is far from zero, where
// x * scale + (shift - mean * scale) would cancel; input_grad factors k out as native batch
// norm does, so its terms cancel before they are scaled by a possibly large 1 / std.
// `stream`: vector stores bypass the caches (see simd::store_or_stream; the caller makes them
// aligned and fences).

template <typename T>
inline __attribute__((always_inline)) T input_grad_value(T x, T g, T mean, T slope, T offset,
                                                         T k) {
  return ((x - mean) * slope + offset + g) * k;
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void normalize_channels_outer(scalar_t* out, const scalar_t* x, int64_t channels, int64_t row_len,
                              int64_t row_begin, int64_t row_end, const T* mean, const T* scale,
                              const T* shift, bool stream) {
  using V = simd::Vec64<T>;
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
      simd::store_or_stream(out_row + i, vec((xv - m) * a + b), stream);
    }
    for (; i < row_len; ++i) {
      out_row[i] = static_cast<scalar_t>((static_cast<T>(x_row[i]) - mean[c]) * scale[c] + shift[c]);
    }
  }
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void normalize_channels_inner(scalar_t* out, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const T* mean,
                              const T* scale, const T* shift, bool stream) {
  using V = simd::Vec64<T>;
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
      simd::store_or_stream(out + base + c, vec((xv - m) * a + b), stream);
    }
    for (; c < channels; ++c) {
      out[base + c] =
          static_cast<scalar_t>((static_cast<T>(x[base + c]) - mean[c]) * scale[c] + shift[c]);
    }
  }
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void input_grad_channels_outer(scalar_t* out, const scalar_t* x, const scalar_t* g,
                               int64_t channels, int64_t row_len, int64_t row_begin,
                               int64_t row_end, const T* mean, const T* slope, const T* offset,
                               const T* k, bool stream) {
  using V = simd::Vec64<T>;
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
      simd::store_or_stream(out_row + i, vec(((xv - m) * s + o + gv) * kv), stream);
    }
    for (; i < row_len; ++i) {
      out_row[i] = static_cast<scalar_t>(
          input_grad_value(static_cast<T>(x_row[i]), g_row != nullptr ? static_cast<T>(g_row[i]) : T(0),
                           mean[c], slope[c], offset[c], k[c]));
    }
  }
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void input_grad_channels_inner(scalar_t* out, const scalar_t* x, const scalar_t* g,
                               int64_t channels, int64_t pixel_begin, int64_t pixel_end,
                               const T* mean, const T* slope, const T* offset, const T* k,
                               bool stream) {
  using V = simd::Vec64<T>;
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
      simd::store_or_stream(out + base + c, vec(((xv - m) * s + o + gv) * kv), stream);
    }
    for (; c < channels; ++c) {
      out[base + c] = static_cast<scalar_t>(
          input_grad_value(static_cast<T>(x[base + c]), g != nullptr ? static_cast<T>(g[base + c]) : T(0),
                           mean[c], slope[c], offset[c], k[c]));
    }
  }
}
