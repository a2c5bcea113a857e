"""Time each phase of the fused conv→BN→ReLU→pool op on the study's three layers, beside the
native convolution alone: where the fused op's time goes, beyond what oneDNN's convolutions
take.

    python benchmarks/conv_bn_phases.py --threads 2 [--dtype bfloat16]

Phases (the private phase ops synchronized batch norm calls, each a whole op):
  conv fwd / conv bwd       native channels-last convolution forward / its backward (the floor)
  stats                     the statistics phase minus the convolution it also runs
  epilogue                  normalise, ReLU, pool and argmax over the saved convolution output
  reduce                    the backward's two per-channel sums over the argmax hits
  elementwise               the convolution output's gradient (no convolution backward)
  fused fwd / fused bwd     the whole fused forward / backward op
Medians of --repeats calls; the machine's noise shows in the spread between runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import cifarnet

LAYERS = [(3, 32, 28), (32, 64, 14), (64, 64, 7)]  # (in channels, out channels, input side) of the `full` ConvNet on 28x28 crops


def median_ms(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def time_layer(index: int, batch: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    ops = torch.ops.cifarnet
    cin, cout, side = LAYERS[index]
    cl = torch.channels_last
    x = torch.randn(batch, cin, side, side, dtype=dtype).to(memory_format=cl)
    w = torch.randn(cout, cin, 5, 5, dtype=dtype).to(memory_format=cl)
    b, gamma, beta = torch.randn(cout, dtype=dtype), torch.ones(cout, dtype=dtype), torch.zeros(cout, dtype=dtype)
    geometry = ([1, 1], [2, 2], [2, 2], [2, 2], index == 2)  # stride, padding, pool, pool stride, ceil (pool3)
    out, argmax, conv, mean, var = ops._conv2d_batch_norm_relu_max_pool2d_training(x, w, b, gamma, beta, 1e-5, *geometry)
    grad = torch.randn_like(out)
    sum_g, sum_gx = ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad, x, w, conv, mean, argmax, *geometry)
    count = batch * side * side
    grad_conv = torch.randn_like(conv)
    mask = [index > 0, True, True]  # conv1's input (the image) needs no gradient
    t = {"conv fwd": median_ms(lambda: F.conv2d(x, w, b, padding=2), repeats)}
    t["stats"] = median_ms(lambda: ops._conv2d_batch_norm_relu_max_pool2d_stats(x, w, b, *geometry), repeats) - t["conv fwd"]
    t["epilogue"] = median_ms(
        lambda: ops._conv2d_batch_norm_relu_max_pool2d_epilogue(x, w, conv, mean, var, gamma, beta, 1e-5, *geometry), repeats
    )
    t["fused fwd"] = median_ms(lambda: ops._conv2d_batch_norm_relu_max_pool2d_training(x, w, b, gamma, beta, 1e-5, *geometry), repeats)
    t["reduce"] = median_ms(
        lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad, x, w, conv, mean, argmax, *geometry), repeats
    )
    t["elementwise"] = median_ms(
        lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
            grad, x, w, conv, mean, var, gamma, argmax, sum_g, sum_gx, count, 1e-5, *geometry, [False, False, False]
        ),
        repeats,
    )
    t["conv bwd"] = median_ms(
        lambda: torch.ops.aten.convolution_backward(grad_conv, x, w, [cout], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, mask),
        repeats,
    )
    t["fused bwd"] = median_ms(
        lambda: ops._conv2d_batch_norm_relu_max_pool2d_training_backward(
            grad, x, w, conv, mean, var, gamma, argmax, 1e-5, *geometry, mask + [True, True]
        ),
        repeats,
    )
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = cifarnet.build_info()["cpu"]
    print(f"CPU: {cpu['model']} ({', '.join(cpu['isa'])}), {torch.get_num_threads()} threads, batch {args.batch_size}, {args.dtype}; ms")
    for index in range(len(LAYERS)):
        t = time_layer(index, args.batch_size, getattr(torch, args.dtype), args.repeats)
        print(f"conv{index + 1}  " + "  ".join(f"{name} {ms:.2f}" for name, ms in t.items()))


if __name__ == "__main__":
    main()
