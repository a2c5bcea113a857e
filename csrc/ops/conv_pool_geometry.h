#pragma once
// Argument checks and output geometry of conv2d -> ReLU -> max_pool2d, shared by the CPU and
// CUDA kernels so both refuse the same inputs with the same messages.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

namespace cifarnet {

// The pool argmax is stored in one byte per output: window offsets 0..254, and 255 for "the
// window's maximum was not positive", which also carries the ReLU mask to the backward.
constexpr int64_t kMaxPoolWindowElements = 255;
constexpr uint8_t kArgmaxReluZero = 255;

struct ConvPoolGeometry {
  int64_t batch, in_channels, out_channels;
  int64_t in_h, in_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t conv_h, conv_w;  // convolution (pre-pool) output
  int64_t pool_h, pool_w, pool_stride_h, pool_stride_w;
  // Pool window (ph, pw) spans convolution rows ph * pool_stride_h - pool_pad_h + [0, pool_h)
  // and columns likewise; its positions outside the convolution output are padding, which never
  // wins (native's -inf), and the argmax offset counts them: kh * pool_w + kw from the
  // window's first, padded, row and column.
  int64_t pool_pad_h, pool_pad_w;
  int64_t out_h, out_w;  // pooled output
};

// Element strides of a 4-D (N, C, H, W) tensor, whatever its memory format.
struct Strides4d {
  int64_t n, c, h, w;
  explicit Strides4d(const at::Tensor& t)
      : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

inline std::string shape_string(const at::Tensor& t) { return c10::str(t.sizes()); }

// Output length of a max pool with padding `pad` on both sides and no dilation, as
// at::pooling_output_shape computes it: in ceil mode the last window must start inside the
// input or its left padding.
inline int64_t pooled_size(int64_t input, int64_t window, int64_t stride, int64_t pad,
                           bool ceil_mode) {
  int64_t numerator = input + 2 * pad - window + (ceil_mode ? stride - 1 : 0);
  // floor division (numerator may be negative when the window is larger than the input)
  int64_t out = (numerator >= 0 ? numerator / stride : -((-numerator + stride - 1) / stride)) + 1;
  if (ceil_mode && out > 0 && (out - 1) * stride >= input + pad) {
    --out;
  }
  return out;
}

inline void check_pair(at::IntArrayRef values, const char* name) {
  TORCH_CHECK(values.size() == 2, name, " must have two elements (height, width), got ", values);
}

// float32 and float64, and the 16-bit float16 and bfloat16 (stored in 16 bits, computed and
// accumulated in float32) on every device.
inline void check_floating_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                  t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// A convolution's weight and (where given) bias against its input, as native conv2d checks
// them: dtypes and devices match the input's, one bias value per output channel.
inline void check_conv_parameters(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias) {
  // Native conv2d returns 0 output channels for 0 input channels, whatever the weight says:
  // there is no native result to match, and the kernels would read the weight's channels.
  TORCH_CHECK(weight.size(1) > 0, "weight must have at least one input channel, got shape ",
              shape_string(weight));
  // Native conv2d refuses a weight without output channels.
  TORCH_CHECK(weight.size(0) > 0, "weight must have at least one output channel, got shape ",
              shape_string(weight));
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "weight dtype ", weight.scalar_type(),
              " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), "weight is on ", weight.device(),
              " but input is on ", input.device());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                "bias must be a 1-D tensor of ", weight.size(0),
                " elements (one per output channel), got shape ", shape_string(*bias));
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias dtype ", bias->scalar_type(),
                " does not match input dtype ", input.scalar_type());
    TORCH_CHECK(bias->device() == input.device(), "bias is on ", bias->device(),
                " but input is on ", input.device());
  }
}

// A convolution's stride (positive) and padding (non-negative), two values each.
inline void check_conv_stride_padding(at::IntArrayRef stride, at::IntArrayRef padding) {
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, "stride must be positive, got ", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, "padding must be non-negative, got ", padding);
}

