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

// The vector the channels-inner sums keep in registers, and the elementwise passes compute in:
// one register (two 64-byte halves of float32 data on AVX2 would compare and select lane by
// lane, see simd.h).
template <typename scalar_t>
using RegisterVector = simd::RegisterVec<kVectorRegisterBytes, scalar_t>;

// Pixels whose terms a channels-inner reduction adds up in scalar_t registers before adding
// them to its double sums: few enough that float rounding stays at a few ulps of a run's sum.
constexpr int64_t kRegisterRun = 16;

// The terms of J channel vectors [c, c + J * lanes) over pixels [run, run_end), summed in
// registers and then added to sum_a and sum_b.
template <int J, typename scalar_t, typename Terms>
inline __attribute__((always_inline)) void channel_block_sums(int64_t c, int64_t run,
                                                              int64_t run_end, double* sum_a,
                                                              double* sum_b, Terms& terms) {
  using V = RegisterVector<scalar_t>;
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
  using V = RegisterVector<scalar_t>;
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

// The ReLU after a batch norm, on values or vectors of T = opmath_t<scalar_t>. Vectors of 16-bit
// data (64 bytes of float, wider than an AVX2 register) are compared on their 16-bit bits
// instead, 32 bytes: GCC compares and selects vectors wider than a register lane by lane.
typedef int16_t halfword_ints __attribute__((vector_size(32)));
typedef int32_t word_ints __attribute__((vector_size(64)));

// The bits of -infinity in scalar_t (16-bit), as a signed integer: below them (as signed
// integers) lie the negative numbers down to -0 (INT16_MIN), above them the negative NaNs.
template <typename scalar_t>
constexpr int16_t negative_infinity_bits =
    std::is_same_v<scalar_t, c10::BFloat16> ? int16_t(0xff80) : int16_t(0xfc00);

// A batch norm's output y rectified as torch.relu rectifies the rounded output: rounded to
// scalar_t first (native rounds its batch norm's output before its ReLU, so a negative that
// rounds to -0 stays -0), then 0 where below 0; -0 and NaN pass unchanged.
template <typename scalar_t, typename T>
inline __attribute__((always_inline)) T rectified_value(T y) {
  if constexpr (sizeof(scalar_t) == 2 && std::is_arithmetic_v<T>) {
    y = static_cast<T>(static_cast<scalar_t>(y));
  } else if constexpr (sizeof(scalar_t) == 2) {
    halfword_ints bits;
    const simd::halfwords rounded = simd::narrow(y, static_cast<scalar_t*>(nullptr));
    std::memcpy(&bits, &rounded, sizeof(bits));
    // Negative, not -0 (the least int16_t), not NaN.
    constexpr int16_t negative_zero_bits = int16_t(0x8000);
    bits &= ~((bits > negative_zero_bits) & (bits <= negative_infinity_bits<scalar_t>));
    simd::halfwords rectified;
    std::memcpy(&rectified, &bits, sizeof(rectified));
    return simd::widen(rectified, static_cast<scalar_t*>(nullptr));
  }
  return y < T{} ? T{} : y;
}

// The gradient g through the ReLU whose output was relu_output: threshold_backward's rule, g
// where relu_output > 0 or is NaN, else 0.
template <typename T>
inline __attribute__((always_inline)) T relu_grad_value(T g, T relu_output) {
  return relu_output <= T{} ? T{} : g;
}

// The same for a vector g whose lanes' ReLU outputs are at relu_output.
template <typename scalar_t, typename vec>
inline __attribute__((always_inline)) vec relu_grad_lanes(vec g, const scalar_t* relu_output) {
  if constexpr (sizeof(scalar_t) == 2) {
    static_assert(sizeof(vec) == sizeof(word_ints));
    halfword_ints bits;
    std::memcpy(&bits, relu_output, sizeof(bits));
    // +0, or negative (-0 included), not NaN.
    const word_ints stop = __builtin_convertvector(
        (bits == 0) | (bits <= negative_infinity_bits<scalar_t>), word_ints);
    word_ints g_bits;
    std::memcpy(&g_bits, &g, sizeof(g_bits));
    g_bits &= ~stop;
    std::memcpy(&g, &g_bits, sizeof(g));
    return g;
  } else {
    vec r;
    simd::load(r, relu_output);
    return relu_grad_value(g, r);
  }
}

// Per-channel sums of g and g * (x - mean) over rows [row_begin, row_end) of channels-outer
// gradient and input (the batch norm backward's reductions), in double. Given relu_output
// (the ReLU after the batch norm), g is the gradient of that ReLU's output, taken through it.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void grad_sums_channels_outer(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t row_len, int64_t row_begin, int64_t row_end,
                              const T* mean, double* sum_g, double* sum_gx,
                              const scalar_t* relu_output = nullptr) {
  using simd::four_doubles;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* g_row = g + row * row_len;
    const scalar_t* x_row = x + row * row_len;
    const scalar_t* r_row = relu_output != nullptr ? relu_output + row * row_len : nullptr;
    const double m = mean[c];
    // Eight lanes as two halves of four doubles, each one AVX2 register (see simd.h), which
    // the ReLU's mask compares and selects in.
    four_doubles sg_low{}, sg_high{}, sgx_low{}, sgx_high{};
    int64_t i = 0;
    for (; i + 8 <= row_len; i += 8) {
      four_doubles g_low, g_high, x_low, x_high;
      simd::load_double_halves(g_row + i, g_low, g_high);
      simd::load_double_halves(x_row + i, x_low, x_high);
      if (r_row != nullptr) {
        four_doubles r_low, r_high;
        simd::load_double_halves(r_row + i, r_low, r_high);
        g_low = relu_grad_value(g_low, r_low);
        g_high = relu_grad_value(g_high, r_high);
      }
      sg_low += g_low;
      sg_high += g_high;
      sgx_low += g_low * (x_low - m);
      sgx_high += g_high * (x_high - m);
    }
    double row_g = 0, row_gx = 0;
    for (int l = 0; l < 4; ++l) {
      row_g += sg_low[l];
      row_gx += sgx_low[l];
    }
    for (int l = 0; l < 4; ++l) {
      row_g += sg_high[l];
      row_gx += sgx_high[l];
    }
    for (; i < row_len; ++i) {
      double gi = static_cast<double>(g_row[i]);
      if (r_row != nullptr) gi = relu_grad_value(gi, static_cast<double>(r_row[i]));
      row_g += gi;
      row_gx += gi * (static_cast<double>(x_row[i]) - m);
    }
    sum_g[c] += row_g;
    sum_gx[c] += row_gx;
  }
}

