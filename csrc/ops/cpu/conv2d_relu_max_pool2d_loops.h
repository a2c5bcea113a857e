// Hot loops of the CPU conv2d -> ReLU -> max_pool2d kernels: the forward's ReLU, max pooling
// and one-byte argmax over a channels-last convolution tile, the dense backward's pre-pool
// gradient, and the sparse backward's gradient accumulation. Included once per ISA through
// isa_variants.inc (so: no include guard, no includes; see multiversion.h).

// NB: no lambdas in this file: GCC compiles a lambda's body without the ISA of the
// `#pragma GCC target` region it is written in, which scalarises its vector code.

// The vector the loops that compare and select work in (see simd::Vec32 and RegisterVec).
template <typename scalar_t>
using SelectVec = simd::RegisterVec<kVectorRegisterBytes, scalar_t>;

// Argmax bytes to and from integer lanes. GCC 12 converts between vectors of bytes and of
// wider integers lane by lane through general registers unless the wide vector fits one
// register and the bytes are signed and not loaded straight from memory; so bytes widen by
// sign extension with the ISA's own instructions (vpmovsxb*), and a window position compares as
// its int8_t image (a bijection, so equality is kept). Narrowing goes through 16-bit lanes,
// which GCC packs.
template <typename mask>
using lane_int_of = std::decay_t<decltype(std::declval<mask>()[0])>;

// Byte and 16-bit vectors of n lanes. (Spelled out per n: GCC drops the vector_size of a
// typedef whose size depends on a template parameter.)
template <int n>
struct NarrowLanes;
template <>
struct NarrowLanes<4> {
  typedef int8_t bytes __attribute__((vector_size(4)));
  typedef int16_t halfwords __attribute__((vector_size(8)));
};
template <>
struct NarrowLanes<8> {
  typedef int8_t bytes __attribute__((vector_size(8)));
  typedef int16_t halfwords __attribute__((vector_size(16)));
};
template <>
struct NarrowLanes<16> {
  typedef int8_t bytes __attribute__((vector_size(16)));
  typedef int16_t halfwords __attribute__((vector_size(32)));
};

template <typename mask>
using narrow_lanes = NarrowLanes<sizeof(mask) / sizeof(lane_int_of<mask>)>;

template <typename mask>
inline __attribute__((always_inline)) mask widen_argmax(const uint8_t* p) {
  constexpr size_t lane = sizeof(lane_int_of<mask>), n = sizeof(mask) / lane;
  mask m;
#if defined(__x86_64__)
  if constexpr (kVectorRegisterBytes >= 32 && kVectorRegisterBytes >= sizeof(mask) &&
                sizeof(mask) >= 16) {  // AVX2 or AVX-512, the mask in one register
    __m128i bytes{};
    std::memcpy(&bytes, p, n);
    if constexpr (sizeof(mask) == 16 && lane == 2) {
      const __m128i wide = _mm_cvtepi8_epi16(bytes);
      std::memcpy(&m, &wide, sizeof(m));
    } else if constexpr (sizeof(mask) == 32) {
      const __m256i wide = lane == 2   ? _mm256_cvtepi8_epi16(bytes)
                           : lane == 4 ? _mm256_cvtepi8_epi32(bytes)
                                       : _mm256_cvtepi8_epi64(bytes);
      std::memcpy(&m, &wide, sizeof(m));
    } else if constexpr (sizeof(mask) == 64) {
      static_assert(lane >= 4);
      // (The zero-masking forms: the plain ones start from an undefined register, which GCC
      // 12 warns may be used uninitialised.)
      const __m512i wide = lane == 4 ? _mm512_maskz_cvtepi8_epi32(0xffff, bytes)
                                     : _mm512_maskz_cvtepi8_epi64(0xff, bytes);
      std::memcpy(&m, &wide, sizeof(m));
    } else {
      m = __builtin_convertvector(*reinterpret_cast<typename narrow_lanes<mask>::bytes*>(&bytes),
                                  mask);
    }
    return m;
  }
#endif
  typename narrow_lanes<mask>::bytes bytes;
  simd::load(bytes, p);
  return __builtin_convertvector(bytes, mask);
}

template <typename lane_int>
inline __attribute__((always_inline)) lane_int argmax_lane(int64_t position) {
  return static_cast<lane_int>(static_cast<int8_t>(position));
}

