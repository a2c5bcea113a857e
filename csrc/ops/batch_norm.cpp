// Batch norm: its schemas (the public op, its private forward, backward and running-statistics
// ops, and its synchronized-batch-norm phases), the C++ entry point that calls it through the
// dispatcher, and its composite kernels. Device kernels: cpu/ and cuda/batch_norm_kernel;
// autograd: autograd/batch_norm.cpp.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "batch_norm_common.h"
#include "batch_norm_running_stats.h"
#include "internal_op.h"
#include "ops.h"

namespace cifarnet::ops {

at::Tensor batch_norm(const at::Tensor& input, const std::optional<at::Tensor>& running_mean,
                      const std::optional<at::Tensor>& running_var,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, bool training, double momentum,
                      double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cifarnet::batch_norm", "")
                       .typed<decltype(batch_norm)>();
  return op.call(input, running_mean, running_var, weight, bias, training, momentum, eps);
}

namespace {

// The running statistics after a training batch: momentum-weighted averages with the batch
// mean and the unbiased batch variance (count elements per channel), updated in place.
void batch_norm_update_running_stats(at::Tensor& running_mean, at::Tensor& running_var,
                                     const at::Tensor& save_mean, const at::Tensor& save_var,
                                     double momentum, c10::SymInt symbolic_count) {
  const double unbiased = unbiased_variance_factor(symbolic_count.guard_int(__FILE__, __LINE__));
  at::NoGradGuard no_grad;
  running_mean.mul_(1 - momentum).add_(save_mean.to(running_mean.scalar_type()), momentum);
  running_var.mul_(1 - momentum).add_(save_var.to(running_var.scalar_type()), momentum * unbiased);
}

}  // namespace

void update_running_stats_if_given(const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var,
                                   const at::Tensor& save_mean, const at::Tensor& save_var,
                                   double momentum, c10::SymInt count) {
  TORCH_CHECK_VALUE(defined(running_mean) == defined(running_var),
                    "running_mean and running_var must both be given or both be None");
  if (!defined(running_mean)) return;
  static auto op =
      internal_op<void(at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                       c10::SymInt)>("cifarnet::_batch_norm_update_running_stats");
  at::Tensor mean = *running_mean, var = *running_var;
  op.call(mean, var, save_mean, save_var, momentum, count);
}

namespace {

// Training normalises with the batch statistics (and updates the running ones); evaluation
// with the running statistics.
at::Tensor batch_norm_composite(const at::Tensor& input,
                                const std::optional<at::Tensor>& running_mean,
                                const std::optional<at::Tensor>& running_var,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, bool training,
                                double momentum, double eps) {
  static auto forward = internal_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool, double, bool)>(
      "cifarnet::_batch_norm_forward");
  // F.batch_norm's checks in its order: the batch, eps, then the dtypes; then shapes and
  // devices here, where a tensor on another device would take the dispatch elsewhere (a meta
  // weight: to the fake kernel).
  check_batch_norm_input(input, training);
  check_batch_norm_eps(eps, training);
  check_batch_norm_parameter_dtypes(input, {{"running_mean", running_mean},
                                            {"running_var", running_var},
                                            {"weight", weight},
                                            {"bias", bias}});
  check_running_stats_need_no_grad(running_mean, running_var);
  check_per_channel(running_mean, "running_mean", input);
  check_per_channel(running_var, "running_var", input);
  check_per_channel(weight, "weight", input);
  check_per_channel(bias, "bias", input);
  if (!training) {
    return std::get<0>(
        forward.call(input, running_mean, running_var, weight, bias, false, eps, /*relu=*/false));
  }
  auto [output, save_mean, save_var] =
      forward.call(input, std::nullopt, std::nullopt, weight, bias, true, eps, /*relu=*/false);
  update_running_stats_if_given(running_mean, running_var, save_mean, save_var, momentum,
                                batch_norm_count(input));
  return output;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cifarnet, m) {
  m.def(
      "batch_norm(Tensor input, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? weight=None, Tensor? bias=None, bool training=False, float momentum=0.1, "
      "float eps=1e-05) -> Tensor");
  // relu: the output rectified, relu(batch_norm(input)), in the normalising pass itself (one
  // pass where batch norm and ReLU make two). relu_output: that rectified output, given to the
  // backward, whose grad_output is then the ReLU output's gradient: the backward takes it
  // through the ReLU (threshold_backward's rule) in its own passes, where a separate ReLU
  // backward would write the batch norm output's gradient and read it back twice.
  m.def(
      "_batch_norm_forward(Tensor input, Tensor? mean, Tensor? var, Tensor? weight, "
      "Tensor? bias, bool training, float eps, bool relu=False) -> (Tensor output, "
      "Tensor save_mean, Tensor save_var)");
  // grad_weight and grad_bias come back in the statistics dtype (save_mean's): the autograd
  // formula gives each its parameter's dtype, and the bias is no argument here.
  m.def(
      "_batch_norm_backward(Tensor grad_output, Tensor input, Tensor save_mean, "
      "Tensor save_var, Tensor? weight, bool training, float eps, bool[3] output_mask, "
      "Tensor? relu_output=None) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "_batch_norm_update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, "
      "Tensor save_mean, Tensor save_var, float momentum, SymInt count) -> ()");

  // The phases of batch norm, for synchronized batch norm (cifarnet/_sync_batch_norm.py
  // combines their per-process results over the process group between the calls): statistics
  // (mean and biased variance, in the statistics dtype) of this process's part of the batch;
  // the normalisation with the whole batch's statistics (that phase is _batch_norm_forward in
  // evaluation mode); the backward's two per-channel sums over this process's part; and the
  // gradients from the whole batch's sums and count.
  // NB: phase ops live with their op, as their kernels do (cpu/, cuda/).
  m.def("_batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def(
      "_batch_norm_backward_reduce(Tensor grad_output, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def(
      "_batch_norm_backward_elementwise(Tensor grad_output, Tensor input, Tensor mean, "
      "Tensor var, Tensor? weight, Tensor sum_dy, Tensor sum_dy_xmu, int count, float eps) "
      "-> Tensor grad_input");
}

TORCH_LIBRARY_IMPL(cifarnet, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm_composite);
}

// In-place updates of small per-channel tensors with ATen ops, for devices without a kernel of
// their own (the CPU has a loop, cpu/batch_norm_kernel.cpp).
TORCH_LIBRARY_IMPL(cifarnet, CompositeExplicitAutograd, m) {
  m.impl("_batch_norm_update_running_stats", &batch_norm_update_running_stats);
}

}  // namespace cifarnet::ops
