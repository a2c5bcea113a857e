// Calls the cifarnet ops through the dispatcher from C++ and compares them, and the gradients
// autograd takes through them (the C++ formulas, no Python), with the native compositions.

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "ops/ops.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tolerance) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tolerance, tolerance);
}

std::vector<at::Tensor> leaves_of(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> leaves;
  for (const at::Tensor& t : tensors) leaves.push_back(t.detach().clone().set_requires_grad(true));
  return leaves;
}

// Gradients of `ours` and `native` (computed from their own copies of the same leaves) for
// the same output gradient, one check per leaf.
void check_gradients(const at::Tensor& ours, const std::vector<at::Tensor>& our_leaves,
                     const at::Tensor& native, const std::vector<at::Tensor>& native_leaves,
                     const std::vector<std::string>& names, double tolerance,
                     const std::string& what) {
  const at::Tensor grad_output = at::randn_like(native);
  const auto our_grads = torch::autograd::grad({ours}, our_leaves, {grad_output});
  const auto native_grads = torch::autograd::grad({native}, native_leaves, {grad_output});
  for (size_t i = 0; i < names.size(); ++i) {
    check(close(our_grads[i], native_grads[i], tolerance),
          what + ": autograd " + names[i] + " matches native");
  }
}

struct Case {
  std::string name;
  int64_t batch, in_channels, out_channels, height, width, kernel;
  std::vector<int64_t> stride, padding, pool_size, pool_stride;
  bool ceil_mode, channels_last;
  at::ScalarType dtype;
  std::vector<int64_t> pool_padding = {0, 0};
};

void compare_with_native(const Case& c) {
  const auto options = at::TensorOptions().dtype(c.dtype);
  at::Tensor input = at::randn({c.batch, c.in_channels, c.height, c.width}, options);
  if (c.channels_last) input = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = at::randn({c.out_channels, c.in_channels, c.kernel, c.kernel}, options);
  const at::Tensor bias = at::randn({c.out_channels}, options);
  const std::vector<int64_t> native_pool_stride =
      c.pool_stride.empty() ? c.pool_size : c.pool_stride;

  auto [output, argmax] = cifarnet::ops::conv2d_relu_max_pool2d_with_argmax(
      input, weight, bias, c.stride, c.padding, c.pool_size, c.pool_stride, c.ceil_mode,
      c.pool_padding);
  const at::Tensor plain =
      cifarnet::ops::conv2d_relu_max_pool2d(input, weight, bias, c.stride, c.padding, c.pool_size,
                                            c.pool_stride, c.ceil_mode, c.pool_padding);

  const at::Tensor input_leaf = input.detach().clone().set_requires_grad(true);
  const at::Tensor weight_leaf = weight.detach().clone().set_requires_grad(true);
  const at::Tensor bias_leaf = bias.detach().clone().set_requires_grad(true);
  const at::Tensor native =
      at::max_pool2d(at::relu(at::conv2d(input_leaf, weight_leaf, bias_leaf, c.stride, c.padding)),
                     c.pool_size, native_pool_stride, c.pool_padding, {1, 1}, c.ceil_mode);
  const double tolerance = c.dtype == at::kDouble ? 1e-10 : 1e-4;
  // Absolute error on the output's scale: where Winograd runs (the study's conv2 on AVX2 CPUs)
  // its rounding follows a tile's magnitude (outputs here reach ~100), not each output's.
  const double scale = std::max(1.0, native.detach().abs().max().item<double>());
  check(output.sizes() == native.sizes() &&
            at::allclose(output, native.detach(), tolerance, tolerance * scale),
        c.name + ": forward matches native");
  check(at::equal(plain, output),
        c.name + ": conv2d_relu_max_pool2d equals the _with_argmax output");
  check(output.is_contiguous(c.channels_last ? at::MemoryFormat::ChannelsLast
                                             : at::MemoryFormat::Contiguous),
        c.name + ": output in the native memory format");
  check(argmax.scalar_type() == at::kByte, c.name + ": argmax is one byte per output");

  const at::Tensor grad_output = at::randn_like(native);
  const auto native_grads =
      torch::autograd::grad({native}, {input_leaf, weight_leaf, bias_leaf}, {grad_output});
  auto [grad_input, grad_weight, grad_bias] = cifarnet::ops::_conv2d_relu_max_pool2d_backward(
      grad_output, input, weight, argmax, c.stride, c.padding, c.pool_size, c.pool_stride,
      c.ceil_mode, c.pool_padding, {true, true, true});
  check(close(grad_input, native_grads[0], tolerance), c.name + ": grad_input matches native");
  check(close(grad_weight, native_grads[1], 10 * tolerance),
        c.name + ": grad_weight matches native");
  check(close(grad_bias, native_grads[2], 10 * tolerance), c.name + ": grad_bias matches native");

  const auto leaves = leaves_of({input, weight, bias});
  const auto native_leaves = leaves_of({input, weight, bias});
  const at::Tensor ours = cifarnet::ops::conv2d_relu_max_pool2d(
      leaves[0], leaves[1], leaves[2], c.stride, c.padding, c.pool_size, c.pool_stride, c.ceil_mode,
      c.pool_padding);
  const at::Tensor native_again =
      at::max_pool2d(at::relu(at::conv2d(native_leaves[0], native_leaves[1], native_leaves[2],
                                         c.stride, c.padding)),
                     c.pool_size, native_pool_stride, c.pool_padding, {1, 1}, c.ceil_mode);
  check_gradients(ours, leaves, native_again, native_leaves, {"grad_input", "grad_weight",
                  "grad_bias"}, 10 * tolerance, c.name);
}

