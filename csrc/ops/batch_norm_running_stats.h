#pragma once
// The running-statistics update both batch norm ops' composites share (defined in
// batch_norm.cpp, where its op _batch_norm_update_running_stats is).

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

namespace cifarnet::ops {

// Blends a training batch's statistics (count values per channel) into running_mean and
// running_var in place, if they are given; both or neither must be.
void update_running_stats_if_given(const std::optional<at::Tensor>& running_mean,
                                   const std::optional<at::Tensor>& running_var,
                                   const at::Tensor& save_mean, const at::Tensor& save_var,
                                   double momentum, c10::SymInt count);

}  // namespace cifarnet::ops
