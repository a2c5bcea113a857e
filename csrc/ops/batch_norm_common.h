#pragma once
// Argument checks and shape facts of the batch norm ops, shared by the CPU and CUDA kernels
// (and by the fused conv -> batch norm -> ReLU -> max-pool op for its statistics).

#include <ATen/AccumulateType.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <initializer_list>
#include <optional>
#include <utility>

#include "conv_pool_geometry.h"

namespace cifarnet {

// The dtype statistics are computed and saved in: double on the CPU (every input dtype);
// the accumulation type on CUDA (float32 for float16, bfloat16 and float32).
inline at::ScalarType batch_norm_stats_dtype(const at::Tensor& input) {
  if (input.is_cpu()) return at::kDouble;
  return at::toAccumulateType(input.scalar_type(), input.device().type());
}

inline bool defined(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// The dtype a per-channel parameter's gradient takes (the autograd formulas give it; the
// backward ops return the statistics dtype): the parameter's own where it is given (a float32
// batch-norm weight or bias of bfloat16 data, as native allows), else the input's.
inline at::ScalarType parameter_grad_dtype(const std::optional<at::Tensor>& parameter,
                                           const at::Tensor& input) {
  return defined(parameter) ? parameter->scalar_type() : input.scalar_type();
}

// The memory format of a tensor dense in one: contiguous first, then channels-last (4-D) or
// channels-last-3d (5-D); nullopt for any other layout. Size-1 dimensions take any stride, so
// a tensor may be dense in two formats, and in a format that suggest_memory_format() does not
// name (a permuted (1, C, H, 1), say).
inline std::optional<at::MemoryFormat> dense_memory_format(const at::Tensor& t) {
  if (t.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (t.dim() == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return std::nullopt;
}

// The output layout of native (CPU) batch norm: the format its input is dense in, else the
// suggested one.
inline at::MemoryFormat batch_norm_output_memory_format(const at::Tensor& input) {
  return dense_memory_format(input).value_or(input.suggest_memory_format());
}

// The input gradient's layout of native (CPU) batch norm: the format the input is dense in
// where the gradient is dense too and both suggest the same format (native's fast path), else
// the input's suggested format.
inline at::MemoryFormat batch_norm_grad_input_memory_format(const at::Tensor& input,
                                                            const at::Tensor& grad_output) {
  const std::optional<at::MemoryFormat> format = dense_memory_format(input);
  if (format.has_value() && dense_memory_format(grad_output).has_value() &&
      input.suggest_memory_format() == grad_output.suggest_memory_format()) {
    return *format;
  }
  return input.suggest_memory_format();
}

// Whether a batch-norm input dense in `format` keeps its channels innermost: channels-last
// layouts, and (N, C) inputs.
inline bool batch_norm_channels_inner(const at::Tensor& input, at::MemoryFormat format) {
  return input.dim() == 2 || format == at::MemoryFormat::ChannelsLast ||
         format == at::MemoryFormat::ChannelsLast3d;
}

// These checks also run in the ops' composite (Python-free, traceable) entry points, where
// torch.compile may give tensors symbolic sizes: they use sym_* sizes throughout.

// Checks a per-channel tensor (running stats, affine weight or bias) as native batch norm does.
inline void check_per_channel(const std::optional<at::Tensor>& t, const char* name,
                              const at::Tensor& input) {
  if (!defined(t)) return;
  const c10::SymInt channels = input.sym_size(1);
  TORCH_SYM_CHECK(t->sym_numel().sym_eq(channels).sym_and(c10::SymBool(t->dim() == 1)), name,
                  " should contain ", channels, " elements (one per channel of the normalised ",
                  "tensor of shape ", shape_string(input), "), got shape ", shape_string(*t));
  TORCH_CHECK(t->device() == input.device(), name, " is on ", t->device(), " but input is on ",
              input.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), name, " must be a floating-point tensor, got ",
              t->scalar_type());
}

// Checks the output of the ReLU after a batch norm, which the backward takes its gradient
// through: the input's shape, dtype and device.
inline void check_relu_output(const std::optional<at::Tensor>& relu_output,
                              const at::Tensor& input) {
  if (!defined(relu_output)) return;
  TORCH_CHECK(relu_output->sizes() == input.sizes(), "relu_output must have the input's shape ",
              shape_string(input), ", got ", shape_string(*relu_output));
  TORCH_CHECK(relu_output->scalar_type() == input.scalar_type(), "relu_output dtype ",
              relu_output->scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(relu_output->device() == input.device(), "relu_output is on ",
              relu_output->device(), " but input is on ", input.device());
}

// Checks a per-output-channel tensor of the fused conv -> batch norm op against its weight.
inline void check_per_output_channel(const std::optional<at::Tensor>& t, const char* name,
                                     const at::Tensor& weight) {
  if (!defined(t)) return;
  TORCH_SYM_CHECK(t->sym_numel().sym_eq(weight.sym_size(0)).sym_and(t->dim() == 1), name,
                  " should contain ", weight.sym_size(0),
                  " elements (one per output channel of weight of shape ", shape_string(weight),
                  "), got shape ", shape_string(*t));
  TORCH_CHECK(t->device() == weight.device(), name, " is on ", t->device(), " but weight is on ",
              weight.device());
}

// Elements per channel of a batch-norm input (N, C, *spatial): N * prod(spatial).
inline c10::SymInt batch_norm_count(const at::Tensor& input) {
  const c10::SymInt channels = input.sym_size(1);
  return channels == 0 ? c10::SymInt(0) : input.sym_numel() / channels;
}

// The factor that turns the biased variance of a batch of `count` values per channel into the
// unbiased one the running variance takes.
inline double unbiased_variance_factor(int64_t count) {
  TORCH_CHECK(count > 1, "running statistics need more than 1 value per channel, got ", count);
  return static_cast<double>(count) / static_cast<double>(count - 1);
}

// A NotImplementedError, as native batch norm's dtype dispatch raises it.
inline void check_batch_norm_input_dtype(const at::Tensor& input) {
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
      "batch_norm: input must be float32, float64, float16 or bfloat16, got ", dtype);
}

inline void check_batch_norm_input(const at::Tensor& input, bool training) {
  TORCH_CHECK(input.dim() >= 2, "input must have at least 2 dimensions (N, C, ...), got ",
              input.dim(), "-D tensor of shape ", shape_string(input));
  check_batch_norm_input_dtype(input);
  // A ValueError, as torch.nn.functional.batch_norm raises it; symbolic sizes (torch.compile)
  // defer the check to run time, where it raises a RuntimeError.
  const c10::SymBool enough = c10::SymBool(!training).sym_or(batch_norm_count(input).sym_gt(1));
  if (const std::optional<bool> known = enough.maybe_as_bool()) {
    TORCH_CHECK_VALUE(*known, "Expected more than 1 value per channel when training, got input size ",
                      shape_string(input));
  } else {
    TORCH_SYM_CHECK(enough, "Expected more than 1 value per channel when training, got input size ",
                    shape_string(input));
  }
}

// F.batch_norm's check of eps, with its exception type, conditions and message in the torch the
// ops are built against: positive in training (a constant channel would divide by zero),
// non-negative in evaluation since pytorch/pytorch#175508 (in 2.14; merged after 2.11's branch,
// so taken as 2.12's, not checked on 2.12 or 2.13), positive there too in torch 2.10 and 2.11.
// NaN passes, as natively.
constexpr bool kEvaluationEpsMayBeZero =
    TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 12);

inline void check_batch_norm_eps(double eps, bool training) {
  if (!kEvaluationEpsMayBeZero) {
    TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive, but got ", eps);
  } else if (training) {
    TORCH_CHECK_VALUE(!(eps <= 0), "batch_norm eps must be positive during training, but got ",
                      eps);
  } else {
    TORCH_CHECK_VALUE(!(eps < 0), "batch_norm eps must be non-negative, but got ", eps);
  }
}

// Running statistics are buffers, updated in place under no_grad: native refuses them where
// they require grad (its schema marks them not differentiable), in either mode.
inline void check_running_stats_need_no_grad(const std::optional<at::Tensor>& running_mean,
                                             const std::optional<at::Tensor>& running_var) {
  for (const auto& [name, t] : {std::pair{"running_mean", &running_mean},
                                std::pair{"running_var", &running_var}}) {
    TORCH_CHECK(!defined(*t) || !(*t)->requires_grad(), name,
                " cannot have requires_grad=True: batch norm is not differentiable with respect to ",
                "its running statistics");
  }
}

// A per-channel tensor of batch norm, named for messages.
struct NamedChannelTensor {
  const char* name;
  const std::optional<at::Tensor>& tensor;
};

// Native batch norm's dtype rule: the running statistics, weight and bias have the input's
// dtype or, with bfloat16 or float16 input, are all float32 (as autocast leaves them).
// NB: the public ops check it, not the private forward, whose callers (synchronized batch norm)
// pass statistics in the statistics dtype.
inline void check_batch_norm_parameter_dtypes(const at::Tensor& input,
                                              std::initializer_list<NamedChannelTensor> tensors) {
  const bool reduced = input.scalar_type() == at::kHalf || input.scalar_type() == at::kBFloat16;
  const bool mixed = reduced && std::any_of(tensors.begin(), tensors.end(), [](const auto& t) {
                       return defined(t.tensor) && t.tensor->scalar_type() == at::kFloat;
                     });
  const at::ScalarType expected = mixed ? at::kFloat : input.scalar_type();
  for (const NamedChannelTensor& t : tensors) {
    if (!defined(t.tensor)) continue;
    TORCH_CHECK(t.tensor->scalar_type() == expected, t.name, " is ", t.tensor->scalar_type(),
                " where it must be ", expected, " for ", input.scalar_type(),
                " input: batch norm's running statistics, weight and bias take the input's dtype",
                reduced ? ", or are all float32" : "");
  }
}

// The batch norm forward's argument checks, shared by the CPU and CUDA kernels.
inline void check_batch_norm_forward_args(const at::Tensor& input,
                                          const std::optional<at::Tensor>& mean,
                                          const std::optional<at::Tensor>& var,
                                          const std::optional<at::Tensor>& weight,
                                          const std::optional<at::Tensor>& bias, bool training,
                                          double eps) {
  check_batch_norm_input(input, training);
  TORCH_CHECK(training || (defined(mean) && defined(var)),
              "running_mean and running_var must be defined in evaluation mode");
  check_per_channel(mean, "running_mean", input);
  check_per_channel(var, "running_var", input);
  check_per_channel(weight, "weight", input);
  check_per_channel(bias, "bias", input);
  check_batch_norm_eps(eps, training);
}

// The saved convolution output of the fused conv -> batch norm -> ReLU -> max-pool op against
// the forward geometry.
inline void check_conv_output(const at::Tensor& conv_output, const at::Tensor& input,
                              const ConvPoolGeometry& g) {
  const std::array<int64_t, 4> conv_sizes{g.batch, g.out_channels, g.conv_h, g.conv_w};
  TORCH_CHECK(conv_output.sizes() == at::IntArrayRef(conv_sizes), "conv_output must have shape ",
              at::IntArrayRef(conv_sizes), ", got ", shape_string(conv_output));
  TORCH_CHECK(conv_output.scalar_type() == input.scalar_type(), "conv_output dtype ",
              conv_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(conv_output.device() == input.device(), "conv_output is on ", conv_output.device(),
              " but input is on ", input.device());
}

// The argument checks of every backward op of the fused conv2d -> batch norm -> ReLU ->
// max_pool2d (the fused one and the phases), shared by the CPU and CUDA kernels; returns the
// geometry.
inline ConvPoolGeometry check_conv2d_batch_norm_relu_max_pool2d_pooled_grad_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& argmax, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g =
      check_conv2d_relu_max_pool2d_args(input, weight, std::nullopt, stride, padding, pool_size,
                                        pool_stride, ceil_mode, pool_padding);
  check_conv2d_relu_max_pool2d_backward_args(grad_output, argmax, input, g);
  check_conv_output(conv_output, input, g);
  return g;
}

// The fused training backward's (and the elementwise phase's) argument checks.
inline ConvPoolGeometry check_conv2d_batch_norm_relu_max_pool2d_backward_args(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    const at::Tensor& conv_output, const at::Tensor& save_mean, const at::Tensor& save_var,
    const std::optional<at::Tensor>& bn_weight, const at::Tensor& argmax, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g = check_conv2d_batch_norm_relu_max_pool2d_pooled_grad_args(
      grad_output, input, weight, conv_output, argmax, stride, padding, pool_size, pool_stride,
      ceil_mode, pool_padding);
  check_per_output_channel(save_mean, "save_mean", weight);
  check_per_output_channel(save_var, "save_var", weight);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  return g;
}

// The epilogue phase's argument checks: the geometry, the convolution output it normalises and
// the statistics (any floating dtype; read in the statistics dtype) it normalises with.
inline ConvPoolGeometry check_conv2d_batch_norm_relu_max_pool2d_epilogue_args(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& conv_output,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, double eps, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef pool_size, at::IntArrayRef pool_stride, bool ceil_mode,
    at::IntArrayRef pool_padding) {
  const ConvPoolGeometry g =
      check_conv2d_relu_max_pool2d_args(input, weight, std::nullopt, stride, padding, pool_size,
                                        pool_stride, ceil_mode, pool_padding);
  check_conv_output(conv_output, input, g);
  check_per_output_channel(mean, "mean", weight);
  check_per_output_channel(var, "var", weight);
  check_per_output_channel(bn_weight, "bn_weight", weight);
  check_per_output_channel(bn_bias, "bn_bias", weight);
  check_batch_norm_eps(eps, /*training=*/false);  // normalises with given statistics
  return g;
}

// A batch-norm backward's gradient: the input's shape, dtype and device.
inline void check_batch_norm_grad_output(const at::Tensor& grad_output, const at::Tensor& input) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "grad_output must have the input's shape ",
              shape_string(input), ", got ", shape_string(grad_output));
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "grad_output dtype ",
              grad_output.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "grad_output is on ", grad_output.device(),
              " but input is on ", input.device());
}

// The elementwise backward phases' reduced sums (on `device`, the input's) and the count they
// were reduced over: `count` values per channel in the whole (synchronized) batch, of which this
// process holds `local_count`.
inline void check_backward_sums(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                int64_t count, int64_t channels, int64_t local_count,
                                c10::Device device) {
  auto check_sum = [channels, device](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == channels, name, " must have shape [", channels,
                "] (one sum per channel), got ", shape_string(t));
    TORCH_CHECK(t.device() == device, name, " is on ", t.device(), " but input is on ", device);
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), name,
                " must be a floating-point tensor, got ", t.scalar_type());
  };
  check_sum(sum_dy, "sum_dy");
  check_sum(sum_dy_xmu, "sum_dy_xmu");
  TORCH_CHECK(count > 0 && count >= local_count,
              "count must be the number of values per channel in the whole batch, at least this "
              "process's ", local_count, " and positive, got ", count);
}

}  // namespace cifarnet