// Stores the low byte of each lane.
template <typename mask>
inline __attribute__((always_inline)) void store_argmax(uint8_t* p, const mask& lanes) {
  using narrow = narrow_lanes<mask>;
  const auto halfwords = __builtin_convertvector(lanes, typename narrow::halfwords);
  simd::store(p, __builtin_convertvector(halfwords, typename narrow::bytes));
}

// x, or (x - mean) * scale + shift when `affine` (a batch norm in front of the ReLU; centred
// first, as the batch norm kernels compute it) rounded to scalar_t: native rounds its batch
// norm output to the storage dtype before ReLU and max_pool2d compare it, so values equal in
// bfloat16/float16 tie there (first maximum wins) and small positives round to zero.
template <typename scalar_t, bool affine, typename T>
inline __attribute__((always_inline)) T affine_value(T x, T mean, T scale, T shift) {
  if constexpr (affine) {
    const T y = (x - mean) * scale + shift;
    if constexpr (sizeof(scalar_t) != 2) {
      return y;
    } else if constexpr (std::is_arithmetic_v<T>) {
      return static_cast<T>(static_cast<scalar_t>(y));
    } else {
      return simd::widen(simd::narrow(y, static_cast<scalar_t*>(nullptr)),
                         static_cast<scalar_t*>(nullptr));
    }
  } else {
    return x;
  }
}

// ReLU + max pool + argmax of one window over one channel: `window` points at the window's
// first position inside the convolution output, window_h x window_w of them, the first with
// argmax offset first_offset (past the window's padded rows and columns, which never win). The
// window is compared in native max_pool2d's order and with its rule (strictly greater, or NaN),
// so ties go to the first maximum and NaN to the last NaN, as native. Values are compared (and
// normalised) in T = opmath_t<scalar_t>: float for bfloat16 and float16 data.
template <typename scalar_t, bool affine, typename T = simd::opmath_t<scalar_t>>
inline __attribute__((always_inline)) void relu_max_pool2d_window(
    const scalar_t* window, int64_t window_h, int64_t window_w, int64_t row_stride,
    int64_t column_stride, int64_t pool_w, int64_t first_offset, T mean, T scale, T shift,
    scalar_t* out, uint8_t* argmax) {
  T best = affine_value<scalar_t, affine>(static_cast<T>(window[0]), mean, scale, shift);
  int64_t best_offset = first_offset;
  for (int64_t h = 0; h < window_h; ++h) {
    for (int64_t w = (h == 0 ? 1 : 0); w < window_w; ++w) {
      const T x = affine_value<scalar_t, affine>(static_cast<T>(window[h * row_stride + w * column_stride]),
                                       mean, scale, shift);
      if (x > best || x != x) {
        best = x;
        best_offset = first_offset + h * pool_w + w;
      }
    }
  }
  const bool positive = best > T(0) || best != best;
  *out = static_cast<scalar_t>(positive ? best : T(0));
  *argmax = positive ? static_cast<uint8_t>(best_offset) : kArgmaxReluZero;
}

// The same over one vector V of T (SelectVec: with AVX-512, 16 floats or 8 doubles; with
// AVX2, 8 or 4), lane by lane; mean/scale/shift point at the vector's channels when `affine`.
template <typename scalar_t, bool affine, typename V, typename T = simd::opmath_t<scalar_t>>
inline __attribute__((always_inline)) void relu_max_pool2d_window_vec(
    const scalar_t* window, int64_t window_h, int64_t window_w, int64_t row_stride,
    int64_t column_stride, int64_t pool_w, int64_t first_offset, const T* mean, const T* scale,
    const T* shift, scalar_t* out, uint8_t* argmax, int64_t out_stride_c) {
  using vec = typename V::type;
  using mask = typename V::mask;
  vec mean_v{}, scale_v{}, shift_v{};
  if constexpr (affine) {
    simd::load(mean_v, mean);
    simd::load(scale_v, scale);
    simd::load(shift_v, shift);
  }
  vec best;
  simd::load(best, window);
  best = affine_value<scalar_t, affine>(best, mean_v, scale_v, shift_v);
  mask best_offset = mask{} + static_cast<typename V::lane_int>(first_offset);
  for (int64_t h = 0; h < window_h; ++h) {
    for (int64_t w = (h == 0 ? 1 : 0); w < window_w; ++w) {
      vec x;
      simd::load(x, window + h * row_stride + w * column_stride);
      x = affine_value<scalar_t, affine>(x, mean_v, scale_v, shift_v);
      const mask take = (x > best) | (x != x);
      best = take ? x : best;
      const auto offset = static_cast<typename V::lane_int>(first_offset + h * pool_w + w);
      best_offset = take ? (mask{} + offset) : best_offset;
    }
  }
  const mask positive = (best > T(0)) | (best != best);
  const vec pooled = positive ? best : vec{};
  const mask offsets = positive ? best_offset : (mask{} + kArgmaxReluZero);  // no truncation: 255
  if (out_stride_c == 1) {
    simd::store(out, pooled);
    store_argmax(argmax, offsets);
  } else {
    for (int i = 0; i < V::lanes; ++i) {
      out[i * out_stride_c] = static_cast<scalar_t>(pooled[i]);
      argmax[i * out_stride_c] = static_cast<uint8_t>(offsets[i]);
    }
  }
}

