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
  winograd fwd / bwd        the same with the convolutions as Winograd F(2x2, 5x5) where the
                            op uses it (conv2 and conv3 on the AVX2 class; "-" elsewhere)
Everything but the last two runs with CIFARNET_CONV_ALGORITHM=native (oneDNN's convolutions).
Medians of --repeats calls, all of a layer's calls taking turns (each round starting one call
later), so the machine's drift falls on all alike; its noise shows in the spread between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

import cifarnet
from cifarnet import _C
from cifarnet._timing import Stopwatch, interleaved_medians

LAYERS = [(3, 32, 28), (32, 64, 14), (64, 64, 7)]  # (in channels, out channels, input side) of the `full` ConvNet on 28x28 crops


@contextlib.contextmanager
def conv_algorithm(name: str):
    """CIFARNET_CONV_ALGORITHM=name inside the block (the ops read it at each call)."""
    previous = os.environ.get("CIFARNET_CONV_ALGORITHM")
    os.environ["CIFARNET_CONV_ALGORITHM"] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ["CIFARNET_CONV_ALGORITHM"]
        else:
            os.environ["CIFARNET_CONV_ALGORITHM"] = previous


def with_algorithm(name: str, fn):
    """``fn`` run with CIFARNET_CONV_ALGORITHM=name."""

    def call():
        with conv_algorithm(name):
            return fn()

    return call


def time_layer(index: int, batch: int, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    """Median ms of each phase (as the module docstring lists), every call timed round-robin
    with the others (interleaved_medians), so the machine's drift falls on all alike."""
    ops = torch.ops.cifarnet
    cin, cout, side = LAYERS[index]
    cl = torch.channels_last
    x = torch.randn(batch, cin, side, side, dtype=dtype).to(memory_format=cl)
    w = torch.randn(cout, cin, 5, 5, dtype=dtype).to(memory_format=cl)
    b, gamma, beta = torch.randn(cout, dtype=dtype), torch.ones(cout, dtype=dtype), torch.zeros(cout, dtype=dtype)
    geometry = ([1, 1], [2, 2], [2, 2], [2, 2], index == 2, [0, 0])  # stride, padding, pool, pool stride, ceil (pool3), pool padding
    with conv_algorithm("native"):
        out, argmax, conv, mean, var = ops._conv2d_batch_norm_relu_max_pool2d_training(x, w, b, gamma, beta, 1e-5, *geometry)
        grad = torch.randn_like(out)
        sum_g, sum_gx = ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad, x, w, conv, mean, argmax, *geometry)
    count = batch * side * side
    grad_conv = torch.randn_like(conv)
    mask = [index > 0, True, True]  # conv1's input (the image) needs no gradient
    fused_forward = lambda: ops._conv2d_batch_norm_relu_max_pool2d_training(x, w, b, gamma, beta, 1e-5, *geometry)  # noqa: E731
    fused_backward = lambda: ops._conv2d_batch_norm_relu_max_pool2d_training_backward(  # noqa: E731
        grad, x, w, conv, mean, var, gamma, argmax, 1e-5, *geometry, mask + [True, True]
    )
    calls = {
        "conv fwd": lambda: F.conv2d(x, w, b, padding=2),
        "stats": lambda: ops._conv2d_batch_norm_relu_max_pool2d_stats(x, w, b, *geometry),
        "epilogue": lambda: ops._conv2d_batch_norm_relu_max_pool2d_epilogue(x, w, conv, mean, var, gamma, beta, 1e-5, *geometry),
        "fused fwd": fused_forward,
        "reduce": lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad, x, w, conv, mean, argmax, *geometry),
        "elementwise": lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
            grad, x, w, conv, mean, var, gamma, argmax, sum_g, sum_gx, count, 1e-5, *geometry, [False, False, False]
        ),
        "conv bwd": lambda: torch.ops.aten.convolution_backward(grad_conv, x, w, [cout], [1, 1], [2, 2], [1, 1], False, [0, 0], 1, mask),
        "fused bwd": fused_backward,
    }
    calls = {name: with_algorithm("native", fn) for name, fn in calls.items()}
    if dtype == torch.float32 and _C._winograd_applies(cin, cout, side, side, [5, 5], [1, 1], [2, 2]):
        chosen = os.environ.get("CIFARNET_CONV_ALGORITHM") or "auto"  # =winograd runs it on AVX-512 CPUs too
        calls["winograd fwd"] = with_algorithm(chosen, fused_forward)
        calls["winograd bwd"] = with_algorithm(chosen, fused_backward)
    t = interleaved_medians(calls, Stopwatch(torch.device("cpu")), warmup=3, repeats=repeats)
    t["stats"] -= t["conv fwd"]  # the statistics phase minus the convolution it also runs
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
        if "winograd fwd" in t:
            print(
                f"       Winograd vs oneDNN, whole fused op: forward {t['fused fwd'] / t['winograd fwd']:.2f}x, "
                f"backward {t['fused bwd'] / t['winograd bwd']:.2f}x"
            )


if __name__ == "__main__":
    main()
