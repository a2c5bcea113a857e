#pragma once
// Launch helpers and the pooling epilogue shared by the CUDA kernels.

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "../conv_pool_geometry.h"

namespace cifarnet::cuda {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill the GPU a few times over.
inline int blocks_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<int>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, sms * 16)));
}

#define CIFARNET_GRID_STRIDE_LOOP(index, n)                                              \
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; \
       index < (n); index += static_cast<int64_t>(blockDim.x) * gridDim.x)

// (n, c, h, w) of linear index `index` over a (N, C, H, W) tensor walked in its memory order:
// channels fastest when channels last, else width fastest. Consecutive threads then touch
// consecutive addresses.
struct Index4d {
  int64_t n, c, h, w;
};

__device__ __forceinline__ Index4d unravel(int64_t index, int64_t channels, int64_t height,
                                           int64_t width, bool channels_last) {
  Index4d i;
  if (channels_last) {
    i.c = index % channels;
    index /= channels;
    i.w = index % width;
    index /= width;
    i.h = index % height;
    i.n = index / height;
  } else {
    i.w = index % width;
    index /= width;
    i.h = index % height;
    index /= height;
    i.c = index % channels;
    i.n = index / channels;
  }
  return i;
}

// ReLU + max pool + one-byte argmax of (x - mean) * scale + shift (a batch norm in front) or
// of x, one thread per pooled output. Comparisons follow native max_pool2d (strictly greater,
// or NaN: ties go to the first maximum, NaN to the last), in acc_t, over the window's positions
// inside the convolution output (its padded ones never win); the argmax counts from the
// window's first, padded, position.
template <typename scalar_t, typename acc_t, bool affine>
__global__ void relu_max_pool2d_kernel(const scalar_t* __restrict__ conv, Strides4d cs,
                                       scalar_t* __restrict__ out, uint8_t* __restrict__ argmax,
                                       Strides4d os, ConvPoolGeometry g, bool channels_last,
                                       const acc_t* __restrict__ mean,
                                       const acc_t* __restrict__ scale,
                                       const acc_t* __restrict__ shift, int64_t total) {
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const Index4d i = unravel(index, g.out_channels, g.out_h, g.out_w, channels_last);
    const int64_t h0 = i.h * g.pool_stride_h - g.pool_pad_h;
    const int64_t w0 = i.w * g.pool_stride_w - g.pool_pad_w;
    const int64_t h1 = min(h0 + g.pool_h, g.conv_h), w1 = min(w0 + g.pool_w, g.conv_w);
    const scalar_t* window = conv + i.n * cs.n + i.c * cs.c;
    acc_t m = 0, s = 1, b = 0;
    if (affine) {
      m = mean[i.c];
      s = scale[i.c];
      b = shift[i.c];
    }
    acc_t best = 0;
    int offset = 0;
    bool first = true;
    for (int64_t h = max(h0, int64_t{0}); h < h1; ++h) {
      for (int64_t w = max(w0, int64_t{0}); w < w1; ++w) {
        acc_t x = static_cast<acc_t>(window[h * cs.h + w * cs.w]);
        // Rounded to scalar_t as native's batch norm output is before its ReLU and pool
        // compare it: values equal in float16/bfloat16 tie (no-op for float32/float64).
        if (affine) x = static_cast<acc_t>(static_cast<scalar_t>((x - m) * s + b));
        if (first || x > best || x != x) {
          best = x;
          offset = static_cast<int>((h - h0) * g.pool_w + (w - w0));
          first = false;
        }
      }
    }
    const bool positive = best > acc_t(0) || best != best;
    const int64_t at = i.n * os.n + i.c * os.c + i.h * os.h + i.w * os.w;
    out[at] = static_cast<scalar_t>(positive ? best : acc_t(0));
    argmax[at] = positive ? static_cast<uint8_t>(offset) : kArgmaxReluZero;
  }
}