template <typename scalar_t, bool affine, typename T = simd::opmath_t<scalar_t>>
void relu_max_pool2d_rows_impl(const scalar_t* conv, scalar_t* out, uint8_t* argmax,
                               const Strides4d& os, const ConvPoolGeometry& g, int64_t row_begin,
                               int64_t row_end, const T* mean, const T* scale, const T* shift) {
  using V = SelectVec<scalar_t>;
  constexpr int64_t lanes = V::lanes;
  const int64_t channels = g.out_channels;
  const int64_t row_stride = g.conv_w * channels;
  for (int64_t ph = row_begin; ph < row_end; ++ph) {
    // The window's rows inside the convolution output: window_h of them from h_begin (never
    // none: the pool padding is at most half the window).
    const int64_t h0 = ph * g.pool_stride_h - g.pool_pad_h;
    const int64_t h_begin = std::max<int64_t>(h0, 0);
    const int64_t window_h = std::min(h0 + g.pool_h, g.conv_h) - h_begin;
    for (int64_t pw = 0; pw < g.out_w; ++pw) {
      const int64_t w0 = pw * g.pool_stride_w - g.pool_pad_w;
      const int64_t w_begin = std::max<int64_t>(w0, 0);
      const int64_t window_w = std::min(w0 + g.pool_w, g.conv_w) - w_begin;
      const int64_t first_offset = (h_begin - h0) * g.pool_w + (w_begin - w0);
      const scalar_t* window = conv + h_begin * row_stride + w_begin * channels;
      scalar_t* out_pixel = out + ph * os.h + pw * os.w;
      uint8_t* argmax_pixel = argmax + ph * os.h + pw * os.w;
      int64_t c = 0;
      for (; c + lanes <= channels; c += lanes) {
        relu_max_pool2d_window_vec<scalar_t, affine, V>(
            window + c, window_h, window_w, row_stride, channels, g.pool_w, first_offset,
            affine ? mean + c : nullptr, affine ? scale + c : nullptr, affine ? shift + c : nullptr,
            out_pixel + c * os.c, argmax_pixel + c * os.c, os.c);
      }
      for (; c < channels; ++c) {
        relu_max_pool2d_window<scalar_t, affine>(
            window + c, window_h, window_w, row_stride, channels, g.pool_w, first_offset,
            affine ? mean[c] : T(0), affine ? scale[c] : T(1), affine ? shift[c] : T(0),
            out_pixel + c * os.c, argmax_pixel + c * os.c);
      }
    }
  }
}

// ReLU + max pool + argmax of pooled rows [row_begin, row_end) of one sample.
// conv: channels-last [conv_h][conv_w][C]; out/argmax: one sample, any strides;
// mean/scale/shift: per channel in opmath_t<scalar_t>, or nullptr for none. Vectorised over
// channels, the contiguous dimension of conv.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void relu_max_pool2d_rows(const scalar_t* conv, scalar_t* out, uint8_t* argmax, const Strides4d& os,
                          const ConvPoolGeometry& g, int64_t row_begin, int64_t row_end,
                          const T* mean, const T* scale, const T* shift) {
  if (scale != nullptr) {
    relu_max_pool2d_rows_impl<scalar_t, true>(conv, out, argmax, os, g, row_begin, row_end, mean,
                                              scale, shift);
  } else {
    relu_max_pool2d_rows_impl<scalar_t, false>(conv, out, argmax, os, g, row_begin, row_end,
                                               mean, scale, shift);
  }
}

