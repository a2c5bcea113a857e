// Loops of the Winograd F(2x2, 5x5) and F(4x4, 3x3) convolutions (see winograd_convolution.cpp):
// the input, output-gradient and output transforms of one block of tiles, vectorised over
// channels, and the register-blocked matrix product that multiplies the transformed tiles by
// the transformed filters at each of the 36 points. Both use the interpolation points 0, 1,
// -1, 2, -2 and infinity, so they share the input transform; a template parameter kTile (the
// outputs along a tile's side, 2 or 4; the filter's side is 7 - kTile) picks the rest.
// Included inside an ISA namespace that defines kVectorRegisters and kVectorRegisterBytes (so:
// no include guard, no includes), for AVX2 today; written for any width.
//
// Buffers of one block: V[point][tile][in_padded], M[point][tile][out_padded], every row a
// multiple of kLanes floats (zero in the padding channels), so that the product runs on whole
// vectors, and 64-byte aligned: GCC's generic tuning splits unaligned 32-byte loads and stores
// in two, which cost the product's accumulators a fifth of its time on AVX2.

namespace winograd {

using Vec = simd::RegisterVec<kVectorRegisterBytes, float>;
using vfloat = Vec::type;
constexpr int kLanes = Vec::lanes;
constexpr int kPoints = 36;  // 6 x 6 transformed values per tile
// The product's register block: kGemmRows rows by two vectors, plus two loads and a broadcast
// (AVX2: 12 + 3 of 16 registers; AVX-512: 24 + 3 of 32).
constexpr int kGemmRows = kVectorRegisters >= 32 ? 12 : 6;
constexpr int kGemmCols = 2 * kLanes;

typedef vfloat aligned_vfloat __attribute__((may_alias));

// A vector at p, which is vector aligned (a block buffer's row).
inline __attribute__((always_inline)) void load_aligned(vfloat& v, const float* p) {
  v = *reinterpret_cast<const aligned_vfloat*>(p);
}

inline __attribute__((always_inline)) void store_aligned(float* p, vfloat v) {
  *reinterpret_cast<aligned_vfloat*>(p) = v;
}

// x in every lane (x - 0 is x for every x, -0 and NaN included, so this is a bare broadcast;
// 0 + x would keep an add, which turns -0 into +0).
inline __attribute__((always_inline)) vfloat splat(float x) { return x - vfloat{}; }

// B^T d for one line of six inputs (interpolation points 0, 1, -1, 2, -2 and infinity: integer
// points, so the input transform multiplies by small integers only).
inline __attribute__((always_inline)) void input_line(const vfloat* d, vfloat* v) {
  const vfloat d4_minus_4d2 = d[4] - 4.0f * d[2];
  const vfloat d3_minus_4d1 = d[3] - 4.0f * d[1];
  const vfloat d4_minus_d2 = d[4] - d[2];
  const vfloat d3_minus_d1 = 2.0f * (d[3] - d[1]);
  v[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
  v[1] = d4_minus_4d2 + d3_minus_4d1;
  v[2] = d4_minus_4d2 - d3_minus_4d1;
  v[3] = d4_minus_d2 + d3_minus_d1;
  v[4] = d4_minus_d2 - d3_minus_d1;
  v[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
}

// A^T m for one line of six transformed values: the kTile outputs (output i takes each finite
// point's value times the point to the power i, and the point at infinity's in the last).
template <int kTile>
inline __attribute__((always_inline)) void output_line(const vfloat* m, vfloat* y) {
  const vfloat sum12 = m[1] + m[2], diff12 = m[1] - m[2];
  const vfloat sum34 = m[3] + m[4], diff34 = m[3] - m[4];
  y[0] = m[0] + sum12 + sum34;
  if constexpr (kTile == 2) {
    y[1] = diff12 + 2.0f * diff34 + m[5];
  } else {
    static_assert(kTile == 4);
    y[1] = diff12 + 2.0f * diff34;
    y[2] = sum12 + 4.0f * sum34;
    y[3] = diff12 + 8.0f * diff34 + m[5];
  }
}

// A e for one line of kTile output gradients: the six transformed values (the adjoint of
// output_line).
template <int kTile>
inline __attribute__((always_inline)) void gradient_line(const vfloat* e, vfloat* points) {
  // The gradients' even and odd terms at the points 1 (even, odd) and 2 (even4, odd2); at -1
  // and -2 the odd terms change sign.
  vfloat even = e[0], odd = e[1], even4 = e[0], odd2 = 2.0f * e[1];
  if constexpr (kTile == 4) {
    even += e[2], odd += e[3];
    even4 += 4.0f * e[2], odd2 += 8.0f * e[3];
  }
  points[0] = e[0];
  points[1] = even + odd;
  points[2] = even - odd;
  points[3] = even4 + odd2;
  points[4] = even4 - odd2;
  points[5] = e[kTile - 1];
}

// kLanes channels from `p`, `count` of which exist (none, in a vector of padding channels past
// the last: the products' rows are padded to two vectors); the rest zero.
inline __attribute__((always_inline)) vfloat load_channels(const float* p, int64_t count) {
  vfloat v{};
  if (count >= kLanes) {
    simd::load(v, p);
  } else if (count > 0) {
    std::memcpy(&v, p, count * sizeof(float));
  }
  return v;
}

inline __attribute__((always_inline)) void store_channels(float* p, vfloat v, int64_t count) {
  if (count >= kLanes) {
    simd::store(p, v);
  } else if (count > 0) {
    std::memcpy(p, &v, count * sizeof(float));
  }
}

// Where a tile of the batch lies: its sample, and its first output's row and column (its
// first input's are those minus the padding).
struct TilePlace {
  int64_t n, oy, ox;
};

template <int kTile>
inline TilePlace tile_place(const Geometry& g, int64_t tile) {
  const int64_t per_image = g.tiles_h * g.tiles_w;
  const int64_t rest = tile % per_image;
  return {tile / per_image, kTile * (rest / g.tiles_w), kTile * (rest % g.tiles_w)};
}

// V for `count` tiles from `first`: each tile's 6 x 6 inputs (zero outside the image)
// transformed, at v[point * rows * channels_padded + tile * channels_padded + c]. Returns a
// vector that is non-zero (NaN) where an input was not finite.
template <int kTile>
inline vfloat transform_inputs(const float* input, const Geometry& g, int64_t first,
                               int64_t count, int64_t rows, float* v) {
  const int64_t point_stride = rows * g.channels_padded;
  vfloat not_finite{};
  for (int64_t i = 0; i < count; ++i) {
    const TilePlace t = tile_place<kTile>(g, first + i);
    const float* image = input + t.n * g.height * g.width * g.channels;
    const int64_t y = t.oy - g.pad_h, x = t.ox - g.pad_w;  // the tile's first input
    bool row_in[6], col_in[6];
    for (int k = 0; k < 6; ++k) {
      row_in[k] = y + k >= 0 && y + k < g.height;
      col_in[k] = x + k >= 0 && x + k < g.width;
    }
    for (int64_t c = 0; c < g.channels_padded; c += kLanes) {
      const int64_t valid = g.channels - c;
      vfloat rows_done[6][6];  // B^T applied along each row: rows_done[row][point]
      for (int r = 0; r < 6; ++r) {
        vfloat d[6];
        for (int k = 0; k < 6; ++k) {
          d[k] = row_in[r] && col_in[k]
                     ? load_channels(image + ((y + r) * g.width + x + k) * g.channels + c,
                                     valid)
                     : vfloat{};
          not_finite += d[k] * 0.0f;
        }
        input_line(d, rows_done[r]);
      }
      for (int b = 0; b < 6; ++b) {
        const vfloat column[6] = {rows_done[0][b], rows_done[1][b], rows_done[2][b],
                                  rows_done[3][b], rows_done[4][b], rows_done[5][b]};
        vfloat out[6];
        input_line(column, out);
        for (int a = 0; a < 6; ++a) {
          store_aligned(v + (a * 6 + b) * point_stride + i * g.channels_padded + c, out[a]);
        }
      }
    }
  }
  return not_finite;
}

// The output gradients of `count` tiles transformed (A e A^T, the adjoint of the output
// transform; zero for outputs past the edge) in the output channels [k_begin, k_end) (of the
// padded ones, multiples of kLanes), at e[point][tile][k - k_begin].
template <int kTile>
inline vfloat transform_output_gradients(const float* grad_output, const Geometry& g,
                                         int64_t first, int64_t count, int64_t k_begin,
                                         int64_t k_end, float* e) {
  const int64_t width = k_end - k_begin, point_stride = count * width;
  vfloat not_finite{};
  for (int64_t i = 0; i < count; ++i) {
    const auto [n, oy, ox] = tile_place<kTile>(g, first + i);
    const float* image = grad_output + n * g.out_h * g.out_w * g.out_channels;
    const int64_t rows = std::min<int64_t>(kTile, g.out_h - oy);
    const int64_t cols = std::min<int64_t>(kTile, g.out_w - ox);
    for (int64_t c = k_begin; c < k_end; c += kLanes) {
      const int64_t valid = g.out_channels - c;
      vfloat row_points[kTile][6];  // A applied along each row of gradients
      for (int r = 0; r < kTile; ++r) {
        vfloat line[kTile];
        for (int col = 0; col < kTile; ++col) {
          line[col] = vfloat{};
          if (r < rows && col < cols) {
            line[col] = load_channels(image + ((oy + r) * g.out_w + ox + col) * g.out_channels + c,
                                      valid);
          }
          not_finite += line[col] * 0.0f;
        }
        gradient_line<kTile>(line, row_points[r]);
      }
      for (int b = 0; b < 6; ++b) {
        vfloat column[kTile], points[6];
        for (int r = 0; r < kTile; ++r) column[r] = row_points[r][b];
        gradient_line<kTile>(column, points);
        for (int a = 0; a < 6; ++a) {
          store_aligned(e + (a * 6 + b) * point_stride + i * width + c - k_begin, points[a]);
        }
      }
    }
  }
  return not_finite;
}

// The outputs of `count` tiles from M (A^T M A plus the bias), written where they exist.
// Returns a vector that is non-zero (NaN) where an output is not finite.
template <int kTile>
inline vfloat transform_outputs(const float* m, int64_t rows, const float* bias,
                                const Geometry& g, int64_t first, int64_t count, float* output) {
  const int64_t point_stride = rows * g.out_channels_padded;
  vfloat not_finite{};
  for (int64_t i = 0; i < count; ++i) {
    const auto [n, oy, ox] = tile_place<kTile>(g, first + i);
    float* image = output + n * g.out_h * g.out_w * g.out_channels;
    const int64_t out_rows = std::min<int64_t>(kTile, g.out_h - oy);
    const int64_t out_cols = std::min<int64_t>(kTile, g.out_w - ox);
    for (int64_t c = 0; c < g.out_channels_padded; c += kLanes) {
      const int64_t valid = g.out_channels - c;
      vfloat reduced[kTile][6];  // A^T applied along each point row: reduced[column][point row]
      for (int a = 0; a < 6; ++a) {
        vfloat line[6], y[kTile];
        for (int b = 0; b < 6; ++b) {
          load_aligned(line[b], m + (a * 6 + b) * point_stride + i * g.out_channels_padded + c);
        }
        output_line<kTile>(line, y);
        for (int col = 0; col < kTile; ++col) reduced[col][a] = y[col];
      }
      const vfloat b = bias != nullptr ? load_channels(bias + c, valid) : vfloat{};
      for (int col = 0; col < kTile; ++col) {
        vfloat y[kTile];
        output_line<kTile>(reduced[col], y);
        for (int r = 0; r < kTile; ++r) {
          y[r] += b;
          not_finite += y[r] * 0.0f;
          if (r < out_rows && col < out_cols) {
            store_channels(image + ((oy + r) * g.out_w + ox + col) * g.out_channels + c, y[r],
                           valid);
          }
        }
      }
    }
  }
  return not_finite;
}

// c[rows x kGemmCols] (=|+=) a[rows x depth] b[depth x kGemmCols], a's element (r, k) at
// a[r * a_row + k * a_depth], b's rows b_row apart, c's rows c_row apart.
template <int rows>
inline __attribute__((always_inline)) void gemm_block(const float* a, int64_t a_row,
                                                      int64_t a_depth, const float* b,
                                                      int64_t b_row, float* c, int64_t c_row,
                                                      int64_t depth, bool accumulate) {
  vfloat acc[rows][2];
  for (int r = 0; r < rows; ++r) {
    if (accumulate) {
      load_aligned(acc[r][0], c + r * c_row);
      load_aligned(acc[r][1], c + r * c_row + kLanes);
    } else {
      acc[r][0] = acc[r][1] = vfloat{};
    }
  }
  for (int64_t k = 0; k < depth; ++k) {
    vfloat b0, b1;
    load_aligned(b0, b + k * b_row);
    load_aligned(b1, b + k * b_row + kLanes);
    const float* column = a + k * a_depth;
    for (int r = 0; r < rows; ++r) {
      const vfloat s = splat(column[r * a_row]);
      acc[r][0] += s * b0;
      acc[r][1] += s * b1;
    }
  }
  for (int r = 0; r < rows; ++r) {
    store_aligned(c + r * c_row, acc[r][0]);
    store_aligned(c + r * c_row + kLanes, acc[r][1]);
  }
}

// The last 1 to kGemmRows - 1 rows.
template <int rows = kGemmRows - 1>
inline void gemm_tail(int64_t count, const float* a, int64_t a_row, int64_t a_depth,
                      const float* b, int64_t b_row, float* c, int64_t c_row, int64_t depth,
                      bool accumulate) {
  if constexpr (rows > 0) {
    if (count == rows) {
      gemm_block<rows>(a, a_row, a_depth, b, b_row, c, c_row, depth, accumulate);
    } else {
      gemm_tail<rows - 1>(count, a, a_row, a_depth, b, b_row, c, c_row, depth, accumulate);
    }
  }
}

// c[rows x cols] (=|+=) a[rows x depth] b[depth x cols], cols a multiple of kGemmCols.
inline void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row,
                 int64_t a_depth, const float* b, int64_t b_row, float* c, int64_t c_row,
                 bool accumulate) {
  for (int64_t col = 0; col < cols; col += kGemmCols) {
    int64_t r = 0;
    for (; r + kGemmRows <= rows; r += kGemmRows) {
      gemm_block<kGemmRows>(a + r * a_row, a_row, a_depth, b + col, b_row, c + r * c_row + col,
                            c_row, depth, accumulate);
    }
    if (r < rows) {
      gemm_tail(rows - r, a + r * a_row, a_row, a_depth, b + col, b_row, c + r * c_row + col,
                c_row, depth, accumulate);
    }
  }
}

inline bool any_lane(vfloat v) {
  for (int i = 0; i < kLanes; ++i) {
    if (v[i] != 0.0f) return true;
  }
  return false;
}

// One block of the forward: `count` tiles from `first`, through buffers v and m of `rows`
// (>= count) tiles. u: the transformed filters, u[point][c][k_padded]. Sets *not_finite where
// an input or output value was not finite.
template <int kTile>
inline void forward_block(const float* input, const float* u, const float* bias,
                          const Geometry& g, int64_t first, int64_t count, int64_t rows, float* v,
                          float* m, float* output, bool* not_finite) {
  vfloat flag = transform_inputs<kTile>(input, g, first, count, rows, v);
  const int64_t c_pad = g.channels_padded, k_pad = g.out_channels_padded;
  for (int point = 0; point < kPoints; ++point) {
    gemm(count, k_pad, c_pad, v + point * rows * c_pad, c_pad, 1, u + point * c_pad * k_pad,
         k_pad, m + point * rows * k_pad, k_pad, /*accumulate=*/false);
  }
  flag += transform_outputs<kTile>(m, rows, bias, g, first, count, output);
  *not_finite = any_lane(flag);
}

// One block of the weight gradient in the output channels [k_begin, k_end) (multiples of
// kGemmCols): products[point][c][k - k_begin] (=|+=) the sum over the block's tiles of
// V[point][tile][c] E[point][tile][k] (v and e hold `count` tiles).
template <int kTile>
inline void weight_gradient_block(const float* input, const float* grad_output,
                                  const Geometry& g, int64_t first, int64_t count,
                                  int64_t k_begin, int64_t k_end, float* v, float* e,
                                  float* products, bool accumulate, bool* not_finite) {
  vfloat flag = transform_inputs<kTile>(input, g, first, count, count, v);
  flag += transform_output_gradients<kTile>(grad_output, g, first, count, k_begin, k_end, e);
  const int64_t c_pad = g.channels_padded, width = k_end - k_begin;
  for (int point = 0; point < kPoints; ++point) {
    gemm(c_pad, width, count, v + point * count * c_pad, 1, c_pad, e + point * count * width,
         width, products + point * c_pad * width, width, accumulate);
  }
  *not_finite = any_lane(flag);
}

// sum[row][k_begin + j] (=|+=) products[row][j] in double, for `rows` rows of `width` products
// (the sum's rows hold `sum_row` values).
inline void add_products(const float* products, int64_t rows, int64_t width, double* sum,
                         int64_t sum_row, int64_t k_begin, bool accumulate) {
  for (int64_t row = 0; row < rows; ++row) {
    double* sum_row_slice = sum + row * sum_row + k_begin;
    const float* product_row = products + row * width;
    if (accumulate) {
      for (int64_t j = 0; j < width; ++j) sum_row_slice[j] += product_row[j];
    } else {
      for (int64_t j = 0; j < width; ++j) sum_row_slice[j] = product_row[j];
    }
  }
}

// G (6 x kKernel) for the points 0, 1, -1, 2, -2 and infinity: each finite point's powers
// scaled by the inverse of its factor in B^T and A^T's normalisation (1/4, -1/6, 1/24), the
// point at infinity picking the filter's last tap.
template <int kKernel>
struct FilterTransform {
  double g[6][kKernel] = {};
  constexpr FilterTransform() {
    constexpr double points[5] = {0, 1, -1, 2, -2};
    constexpr double scales[5] = {1.0 / 4, -1.0 / 6, -1.0 / 6, 1.0 / 24, 1.0 / 24};
    for (int a = 0; a < 5; ++a) {
      double power = 1;
      for (int j = 0; j < kKernel; ++j, power *= points[a]) g[a][j] = scales[a] * power;
    }
    g[5][kKernel - 1] = 1;
  }
};

// Output channels the filter transforms take at once: the innermost loop, which GCC
// vectorises (in double). One thread does a layer's filters in ~0.1 ms; a parallel region for
// them cost more than that on a machine whose other core was busy.
constexpr int kFilterBlock = 8;

// U[point][c][k_padded] = (G w[k][c] G^T)[point] for weights w[k][c][r][r] (r = 7 - kTile;
// element (k, c, i, j) at k * strides[0] + c * strides[1] + i * strides[2] + j * strides[3]),
// computed in double and rounded once; zero in the padding channels. With `adjoint`, w holds
// the weights [channels][out_channels][r][r] of the convolution whose input gradient this is,
// and the filters are theirs flipped, their channel axes swapped.
template <int kTile>
inline void transform_filters(const float* w, const int64_t* strides, bool adjoint,
                              int64_t channels, int64_t out_channels, int64_t c_pad,
                              int64_t k_pad, float* u) {
  constexpr int r = 7 - kTile;
  constexpr FilterTransform<r> transform;
  for (int64_t point = 0; point < kPoints; ++point) {
    for (int64_t c = channels; c < c_pad; ++c) {
      for (int64_t k = 0; k < k_pad; ++k) u[(point * c_pad + c) * k_pad + k] = 0.0f;
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t k0 = 0; k0 < k_pad; k0 += kFilterBlock) {
      const int64_t count = out_channels - k0 < kFilterBlock ? out_channels - k0 : kFilterBlock;
      double filter[r * r][kFilterBlock] = {};
      for (int64_t j = 0; j < count; ++j) {
        for (int e = 0; e < r * r; ++e) {
          const int64_t i = e / r, jj = e % r;
          filter[e][j] = adjoint ? w[c * strides[0] + (k0 + j) * strides[1] +
                                     (r - 1 - i) * strides[2] + (r - 1 - jj) * strides[3]]
                                 : w[(k0 + j) * strides[0] + c * strides[1] + i * strides[2] +
                                     jj * strides[3]];
        }
      }
      double rows[6][r][kFilterBlock] = {};  // G w
      for (int a = 0; a < 6; ++a) {
        for (int v = 0; v < r; ++v) {
          for (int i = 0; i < r; ++i) {
            for (int j = 0; j < kFilterBlock; ++j) {
              rows[a][v][j] += transform.g[a][i] * filter[i * r + v][j];
            }
          }
        }
      }
      for (int a = 0; a < 6; ++a) {
        for (int b = 0; b < 6; ++b) {
          double sum[kFilterBlock] = {};
          for (int v = 0; v < r; ++v) {
            for (int j = 0; j < kFilterBlock; ++j) sum[j] += rows[a][v][j] * transform.g[b][v];
          }
          float* out = u + ((a * 6 + b) * c_pad + c) * k_pad + k0;
          for (int j = 0; j < kFilterBlock; ++j) out[j] = static_cast<float>(sum[j]);
        }
      }
    }
  }
}

// dW[k][c] = G^T dU[.][c][k] G into grad_weight (element (k, c, u, v) at k * strides[0] +
// c * strides[1] + u * strides[2] + v * strides[3]), dU the sum of the `runs` runs' sums
// sums[run][point][c][k_padded] (added in run order). Sets *not_finite where a gradient is
// not finite.
template <int kTile>
inline void transform_filter_gradients(const double* const* sums, int64_t runs,
                                       int64_t channels, int64_t out_channels, int64_t c_pad,
                                       int64_t k_pad, float* grad_weight,
                                       const int64_t* strides, bool* not_finite) {
  constexpr int r = 7 - kTile;
  constexpr FilterTransform<r> transform;
  double flag = 0;
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t k0 = 0; k0 < out_channels; k0 += kFilterBlock) {
      const int64_t count = out_channels - k0 < kFilterBlock ? out_channels - k0 : kFilterBlock;
      double grad_u[kPoints][kFilterBlock] = {};
      for (int64_t run = 0; run < runs; ++run) {
        for (int point = 0; point < kPoints; ++point) {
          const double* sum = sums[run] + (point * c_pad + c) * k_pad + k0;
          for (int j = 0; j < kFilterBlock; ++j) grad_u[point][j] += sum[j];
        }
      }
      double rows[r][6][kFilterBlock] = {};  // G^T dU
      for (int u = 0; u < r; ++u) {
        for (int b = 0; b < 6; ++b) {
          for (int a = 0; a < 6; ++a) {
            for (int j = 0; j < kFilterBlock; ++j) {
              rows[u][b][j] += transform.g[a][u] * grad_u[a * 6 + b][j];
            }
          }
        }
      }
      for (int u = 0; u < r; ++u) {
        for (int v = 0; v < r; ++v) {
          double sum[kFilterBlock] = {};
          for (int b = 0; b < 6; ++b) {
            for (int j = 0; j < kFilterBlock; ++j) sum[j] += rows[u][b][j] * transform.g[b][v];
          }
          for (int64_t j = 0; j < count; ++j) {
            const float value = static_cast<float>(sum[j]);
            flag += value * 0.0f;  // a double beyond float's range is not finite either
            grad_weight[(k0 + j) * strides[0] + c * strides[1] + u * strides[2] +
                        v * strides[3]] = value;
          }
        }
      }
    }
  }
  *not_finite = flag != 0;
}

}  // namespace winograd