// batch_norm in training mode, running statistics included, against ATen's batch norm.
void compare_batch_norm_with_native(bool channels_last) {
  const std::string name = channels_last ? "batch_norm, channels_last" : "batch_norm";
  at::Tensor input = at::randn({8, 5, 6, 7}) * 3 + 100;
  if (channels_last) input = input.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor weight = at::rand({5}) + 0.5, bias = at::randn({5});
  at::Tensor mean = at::zeros({5}), var = at::ones({5});
  at::Tensor native_mean = mean.clone(), native_var = var.clone();
  const at::Tensor ours =
      cifarnet::ops::batch_norm(input, mean, var, weight, bias, true, 0.1, 1e-5);
  const at::Tensor native =
      at::batch_norm(input, weight, bias, native_mean, native_var, true, 0.1, 1e-5, false);
  check(close(ours, native, 1e-3), name + ": output matches native");
  check(close(mean, native_mean, 1e-4) && close(var, native_var, 1e-4),
        name + ": running statistics match native");

  const auto leaves = leaves_of({input, weight, bias});
  const auto native_leaves = leaves_of({input, weight, bias});
  check_gradients(
      cifarnet::ops::batch_norm(leaves[0], std::nullopt, std::nullopt, leaves[1], leaves[2], true,
                                0.1, 1e-5),
      leaves,
      at::batch_norm(native_leaves[0], native_leaves[1], native_leaves[2], {}, {}, true, 0.1,
                     1e-5, false),
      native_leaves, {"grad_input", "grad_weight", "grad_bias"}, 1e-3, name);
}