// The dense backward's gradient of convolution rows [row_begin, row_end) of one sample, for
// pool windows that do not overlap: each position gets its window's gradient where it holds
// the window's argmax and zero elsewhere (positions in no window too), so the gradient is
// written whole in one pass, with no zero fill first. Windows start pool_pad_h rows and
// pool_pad_w columns before the pool stride's grid. grad_output/argmax: the sample's pooled
// [out_h][out_w][C]; grad_conv: the sample's [conv_h][conv_w][C] (all channels last).
// Where bias_total is given, the gradients of windows that passed ReLU are also summed per
// channel: per pooled row into row_sum (T, C values, zero on entry and on return), then into
// bias_total (acc_t: double for float32 data), so a float sum never runs longer than a row.
// Vectorised over channels.
template <typename scalar_t, typename acc_t, typename T = simd::opmath_t<scalar_t>>
void pool_gradient_rows(const scalar_t* grad_output, const uint8_t* argmax, scalar_t* grad_conv,
                        const ConvPoolGeometry& g, int64_t row_begin, int64_t row_end, T* row_sum,
                        acc_t* bias_total) {
  using V = SelectVec<scalar_t>;
  using vec = typename V::type;
  using mask = typename V::mask;
  using bytes = typename V::bytes;
  constexpr int64_t lanes = V::lanes;
  const int64_t channels = g.out_channels;
  const bytes relu_zero = bytes{} + kArgmaxReluZero;
  for (int64_t h = row_begin; h < row_end; ++h) {
    // (ph, kh): the window holding row h and the row's place in it, padding counted.
    const int64_t padded_h = h + g.pool_pad_h;
    const int64_t ph = padded_h / g.pool_stride_h, kh = padded_h - ph * g.pool_stride_h;
    scalar_t* out_row = grad_conv + h * g.conv_w * channels;
    if (ph >= g.out_h || kh >= g.pool_h) {  // in no window
      std::memset(static_cast<void*>(out_row), 0, g.conv_w * channels * sizeof(scalar_t));
      continue;
    }
    // The window's first row inside the convolution output (row 0 after padded ones).
    const bool sum_bias = bias_total != nullptr && (kh == 0 || h == 0);
    for (int64_t w = 0; w < g.conv_w; ++w) {
      const int64_t padded_w = w + g.pool_pad_w;
      const int64_t pw = padded_w / g.pool_stride_w, kw = padded_w - pw * g.pool_stride_w;
      scalar_t* out = out_row + w * channels;
      if (pw >= g.out_w || kw >= g.pool_w) {
        std::memset(static_cast<void*>(out), 0, channels * sizeof(scalar_t));
        continue;
      }
      const int64_t offset = kh * g.pool_w + kw;
      const bytes here = bytes{} + static_cast<uint8_t>(offset);
      // Each window is summed once, at its first position inside the convolution output.
      const bool window_start = sum_bias && (kw == 0 || w == 0);
      const scalar_t* grad = grad_output + (ph * g.out_w + pw) * channels;
      const uint8_t* window_argmax = argmax + (ph * g.out_w + pw) * channels;
      int64_t c = 0;
      for (; c + lanes <= channels; c += lanes) {
        vec x;
        simd::load(x, grad + c);
        bytes argmax_bytes;
        std::memcpy(&argmax_bytes, window_argmax + c, sizeof(argmax_bytes));
        // NB: compared as bytes, then sign-extended: GCC 12 widens unsigned bytes to lanes one
        // lane at a time, but signed ones in one instruction (vpmovsxbd).
        const mask at_here = __builtin_convertvector(argmax_bytes == here, mask);
        simd::store(out + c, at_here ? x : vec{});
        if (window_start) {
          const mask passed_relu = __builtin_convertvector(argmax_bytes != relu_zero, mask);
          vec sum;
          simd::load(sum, row_sum + c);
          sum += passed_relu ? x : vec{};
          simd::store(row_sum + c, sum);
        }
      }
      for (; c < channels; ++c) {
        const T x = static_cast<T>(grad[c]);
        out[c] = static_cast<scalar_t>(window_argmax[c] == offset ? x : T(0));
        if (window_start && window_argmax[c] != kArgmaxReluZero) row_sum[c] += x;
      }
    }
    if (sum_bias) {
      for (int64_t c = 0; c < channels; ++c) {
        bias_total[c] += static_cast<acc_t>(row_sum[c]);
        row_sum[c] = T(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sparse backward. The gradient of the pre-pool activation is zero except at one argmax per
// pool window, so both convolution gradients are sums over those few positions of
// "gradient times a contiguous segment": with channels-last data, kernel row kh of a window at
// convolution position (h, w) touches input[n, h*sh + kh, w*sw : w*sw + kW, :], kW * C_in
// contiguous values, and the matching weight row weight[c, kh, :, :] is contiguous too.

// The vector the sparse loops accumulate in: one register (GCC keeps arrays of vectors wider
// than the registers on the stack, moving them through memory at every operation).
template <typename scalar_t>
using GatherVec = simd::RegisterVec<kVectorRegisterBytes, scalar_t>;

// Accumulators per register block: what the ISA's vector registers hold, less room for the
// broadcast gradient and a loaded operand.
template <typename scalar_t>
constexpr int kGatherBlock =
    std::max(1, std::min(16, kVectorRegisters* kVectorRegisterBytes /
                                     int(sizeof(typename GatherVec<scalar_t>::type)) -
                                 2));

// v = p[0, n) and zeros after (0 < n < the vector's lanes), reading nothing at or past p + n:
// masked loads with AVX-512 and AVX2, lane by lane otherwise.
// NB: the memory after a partial row of an output may be another thread's (the next sample's
// input gradient, the next output channels' weight gradient), written while this thread reads:
// a whole-vector load of it would be a data race, results right or not.
template <typename V, typename T>
inline __attribute__((always_inline)) void load_first(typename V::type& v, const T* p, int64_t n) {
#if CIFARNET_HAS_ISA_VARIANTS
  if constexpr (sizeof(v) == 64 && kVectorRegisterBytes == 64) {
    if constexpr (sizeof(T) == 4) {
      const __m512 x = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
      std::memcpy(&v, &x, sizeof(v));
    } else {
      const __m512d x = _mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
      std::memcpy(&v, &x, sizeof(v));
    }
    return;
  } else if constexpr (sizeof(v) == 32 && kVectorRegisterBytes >= 32) {
    // Lane i is loaded where its mask lane has the sign bit: i < n.
    using lane_int = typename V::lane_int;
    typedef lane_int lanes __attribute__((vector_size(32)));
    lanes index;
    for (int i = 0; i < V::lanes; ++i) index[i] = i;
    const lanes take = index < static_cast<lane_int>(n);
    __m256i mask;
    std::memcpy(&mask, &take, sizeof(mask));
    if constexpr (sizeof(T) == 4) {
      const __m256 x = _mm256_maskload_ps(reinterpret_cast<const float*>(p), mask);
      std::memcpy(&v, &x, sizeof(v));
    } else {
      const __m256d x = _mm256_maskload_pd(reinterpret_cast<const double*>(p), mask);
      std::memcpy(&v, &x, sizeof(v));
    }
    return;
  }
#endif
  v = typename V::type{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
}

// dst[0, len) += sum over e < count of grads[e] * base[offsets[e] + (0, len)], for the `block`
// GatherVecs starting at element `begin`. The last one may be partial: dst is then read
// (load_first) and written only up to len; base is loaded whole (its buffers are read-only
// here, with 64 bytes of slack at the end).
template <typename scalar_t, int block>
inline __attribute__((always_inline)) void gather_fma_block(scalar_t* dst, int64_t begin,
                                                            int64_t len, const scalar_t* base,
                                                            const int64_t* offsets,
                                                            const scalar_t* grads, int64_t count) {
  using V = GatherVec<scalar_t>;
  using vec = typename V::type;
  vec acc[block];
  for (int k = 0; k < block; ++k) {
    const int64_t start = begin + k * V::lanes;
    if (len - start >= V::lanes) {
      simd::load(acc[k], dst + start);
    } else {
      load_first<V>(acc[k], dst + start, len - start);
    }
  }
  for (int64_t e = 0; e < count; ++e) {
    const vec grad = vec{} + grads[e];
    const scalar_t* source = base + offsets[e] + begin;
    for (int k = 0; k < block; ++k) {
      vec x;
      simd::load(x, source + k * V::lanes);
      acc[k] += grad * x;
    }
  }
  for (int k = 0; k < block; ++k) {
    const int64_t start = begin + k * V::lanes;
    const int64_t lanes = std::min<int64_t>(V::lanes, len - start);
    if (lanes == V::lanes) {
      simd::store(dst + start, acc[k]);
    } else {
      std::memcpy(dst + start, &acc[k], lanes * sizeof(scalar_t));
    }
  }
}

// gather_fma_block over a run-time number of vectors, 1 to kGatherBlock.
template <typename scalar_t, int block = kGatherBlock<scalar_t>>
inline __attribute__((always_inline)) void gather_fma_vectors(
    scalar_t* dst, int64_t begin, int64_t vectors, int64_t len, const scalar_t* base,
    const int64_t* offsets, const scalar_t* grads, int64_t count) {
  if constexpr (block > 0) {
    if (vectors == block) {
      gather_fma_block<scalar_t, block>(dst, begin, len, base, offsets, grads, count);
    } else {
      gather_fma_vectors<scalar_t, block - 1>(dst, begin, vectors, len, base, offsets, grads,
                                              count);
    }
  }
}

// Weight gradient of one output channel over its argmax hits in a tile of samples: for each
// kernel row kh, grad_weight[kh, :] += sum over the hits of grad * input[offset +
// kh * input_row_stride + (0, kW * C_in)], each offset pointing at a hit's kernel-row-0 segment
// of the tile's padded channels-last input. Register blocks of grad_weight are loaded and
// stored once per tile. grad_weight: this channel's [kH][kW * C_in].
template <typename scalar_t>
void sparse_weight_grad_channel(scalar_t* grad_weight, const ConvPoolGeometry& g,
                                int64_t input_row_stride, const scalar_t* input,
                                const int64_t* input_offsets, const scalar_t* grads,
                                int64_t count) {
  constexpr int64_t lanes = GatherVec<scalar_t>::lanes;
  constexpr int64_t block = kGatherBlock<scalar_t>;
  const int64_t row_len = g.kernel_w * g.in_channels;
  const int64_t vectors = (row_len + lanes - 1) / lanes;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t v = 0; v < vectors; v += block) {
      gather_fma_vectors(grad_weight + kh * row_len, v * lanes, std::min(block, vectors - v),
                         row_len, input + kh * input_row_stride, input_offsets, grads, count);
    }
  }
}

// Input gradient of one sample: for each convolution position with argmax hits (lists
// position_begin/weight_offsets/grads) and each kernel row kh,
// grad_input[h*sh + kh, w*sw : w*sw + kW, :] += sum over the hits of grad * weight[c, kh, :, :].
// Loops run kernel row and register block outermost, with blocks narrow enough that the
// weight slices they read for every output channel stay in (half of) an L1 data cache of
// l1d_bytes across all positions. grad_input: this sample's padded channels-last gradient;
// weight: [C_out][kH][kW * C_in].
template <typename scalar_t>
void sparse_input_grad_sample(scalar_t* grad_input, const ConvPoolGeometry& g,
                              int64_t input_row_stride, const scalar_t* weight,
                              const int64_t* position_begin, const int64_t* weight_offsets,
                              const scalar_t* grads, int64_t l1d_bytes) {
  constexpr int64_t lanes = GatherVec<scalar_t>::lanes;
  constexpr int64_t vector_bytes = sizeof(typename GatherVec<scalar_t>::type);
  const int64_t row_len = g.kernel_w * g.in_channels;
  const int64_t vectors = (row_len + lanes - 1) / lanes;
  const int64_t block = std::clamp<int64_t>(l1d_bytes / 2 / (g.out_channels * vector_bytes), 1,
                                            kGatherBlock<scalar_t>);
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t v = 0; v < vectors; v += block) {
      for (int64_t position = 0; position < g.conv_h * g.conv_w; ++position) {
        const int64_t begin = position_begin[position];
        const int64_t count = position_begin[position + 1] - begin;
        if (count == 0) continue;
        const int64_t h = position / g.conv_w, w = position % g.conv_w;
        scalar_t* row =
            grad_input + (h * g.stride_h + kh) * input_row_stride + w * g.stride_w * g.in_channels;
        gather_fma_vectors(row, v * lanes, std::min(block, vectors - v), row_len,
                           weight + kh * row_len, weight_offsets + begin, grads + begin, count);
      }
    }
  }
}
