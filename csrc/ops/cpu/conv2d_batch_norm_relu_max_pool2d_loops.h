// Hot loops of the CPU conv2d -> batch norm -> ReLU -> max_pool2d kernels: the pooling
// epilogue (with the batch norm as a per-channel affine map in front) and batch norm's
// per-channel sums and affine maps. Included once per ISA through isa_variants.inc.

#include "batch_norm_loops.h"
#include "conv2d_relu_max_pool2d_loops.h"

// The backward's two passes over one sample when pool windows tile the convolution output
// (pool stride == pool size, no pool padding: see windows_tile), vectorised over channels:
// every window position is read once, and the argmax turns into a per-lane mask of "this
// position is the window's hit". conv and grad_conv: the sample's channels-last convolution
// output and its gradient; grad and argmax: the sample's channels-last pooled gradient and
// argmax.

// sum_g[c] += sum of hit gradients, sum_gx[c] += sum of grad * (x - mean[c]) at the hits, in
// double, over pooled rows [row_begin, row_end), eight channels at a time; channels past the
// last group of eight are left to the caller. A tiled window holds at most one hit per
// channel (none where ReLU zeroed its maximum): its value is selected by the argmax as raw
// bits (no arithmetic, so no comparison wider than the ISA's registers for 16- and 32-bit
// data), then widened once per window.
template <typename scalar_t, typename T = simd::opmath_t<scalar_t>>
void tiled_hit_sums(const scalar_t* conv, const scalar_t* grad, const uint8_t* argmax,
                    const ConvPoolGeometry& g, int64_t row_begin, int64_t row_end,
                    const T* mean, double* sum_g, double* sum_gx) {
  using simd::four_doubles;
  using bits = typename simd::EightBits<scalar_t>::type;
  using lane_int = typename simd::EightBits<scalar_t>::lane_int;
  const int64_t channels = g.out_channels;
  for (int64_t c = 0; c + 8 <= channels; c += 8) {
    four_doubles m_lo, m_hi, sg_lo, sg_hi, sgx_lo, sgx_hi;
    simd::load_double_halves(mean + c, m_lo, m_hi);
    simd::load(sg_lo, sum_g + c);
    simd::load(sg_hi, sum_g + c + 4);
    simd::load(sgx_lo, sum_gx + c);
    simd::load(sgx_hi, sum_gx + c + 4);
    for (int64_t ph = row_begin; ph < row_end; ++ph) {
      const int64_t h0 = ph * g.pool_stride_h;
      const int64_t window_h = std::min(h0 + g.pool_h, g.conv_h) - h0;
      for (int64_t pw = 0; pw < g.out_w; ++pw) {
        const int64_t w0 = pw * g.pool_stride_w;
        const int64_t window_w = std::min(w0 + g.pool_w, g.conv_w) - w0;
        const int64_t pooled = (ph * g.out_w + pw) * channels + c;
        const bits hit = widen_argmax<bits>(argmax + pooled);
        bits x_hit{};
        for (int64_t kh = 0; kh < window_h; ++kh) {
          for (int64_t kw = 0; kw < window_w; ++kw) {
            bits x;
            simd::load(x, conv + ((h0 + kh) * g.conv_w + w0 + kw) * channels + c);
            x_hit = hit == argmax_lane<lane_int>(kh * g.pool_w + kw) ? x : x_hit;
          }
        }
        // A window whose maximum ReLU zeroed has no hit: its gradient counts as zero.
        bits grad_bits;
        simd::load(grad_bits, grad + pooled);
        grad_bits = hit != argmax_lane<lane_int>(kArgmaxReluZero) ? grad_bits : bits{};
        four_doubles g_lo, g_hi, x_lo, x_hi;
        simd::to_double_halves<scalar_t>(grad_bits, g_lo, g_hi);
        simd::to_double_halves<scalar_t>(x_hit, x_lo, x_hi);
        sg_lo += g_lo;
        sg_hi += g_hi;
        sgx_lo += g_lo * (x_lo - m_lo);
        sgx_hi += g_hi * (x_hi - m_hi);
      }
    }
    simd::store(sum_g + c, sg_lo);
    simd::store(sum_g + c + 4, sg_hi);
    simd::store(sum_gx + c, sgx_lo);
    simd::store(sum_gx + c + 4, sgx_hi);
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
        const mask hit = widen_argmax<mask>(argmax + pooled);
        for (int64_t kh = 0; kh < window_h; ++kh) {
          for (int64_t kw = 0; kw < window_w; ++kw) {
            const int64_t at = ((h0 + kh) * g.conv_w + w0 + kw) * channels + c;
            vec x;
            simd::load(x, conv + at);
            const mask here = hit == argmax_lane<typename V::lane_int>(kh * g.pool_w + kw);
            simd::store(grad_conv + at, vec(((x - m) * a + b + (here ? gv : vec{})) * kv));
          }
        }
      }
    }
  }
}
