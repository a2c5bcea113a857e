// Hot loops of the CPU conv2d -> ReLU -> max_pool2d forward: ReLU, max pooling and the
// one-byte argmax over a channels-last convolution tile. Included once per ISA through
// isa_variants.inc (so: no include guard, no includes; see multiversion.h).

// ReLU + max pool + argmax of one window over one channel. The window is compared in native
// max_pool2d's order and with its rule (strictly greater, or NaN), so ties go to the first
// maximum and NaN to the last NaN, as native.
template <typename scalar_t>
inline __attribute__((always_inline)) void relu_max_pool2d_window(
    const scalar_t* window, int64_t window_h, int64_t window_w, int64_t row_stride,
    int64_t column_stride, int64_t pool_w, scalar_t* out, uint8_t* argmax) {
  scalar_t best = window[0];
  int64_t best_offset = 0;
  for (int64_t h = 0; h < window_h; ++h) {
    for (int64_t w = (h == 0 ? 1 : 0); w < window_w; ++w) {
      const scalar_t x = window[h * row_stride + w * column_stride];
      if (x > best || x != x) {
        best = x;
        best_offset = h * pool_w + w;
      }
    }
  }
  const bool positive = best > scalar_t(0) || best != best;
  *out = positive ? best : scalar_t(0);
  *argmax = positive ? static_cast<uint8_t>(best_offset) : kArgmaxReluZero;
}

// The same over one 64-byte vector of channels (16 floats, 8 doubles), lane by lane.
template <typename scalar_t>
inline __attribute__((always_inline)) void relu_max_pool2d_window_vec(
    const scalar_t* window, int64_t window_h, int64_t window_w, int64_t row_stride,
    int64_t column_stride, int64_t pool_w, scalar_t* out, uint8_t* argmax, int64_t out_stride_c) {
  using V = simd::Vec64<scalar_t>;
  using vec = typename V::type;
  using mask = typename V::mask;
  vec best;
  simd::load(best, window);
  mask best_offset{};
  for (int64_t h = 0; h < window_h; ++h) {
    for (int64_t w = (h == 0 ? 1 : 0); w < window_w; ++w) {
      vec x;
      simd::load(x, window + h * row_stride + w * column_stride);
      const mask take = (x > best) | (x != x);
      best = take ? x : best;
      const auto offset = static_cast<typename V::lane_int>(h * pool_w + w);
      best_offset = take ? (mask{} + offset) : best_offset;
    }
  }
  const mask positive = (best > scalar_t(0)) | (best != best);
  const vec pooled = positive ? best : vec{};
  const mask offsets = positive ? best_offset : (mask{} + kArgmaxReluZero);  // no truncation: 255
  if (out_stride_c == 1) {
    simd::store(out, pooled);
    simd::store(argmax, __builtin_convertvector(offsets, typename V::bytes));
  } else {
    for (int i = 0; i < V::lanes; ++i) {
      out[i * out_stride_c] = pooled[i];
      argmax[i * out_stride_c] = static_cast<uint8_t>(offsets[i]);
    }
  }
}

// ReLU + max pool + argmax of pooled rows [row_begin, row_end) of one sample.
// conv: channels-last [conv_h][conv_w][C]; out/argmax: one sample, any strides.
// Vectorised over channels, the contiguous dimension of conv.
template <typename scalar_t>
void relu_max_pool2d_rows(const scalar_t* conv, scalar_t* out, uint8_t* argmax, const Strides4d& os,
                          const ConvPoolGeometry& g, int64_t row_begin, int64_t row_end) {
  constexpr int64_t lanes = simd::Vec64<scalar_t>::lanes;
  const int64_t channels = g.out_channels;
  const int64_t row_stride = g.conv_w * channels;
  for (int64_t ph = row_begin; ph < row_end; ++ph) {
    const int64_t h0 = ph * g.pool_stride_h;
    const int64_t window_h = std::min(h0 + g.pool_h, g.conv_h) - h0;
    for (int64_t pw = 0; pw < g.out_w; ++pw) {
      const int64_t w0 = pw * g.pool_stride_w;
      const int64_t window_w = std::min(w0 + g.pool_w, g.conv_w) - w0;
      const scalar_t* window = conv + h0 * row_stride + w0 * channels;
      scalar_t* out_pixel = out + ph * os.h + pw * os.w;
      uint8_t* argmax_pixel = argmax + ph * os.h + pw * os.w;
      int64_t c = 0;
      for (; c + lanes <= channels; c += lanes) {
        relu_max_pool2d_window_vec(window + c, window_h, window_w, row_stride, channels, g.pool_w,
                                   out_pixel + c * os.c, argmax_pixel + c * os.c, os.c);
      }
      for (; c < channels; ++c) {
        relu_max_pool2d_window(window + c, window_h, window_w, row_stride, channels, g.pool_w,
                               out_pixel + c * os.c, argmax_pixel + c * os.c);
      }
    }
  }
}