// The pooling epilogue over a whole convolution output, into output/argmax (any layouts).
template <typename scalar_t, typename acc_t>
void launch_relu_max_pool2d(const at::Tensor& conv, at::Tensor& output, at::Tensor& argmax,
                            const ConvPoolGeometry& g, const acc_t* mean, const acc_t* scale,
                            const acc_t* shift) {
  const int64_t total = output.numel();
  if (total == 0) return;
  const bool channels_last = output.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (scale != nullptr) {
    relu_max_pool2d_kernel<scalar_t, acc_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
        conv.const_data_ptr<scalar_t>(), Strides4d(conv), output.mutable_data_ptr<scalar_t>(),
        argmax.mutable_data_ptr<uint8_t>(), Strides4d(output), g, channels_last, mean, scale,
        shift, total);
  } else {
    relu_max_pool2d_kernel<scalar_t, acc_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
        conv.const_data_ptr<scalar_t>(), Strides4d(conv), output.mutable_data_ptr<scalar_t>(),
        argmax.mutable_data_ptr<uint8_t>(), Strides4d(output), g, channels_last, nullptr,
        nullptr, nullptr, total);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The gradient that reaches pre-pool element (n, c, h, w): the sum, in acc_t and in window
// order (as native max_pool2d's backward gathers it), of the pooled gradients of the windows
// whose argmax names this element; windows whose maximum was not positive pass nothing (ReLU).
// A gather, not a scatter: every element is computed once (no zero fill), and overlapping
// windows (pool stride < pool size) need no atomics, so the result never depends on thread
// order and float16/bfloat16 sums are not rounded term by term.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t pooled_gradient_at(const scalar_t* __restrict__ grad,
                                                    const Strides4d& gs,
                                                    const uint8_t* __restrict__ argmax,
                                                    const Strides4d& as, const ConvPoolGeometry& g,
                                                    int64_t n, int64_t c, int64_t h, int64_t w) {
  // (h, w) counted from the first window's first, padded, row and column.
  h += g.pool_pad_h;
  w += g.pool_pad_w;
  // Windows [ph_begin, ph_end) x [pw_begin, pw_end) contain (h, w).
  const int64_t ph_begin = h < g.pool_h ? 0 : (h - g.pool_h) / g.pool_stride_h + 1;
  const int64_t ph_end = min(h / g.pool_stride_h + 1, g.out_h);
  const int64_t pw_begin = w < g.pool_w ? 0 : (w - g.pool_w) / g.pool_stride_w + 1;
  const int64_t pw_end = min(w / g.pool_stride_w + 1, g.out_w);
  acc_t sum = 0;
  for (int64_t ph = ph_begin; ph < ph_end; ++ph) {
    for (int64_t pw = pw_begin; pw < pw_end; ++pw) {
      const uint8_t offset = argmax[n * as.n + c * as.c + ph * as.h + pw * as.w];
      const int64_t hit = (h - ph * g.pool_stride_h) * g.pool_w + (w - pw * g.pool_stride_w);
      if (offset != kArgmaxReluZero && offset == hit) {
        sum += static_cast<acc_t>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
      }
    }
  }
  return sum;
}

// The gradient of the pre-pool activation, one thread per convolution-output element in memory
// order (pooled_gradient_at).
template <typename scalar_t, typename acc_t>
__global__ void gather_pool_gradient_kernel(const scalar_t* __restrict__ grad, Strides4d gs,
                                            const uint8_t* __restrict__ argmax, Strides4d as,
                                            scalar_t* __restrict__ grad_conv, Strides4d cs,
                                            ConvPoolGeometry g, bool channels_last,
                                            int64_t total) {
  CIFARNET_GRID_STRIDE_LOOP(index, total) {
    const Index4d i = unravel(index, g.out_channels, g.conv_h, g.conv_w, channels_last);
    grad_conv[i.n * cs.n + i.c * cs.c + i.h * cs.h + i.w * cs.w] = static_cast<scalar_t>(
        pooled_gradient_at<scalar_t, acc_t>(grad, gs, argmax, as, g, i.n, i.c, i.h, i.w));
  }
}

// The gradient of the pre-pool activation (in `format`): zeros but at the argmax hits.
template <typename scalar_t>
at::Tensor pool_input_gradient(const at::Tensor& grad_output, const at::Tensor& argmax,
                                 const ConvPoolGeometry& g, at::MemoryFormat format) {
  at::Tensor grad_conv = at::empty({g.batch, g.out_channels, g.conv_h, g.conv_w},
                                   grad_output.options().memory_format(format));
  const int64_t total = grad_conv.numel();
  if (total == 0) return grad_conv;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  gather_pool_gradient_kernel<scalar_t, acc_t>
      <<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          grad_output.const_data_ptr<scalar_t>(), Strides4d(grad_output),
          argmax.const_data_ptr<uint8_t>(), Strides4d(argmax),
          grad_conv.mutable_data_ptr<scalar_t>(), Strides4d(grad_conv), g,
          format == at::MemoryFormat::ChannelsLast, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_conv;
}

}  // namespace cifarnet::cuda
