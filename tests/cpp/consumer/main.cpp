// Uses the installed cifarnet package: calls cifarnet::ops::conv2d_relu_max_pool2d and compares
// it with at::max_pool2d(at::relu(at::conv2d(...))). Exits non-zero on a mismatch.

#include <ATen/ATen.h>
#include <cifarnet/ops.h>

#include <cstdio>

int main() {
  at::manual_seed(0);
  const at::Tensor input = at::randn({2, 3, 12, 12});
  const at::Tensor weight = at::randn({4, 3, 3, 3});
  const at::Tensor bias = at::randn({4});

  const at::Tensor output = cifarnet::ops::conv2d_relu_max_pool2d(
      input, weight, bias, /*stride=*/{1, 1}, /*padding=*/{1, 1}, /*pool_size=*/{2, 2},
      /*pool_stride=*/{}, /*ceil_mode=*/false);
  const at::Tensor native =
      at::max_pool2d(at::relu(at::conv2d(input, weight, bias, {1, 1}, {1, 1})), {2, 2});

  if (output.sizes() != native.sizes() || !at::allclose(output, native, 1e-4, 1e-4)) {
    std::fprintf(stderr, "FAIL cifarnet::ops::conv2d_relu_max_pool2d differs from native\n");
    return 1;
  }
  std::printf("ok   cifarnet::ops::conv2d_relu_max_pool2d matches native (%lld outputs)\n",
              static_cast<long long>(output.numel()));
  return 0;
}