// The fused conv -> batch norm -> ReLU -> max-pool op in training mode against the ATen ops.
void compare_conv_batch_norm_with_native() {
  const at::Tensor x = at::randn({4, 3, 12, 12}), w = at::randn({6, 3, 3, 3}) * 0.2;
  const at::Tensor bn_weight = at::rand({6}) + 0.5, bn_bias = at::randn({6});
  at::Tensor mean = at::zeros({6}), var = at::ones({6});
  at::Tensor native_mean = mean.clone(), native_var = var.clone();
  const at::Tensor fused = cifarnet::ops::conv2d_batch_norm_relu_max_pool2d(
      x, w, std::nullopt, mean, var, bn_weight, bn_bias, true, 0.1, 1e-5, {1, 1}, {1, 1}, {2, 2},
      {}, false);
  const at::Tensor conv = at::conv2d(x, w, {}, {1, 1}, {1, 1});
  const at::Tensor native =
      at::max_pool2d(at::relu(at::batch_norm(conv, bn_weight, bn_bias, native_mean, native_var,
                                             true, 0.1, 1e-5, false)),
                     {2, 2});
  check(close(fused, native, 1e-4), "conv2d_batch_norm_relu_max_pool2d: output matches native");
  check(close(var, native_var, 1e-4), "conv2d_batch_norm_relu_max_pool2d: running_var matches");

  // No convolution bias: an optional tensor left out between given ones.
  const auto leaves = leaves_of({x, w, bn_weight, bn_bias});
  const auto native_leaves = leaves_of({x, w, bn_weight, bn_bias});
  const at::Tensor ours = cifarnet::ops::conv2d_batch_norm_relu_max_pool2d(
      leaves[0], leaves[1], std::nullopt, std::nullopt, std::nullopt, leaves[2], leaves[3], true,
      0.1, 1e-5, {1, 1}, {1, 1}, {2, 2}, {}, false);
  const at::Tensor native_again = at::max_pool2d(
      at::relu(at::batch_norm(at::conv2d(native_leaves[0], native_leaves[1], {}, {1, 1}, {1, 1}),
                              native_leaves[2], native_leaves[3], {}, {}, true, 0.1, 1e-5,
                              false)),
      {2, 2});
  check_gradients(ours, leaves, native_again, native_leaves,
                  {"grad_input", "grad_weight", "grad_bn_weight", "grad_bn_bias"}, 1e-3,
                  "conv2d_batch_norm_relu_max_pool2d");
}

// The sparse backward with two threads against one: under ThreadSanitizer (tools/tsan.sh) a
// data race between its threads is reported. (It runs first, before any thread pool exists:
// that way thread creation alone orders its inputs before the backward, even in a TSan build
// without tests/cpp/tsan_openmp.cpp.)
void check_backward_with_two_threads() {
  at::set_num_threads(1);
  // Kernel rows of kW * C_in = 15 floats: each ends inside a 16-float vector, and the last row
  // of a sample (input gradient) or of a block of output channels (weight gradient) ends next
  // to memory that the other thread writes.
  const at::Tensor input = at::randn({8, 3, 16, 16});
  const at::Tensor weight = at::randn({32, 3, 5, 5});
  const auto [output, argmax] = cifarnet::ops::conv2d_relu_max_pool2d_with_argmax(
      input, weight, std::nullopt, {1, 1}, {2, 2}, {2, 2}, {}, false);
  const at::Tensor grad_output = at::randn_like(output);
  auto backward = [&] {
    return cifarnet::ops::_conv2d_relu_max_pool2d_backward(grad_output, input, weight, argmax,
                                                           {1, 1}, {2, 2}, {2, 2}, {}, false,
                                                           {0, 0}, {true, true, false});
  };
  const auto [grad_input_1, grad_weight_1, unused_1] = backward();
  at::set_num_threads(2);
  const auto [grad_input_2, grad_weight_2, unused_2] = backward();
  check(close(grad_input_2, grad_input_1, 1e-5) && close(grad_weight_2, grad_weight_1, 1e-4),
        "sparse backward: two threads give one thread's gradients");
}