// Checks everything native conv2d and max_pool2d would refuse, plus the one-byte argmax
// limit, and returns the geometry. Messages name the argument and the offending value.
inline ConvPoolGeometry check_conv2d_relu_max_pool2d_args(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef pool_size,
    at::IntArrayRef pool_stride, bool ceil_mode, at::IntArrayRef pool_padding) {
  TORCH_CHECK(input.dim() == 4, "input must be a 4-D tensor (N, C, H, W), got ", input.dim(),
              "-D tensor of shape ", shape_string(input));
  TORCH_CHECK(weight.dim() == 4, "weight must be a 4-D tensor (C_out, C_in, kH, kW), got ",
              weight.dim(), "-D tensor of shape ", shape_string(weight));
  check_floating_dtype(input, "input");
  TORCH_CHECK(input.size(1) == weight.size(1), "input has ", input.size(1),
              " channels but weight of shape ", shape_string(weight), " expects ", weight.size(1),
              " input channels");
  check_conv_parameters(input, weight, bias);
  check_conv_stride_padding(stride, padding);
  check_pair(pool_size, "pool_size");
  check_pair(pool_padding, "pool_padding");
  TORCH_CHECK(pool_stride.empty() || pool_stride.size() == 2,
              "pool_stride must be empty (= pool_size) or have two elements, got ", pool_stride);
  TORCH_CHECK(pool_size[0] > 0 && pool_size[1] > 0, "pool_size must be positive, got ", pool_size);
  const at::IntArrayRef window_stride = pool_stride.empty() ? pool_size : pool_stride;
  TORCH_CHECK(window_stride[0] > 0 && window_stride[1] > 0, "pool_stride must be positive, got ",
              window_stride);
  // max_pool2d's rule (a RuntimeError there too): every window then holds at least one
  // position of the input, so no window is all padding.
  TORCH_CHECK(pool_padding[0] >= 0 && pool_padding[1] >= 0,
              "pool_padding must be non-negative, got ", pool_padding);
  TORCH_CHECK(pool_padding[0] <= pool_size[0] / 2 && pool_padding[1] <= pool_size[1] / 2,
              "pool_padding should be at most half of pool_size, got pool_padding=", pool_padding,
              " and pool_size=", pool_size);
  // Each side first: their product could overflow.
  const bool sides_fit =
      pool_size[0] <= kMaxPoolWindowElements && pool_size[1] <= kMaxPoolWindowElements;
  TORCH_CHECK(sides_fit && pool_size[0] * pool_size[1] <= kMaxPoolWindowElements, "pool_size ",
              pool_size, " has ",
              sides_fit ? std::to_string(pool_size[0] * pool_size[1])
                        : "more than " + std::to_string(kMaxPoolWindowElements),
              " elements; at most ", kMaxPoolWindowElements,
              " are supported (the argmax is stored in one byte)");
  // max_pool2d's own limit (its sizes are int); pooled_size's arithmetic then cannot overflow.
  TORCH_CHECK(window_stride[0] <= std::numeric_limits<int32_t>::max() &&
                  window_stride[1] <= std::numeric_limits<int32_t>::max(),
              "pool_stride must be at most ", std::numeric_limits<int32_t>::max(), ", got ",
              window_stride);

  ConvPoolGeometry g{};
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.out_channels = weight.size(0);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  constexpr int64_t kMaxSize = std::numeric_limits<int64_t>::max();
  TORCH_CHECK(g.pad_h <= (kMaxSize - g.in_h) / 2 && g.pad_w <= (kMaxSize - g.in_w) / 2, "padding ",
              padding, " is too large: the padded input ", g.in_h, "x", g.in_w,
              " would have more than ", kMaxSize, " rows or columns");
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0, "weight must have a non-empty kernel, got shape ",
              shape_string(weight));
  TORCH_CHECK(g.kernel_h <= g.in_h + 2 * g.pad_h && g.kernel_w <= g.in_w + 2 * g.pad_w,
              "weight kernel ", g.kernel_h, "x", g.kernel_w, " is larger than the padded input ",
              g.in_h + 2 * g.pad_h, "x", g.in_w + 2 * g.pad_w, " (input ", g.in_h, "x", g.in_w,
              ", padding ", padding, ")");
  g.conv_h = (g.in_h + 2 * g.pad_h - g.kernel_h) / g.stride_h + 1;
  g.conv_w = (g.in_w + 2 * g.pad_w - g.kernel_w) / g.stride_w + 1;
  g.pool_h = pool_size[0];
  g.pool_w = pool_size[1];
  g.pool_stride_h = window_stride[0];
  g.pool_stride_w = window_stride[1];
  g.pool_pad_h = pool_padding[0];
  g.pool_pad_w = pool_padding[1];
  g.out_h = pooled_size(g.conv_h, g.pool_h, g.pool_stride_h, g.pool_pad_h, ceil_mode);
  g.out_w = pooled_size(g.conv_w, g.pool_w, g.pool_stride_w, g.pool_pad_w, ceil_mode);
  TORCH_CHECK(g.out_h > 0 && g.out_w > 0, "pool_size ", pool_size,
              " is larger than the convolution output ", g.conv_h, "x", g.conv_w, " (pool_padding ",
              pool_padding, "); the pooled output would be ", g.out_h, "x", g.out_w);
  return g;
}

// The layout native conv2d gives its output (and so ReLU and max_pool2d after it): channels
// last when either the input or the weight is channels last, except for float64 on CUDA, which
// cuDNN has no channels-last path for (native then returns contiguous outputs).
inline at::MemoryFormat conv_output_memory_format(const at::Tensor& input,
                                                  const at::Tensor& weight) {
  if (input.is_cuda() && input.scalar_type() == at::kDouble) return at::MemoryFormat::Contiguous;
  const bool channels_last = input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                             weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The layout native's conv2d -> ReLU [-> batch norm] -> max_pool2d gives the pooled output: the
// convolution's, except where the convolution output is 1x1. ReLU and batch norm then return
// a contiguous tensor whatever the convolution's strides (no order can be read from size-1
// dimensions), and max_pool2d keeps it: visible where a padded pool makes the output larger.
inline at::MemoryFormat pooled_output_memory_format(const at::Tensor& input,
                                                    const at::Tensor& weight,
                                                    const ConvPoolGeometry& g) {
  if (g.conv_h == 1 && g.conv_w == 1) return at::MemoryFormat::Contiguous;
  return conv_output_memory_format(input, weight);
}

// Checks the backward's extra arguments against the forward geometry.
inline void check_conv2d_relu_max_pool2d_backward_args(const at::Tensor& grad_output,
                                                       const at::Tensor& argmax,
                                                       const at::Tensor& input,
                                                       const ConvPoolGeometry& g) {
  const std::array<int64_t, 4> expected_sizes{g.batch, g.out_channels, g.out_h, g.out_w};
  const at::IntArrayRef expected(expected_sizes);
  TORCH_CHECK(grad_output.sizes() == expected, "grad_output must have shape ", expected, ", got ",
              shape_string(grad_output));
  TORCH_CHECK(argmax.sizes() == expected, "argmax must have shape ", expected, ", got ",
              shape_string(argmax));
  TORCH_CHECK(argmax.scalar_type() == at::kByte, "argmax must be uint8, got ",
              argmax.scalar_type());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device() && argmax.device() == input.device(),
              "grad_output (", grad_output.device(), ") and argmax (", argmax.device(),
              ") must be on the input's device ", input.device());
}

}  // namespace cifarnet
