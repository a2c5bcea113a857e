// Hot loops of the CPU conv2d -> batch norm -> ReLU -> max_pool2d kernels: the pooling
// epilogue (with the batch norm as a per-channel affine map in front) and batch norm's
// per-channel sums and affine maps. Included once per ISA through isa_variants.inc.

#include "batch_norm_loops.h"
#include "conv2d_relu_max_pool2d_loops.h"

// The backward's two passes over one sample when pool windows tile the convolution output
// (pool stride == pool size), vectorised over channels: every window position is read once,
// and the argmax turns into a per-lane mask of "this position is the window's hit".
// conv and grad_conv: the sample's channels-last convolution output and its gradient; grad and
// argmax: the sample's channels-last pooled gradient and argmax.

// The argmax of V::lanes channels widened to one integer per lane.
template <typename V>
inline __attribute__((always_inline)) typename V::mask load_argmax(const uint8_t* argmax) {
  typename V::bytes bytes;
  simd::load(bytes, argmax);
  return __builtin_convertvector(bytes, typename V::mask);
}

// sum_g[c] += sum of hit gradients, sum_gx[c] += sum of grad * (x - mean[c]) at the hits, in
// double, over pooled rows [row_begin, row_end), eight channels at a time; channels past the
// last group of eight are left to the caller.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void tiled_hit_sums(const scalar_t* conv, const scalar_t* grad, const uint8_t* argmax,
                    const ConvPoolGeometry& g, int64_t row_begin, int64_t row_end,
                    const T* mean, double* sum_g, double* sum_gx) {
  using simd::doubles;
  using V = simd::Vec64<double>;
  const int64_t channels = g.out_channels;
  for (int64_t c = 0; c + 8 <= channels; c += 8) {
    doubles m, sg, sgx;
    simd::load_doubles(m, mean + c);
    simd::load(sg, sum_g + c);
    simd::load(sgx, sum_gx + c);
    for (int64_t ph = row_begin; ph < row_end; ++ph) {
      const int64_t h0 = ph * g.pool_stride_h;
      const int64_t window_h = std::min(h0 + g.pool_h, g.conv_h) - h0;
      for (int64_t pw = 0; pw < g.out_w; ++pw) {
        const int64_t w0 = pw * g.pool_stride_w;
        const int64_t window_w = std::min(w0 + g.pool_w, g.conv_w) - w0;
        const int64_t pooled = (ph * g.out_w + pw) * channels + c;
        doubles gv;
        simd::load_doubles(gv, grad + pooled);
        const V::mask hit = load_argmax<V>(argmax + pooled);
        for (int64_t kh = 0; kh < window_h; ++kh) {
          for (int64_t kw = 0; kw < window_w; ++kw) {
            doubles x;
            simd::load_doubles(x, conv + ((h0 + kh) * g.conv_w + w0 + kw) * channels + c);
            const V::mask here = hit == static_cast<V::lane_int>(kh * g.pool_w + kw);
            sg += here ? gv : doubles{};
            sgx += here ? gv * (x - m) : doubles{};
          }
        }
      }
    }
    simd::store(sum_g + c, sg);
    simd::store(sum_gx + c, sgx);
  }
}

// grad_conv = ((conv - mean[c]) * slope[c] + offset[c] + grad at the window's hit) * k[c]
// (input_grad of batch_norm_loops.h) at every window position, over pooled rows
// [row_begin, row_end); channels past the last whole vector are left to the caller.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void tiled_grad_conv(scalar_t* grad_conv, const scalar_t* conv, const scalar_t* grad,
                     const uint8_t* argmax, const ConvPoolGeometry& g, int64_t row_begin,
                     int64_t row_end, const T* mean, const T* slope, const T* offset,
                     const T* k) {
  using V = SelectVec<scalar_t>;
  using vec = typename V::type;
  using mask = typename V::mask;
  const int64_t channels = g.out_channels;
  for (int64_t ph = row_begin; ph < row_end; ++ph) {
    const int64_t h0 = ph * g.pool_stride_h;
    const int64_t window_h = std::min(h0 + g.pool_h, g.conv_h) - h0;
    for (int64_t pw = 0; pw < g.out_w; ++pw) {
      const int64_t w0 = pw * g.pool_stride_w;
      const int64_t window_w = std::min(w0 + g.pool_w, g.conv_w) - w0;
      for (int64_t c = 0; c + V::lanes <= channels; c += V::lanes) {
        const int64_t pooled = (ph * g.out_w + pw) * channels + c;
        vec gv, m, a, b, kv;
        simd::load(gv, grad + pooled);
        simd::load(m, mean + c);
        simd::load(a, slope + c);
        simd::load(b, offset + c);
        simd::load(kv, k + c);
        const mask hit = load_argmax<V>(argmax + pooled);
        for (int64_t kh = 0; kh < window_h; ++kh) {
          for (int64_t kw = 0; kw < window_w; ++kw) {
            const int64_t at = ((h0 + kh) * g.conv_w + w0 + kw) * channels + c;
            vec x;
            simd::load(x, conv + at);
            const mask here = hit == static_cast<typename V::lane_int>(kh * g.pool_w + kw);
            simd::store(grad_conv + at, vec(((x - m) * a + b + (here ? gv : vec{})) * kv));
          }
        }
      }
    }
  }
}