// Dropout through the C++ API: kept elements are native's x * (1 / (1 - p)), the gradient
// autograd takes applies the same mask (even after the seed tensor changed in place), and two
// threads draw one thread's mask.
void check_dropout() {
  const double p = 0.3;
  const at::Tensor seed = at::tensor({int64_t{42}}, at::kLong);
  const at::Tensor input = (at::rand({64, 1000}) + 1).set_requires_grad(true);  // no zeros
  at::set_num_threads(1);
  const at::Tensor one_thread = cifarnet::ops::dropout(input.detach(), seed, p);
  at::set_num_threads(2);
  const at::Tensor output = cifarnet::ops::dropout(input, seed, p);
  check(at::equal(output, one_thread), "dropout: two threads draw one thread's mask");
  const at::Tensor kept = output != 0;
  const double fraction = kept.to(at::kDouble).mean().item<double>();
  check(std::abs(fraction - (1 - p)) < 0.01, "dropout: keeps 1 - p of the elements");
  const at::Tensor noise = kept.to(at::kFloat).div_(1 - p);
  check(at::equal(output, input.detach() * noise), "dropout: kept elements are native's x / (1 - p)");
  const at::Tensor grad_output = at::randn_like(output);
  const auto grads = torch::autograd::grad({output}, {input}, {grad_output});
  check(at::equal(grads[0], grad_output * noise), "dropout: autograd applies the forward's mask");

  // A caller that advances one seed tensor in place (for its next layer or step) before the
  // backward: the gradient still applies the forward's mask.
  const at::Tensor advancing = seed.clone();
  const at::Tensor advanced_output = cifarnet::ops::dropout(input, advancing, p);
  advancing.add_(1);
  check(!at::equal(cifarnet::ops::dropout(input.detach(), advancing, p), output.detach()),
        "dropout: the advanced seed draws another mask");
  const auto advanced_grads = torch::autograd::grad({advanced_output}, {input}, {grad_output});
  check(at::equal(advanced_grads[0], grad_output * noise),
        "dropout: autograd applies the forward's mask after the seed tensor was advanced");

  // Without a seed: the next mask of the input device's generator (at::manual_seed makes it
  // reproducible), and autograd applies the forward's mask after the generator moved on.
  at::manual_seed(7);
  const at::Tensor drawn = cifarnet::ops::dropout(input, std::nullopt, p);
  check(!at::equal(cifarnet::ops::dropout(input.detach(), std::nullopt, p), drawn.detach()),
        "dropout: the generator draws a new mask at each call");
  at::manual_seed(7);
  check(at::equal(cifarnet::ops::dropout(input.detach(), std::nullopt, p), drawn.detach()),
        "dropout: at::manual_seed gives the same mask again");
  const at::Tensor drawn_noise = (drawn != 0).to(at::kFloat).div_(1 - p);
  const auto drawn_grads = torch::autograd::grad({drawn}, {input}, {grad_output});
  check(at::equal(drawn_grads[0], grad_output * drawn_noise),
        "dropout: autograd applies the mask its forward drew");
}

}  // namespace

int main() {
  at::manual_seed(0);
  // First (see the function).
  check_backward_with_two_threads();
  const std::vector<Case> cases = {
      {"study layer 1", 16, 3, 32, 32, 32, 5, {1, 1}, {2, 2}, {2, 2}, {}, false, false, at::kFloat},
      {"study layer 2, channels_last",
       8,
       32,
       64,
       16,
       16,
       5,
       {1, 1},
       {2, 2},
       {2, 2},
       {},
       false,
       true,
       at::kFloat},
      {"ceil mode 7 -> 4", 4, 8, 16, 7, 7, 3, {1, 1}, {1, 1}, {2, 2}, {}, true, false, at::kFloat},
      {"float64, strides, overlapping pool",
       3,
       4,
       5,
       13,
       11,
       3,
       {2, 1},
       {1, 0},
       {3, 2},
       {2, 1},
       false,
       false,
       at::kDouble},
      // A ResNet stem: max pool 3x3, stride 2, padding 1, after a 7x7/2 convolution.
      {"resnet stem, padded pool",
       2,
       3,
       8,
       21,
       18,
       7,
       {2, 2},
       {3, 3},
       {3, 3},
       {2, 2},
       true,
       true,
       at::kFloat,
       {1, 1}},
  };
  for (const Case& c : cases) {
    compare_with_native(c);
  }

  compare_batch_norm_with_native(false);
  compare_batch_norm_with_native(true);
  compare_conv_batch_norm_with_native();
  check_dropout();

  bool threw = false;
  try {
    cifarnet::ops::conv2d_relu_max_pool2d(at::randn({3, 8, 8}), at::randn({4, 3, 3, 3}),
                                          std::nullopt, {1, 1}, {0, 0}, {2, 2}, {}, false);
  } catch (const c10::Error& error) {
    threw = std::string(error.what()).find("input must be a 4-D tensor") != std::string::npos;
  }
  check(threw, "a 3-D input is refused with a clear error");

  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