// The same over pixels [pixel_begin, pixel_end) of channels-inner gradient and input.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void grad_sums_channels_inner(const scalar_t* g, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const T* mean,
                              double* sum_g, double* sum_gx,
                              const scalar_t* relu_output = nullptr) {
  channels_inner_sums<scalar_t>(channels, pixel_begin, pixel_end, sum_g, sum_gx,
                                [&](auto& sg, auto& sgx, int64_t p, int64_t c) {
                                  std::decay_t<decltype(sg)> gv, xv, m;
                                  load_lanes(gv, g + p * channels + c);
                                  load_lanes(xv, x + p * channels + c);
                                  load_lanes(m, mean + c);
                                  if (relu_output != nullptr) {
                                    const scalar_t* r = relu_output + p * channels + c;
                                    if constexpr (std::is_arithmetic_v<decltype(gv)>) {
                                      gv = relu_grad_value(gv, static_cast<decltype(gv)>(*r));
                                    } else {
                                      gv = relu_grad_lanes(gv, r);
                                    }
                                  }
                                  sg += gv;
                                  sgx += gv * (xv - m);
                                });
}

// The elementwise passes, over rows [row_begin, row_end) of channels-outer tensors or pixels
// [pixel_begin, pixel_end) of channels-inner ones:
//   normalize:  out = (x - mean[c]) * scale[c] + shift[c]            (rectified with `relu`)
//   input_grad: out = ((x - mean[c]) * slope[c] + offset[c] + g) * k[c]   (g optional)
// input_grad given relu_output takes g through that ReLU (see relu_grad_value), as the sums
// did, so that the gradient of the batch norm's output is never materialised.
// Centring first keeps float32 exact for data whose mean is far from zero, where
// x * scale + (shift - mean * scale) would cancel; input_grad factors k out as native batch
// norm does, so its terms cancel before they are scaled by a possibly large 1 / std.
// `stream`: vector stores bypass the caches (see simd::store_or_stream; the caller makes them
// aligned and fences).

// v in every lane. NB: not vec{} + v, which turns -0 into +0 (+0 + -0 = +0): a bias of -0
// would then give +0 where native batch norm (and its ReLU) gives -0.
template <typename vec, typename T>
inline __attribute__((always_inline)) vec splat(T v) {
  return v - vec{};
}

template <typename T>
inline __attribute__((always_inline)) T input_grad_value(T x, T g, T mean, T slope, T offset,
                                                         T k) {
  return ((x - mean) * slope + offset + g) * k;
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void normalize_channels_outer(scalar_t* out, const scalar_t* x, int64_t channels, int64_t row_len,
                              int64_t row_begin, int64_t row_end, const T* mean, const T* scale,
                              const T* shift, bool stream, bool relu = false) {
  using V = RegisterVector<scalar_t>;
  using vec = typename V::type;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* x_row = x + row * row_len;
    scalar_t* out_row = out + row * row_len;
    const vec m = splat<vec>(mean[c]), a = splat<vec>(scale[c]), b = splat<vec>(shift[c]);
    int64_t i = 0;
    for (; i + V::lanes <= row_len; i += V::lanes) {
      vec xv;
      simd::load(xv, x_row + i);
      vec y = (xv - m) * a + b;
      if (relu) y = rectified_value<scalar_t>(y);
      simd::store_or_stream(out_row + i, y, stream);
    }
    for (; i < row_len; ++i) {
      T y = (static_cast<T>(x_row[i]) - mean[c]) * scale[c] + shift[c];
      if (relu) y = rectified_value<scalar_t>(y);
      out_row[i] = static_cast<scalar_t>(y);
    }
  }
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void normalize_channels_inner(scalar_t* out, const scalar_t* x, int64_t channels,
                              int64_t pixel_begin, int64_t pixel_end, const T* mean,
                              const T* scale, const T* shift, bool stream, bool relu = false) {
  using V = RegisterVector<scalar_t>;
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
      vec y = (xv - m) * a + b;
      if (relu) y = rectified_value<scalar_t>(y);
      simd::store_or_stream(out + base + c, y, stream);
    }
    for (; c < channels; ++c) {
      T y = (static_cast<T>(x[base + c]) - mean[c]) * scale[c] + shift[c];
      if (relu) y = rectified_value<scalar_t>(y);
      out[base + c] = static_cast<scalar_t>(y);
    }
  }
}

template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void input_grad_channels_outer(scalar_t* out, const scalar_t* x, const scalar_t* g,
                               int64_t channels, int64_t row_len, int64_t row_begin,
                               int64_t row_end, const T* mean, const T* slope, const T* offset,
                               const T* k, bool stream, const scalar_t* relu_output = nullptr) {
  using V = RegisterVector<scalar_t>;
  using vec = typename V::type;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t c = row % channels;
    const scalar_t* x_row = x + row * row_len;
    const scalar_t* g_row = g != nullptr ? g + row * row_len : nullptr;
    const scalar_t* r_row = relu_output != nullptr ? relu_output + row * row_len : nullptr;
    scalar_t* out_row = out + row * row_len;
    const vec m = splat<vec>(mean[c]), s = splat<vec>(slope[c]), o = splat<vec>(offset[c]),
              kv = splat<vec>(k[c]);
    int64_t i = 0;
    for (; i + V::lanes <= row_len; i += V::lanes) {
      vec xv, gv{};
      simd::load(xv, x_row + i);
      if (g_row != nullptr) simd::load(gv, g_row + i);
      if (r_row != nullptr) gv = relu_grad_lanes(gv, r_row + i);
      simd::store_or_stream(out_row + i, vec(((xv - m) * s + o + gv) * kv), stream);
    }
    for (; i < row_len; ++i) {
      T gi = g_row != nullptr ? static_cast<T>(g_row[i]) : T(0);
      if (r_row != nullptr) gi = relu_grad_value(gi, static_cast<T>(r_row[i]));
      out_row[i] = static_cast<scalar_t>(
          input_grad_value(static_cast<T>(x_row[i]), gi, mean[c], slope[c], offset[c], k[c]));
    }
  }
}

// (channels inner: g may also be float for 16-bit data, as the fused conv -> batch norm
// backward adds overlapping pool windows' hits in float)
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>, typename grad_t = scalar_t>
void input_grad_channels_inner(scalar_t* out, const scalar_t* x, const grad_t* g,
                               int64_t channels, int64_t pixel_begin, int64_t pixel_end,
                               const T* mean, const T* slope, const T* offset, const T* k,
                               bool stream, const scalar_t* relu_output = nullptr) {
  using V = RegisterVector<scalar_t>;
  using vec = typename V::type;
  for (int64_t p = pixel_begin; p < pixel_end; ++p) {
    const int64_t base = p * channels;
    int64_t c = 0;
    for (; c + V::lanes <= channels; c += V::lanes) {
      vec xv, gv{}, m, s, o, kv;
      simd::load(xv, x + base + c);
      if (g != nullptr) simd::load(gv, g + base + c);
      if (relu_output != nullptr) gv = relu_grad_lanes(gv, relu_output + base + c);
      simd::load(m, mean + c);
      simd::load(s, slope + c);
      simd::load(o, offset + c);
      simd::load(kv, k + c);
      simd::store_or_stream(out + base + c, vec(((xv - m) * s + o + gv) * kv), stream);
    }
    for (; c < channels; ++c) {
      T gi = g != nullptr ? static_cast<T>(g[base + c]) : T(0);
      if (relu_output != nullptr) gi = relu_grad_value(gi, static_cast<T>(relu_output[base + c]));
      out[base + c] = static_cast<scalar_t>(
          input_grad_value(static_cast<T>(x[base + c]), gi, mean[c], slope[c], offset[c], k[c]));
    }
  }
}
