"""batch_norm_relu_conv2d with its 3x3 convolution as Winograd F(4x4, 3x3) against the same op
with oneDNN's, at ResNet's 3x3 layers: which layers the Winograd rule takes, and what each
gains or would lose.

    python benchmarks/winograd_layers.py --threads 2 [--batch-size 8] [--input-size 224] [--dtype bfloat16] [--l2-bytes N]

For each of ResNet's four stages (64, 128, 256, 512 channels at 1/4, 1/8, 1/16, 1/32 of the
input's side) the op's forward+backward, channels-last, medians of interleaved runs with
CIFARNET_CONV_ALGORITHM=native and =winograd (Winograd wherever its rule takes the layer, on
any CPU with AVX2, AVX-512 ones included), and whether the default (auto) takes it there.
Where the rule refuses a layer both columns are oneDNN's. ``--l2-bytes`` pretends one core's
L2 has that size, which moves the rule's cache bound and the blocks' size: how the layers it
refuses for their channel count would fare.
"""

from __future__ import annotations

import argparse
import os

import torch

from cifarnet import _C, ops
from cifarnet._timing import Stopwatch, interleaved_medians

STAGES = [(64, 4), (128, 8), (256, 16), (512, 32)]  # channels, input side / stage side


def with_algorithm(name: str, step):
    def run():
        os.environ["CIFARNET_CONV_ALGORITHM"] = name
        step()

    return run


def time_stage(channels: int, side: int, batch: int, dtype: torch.dtype, stopwatch, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cl = torch.channels_last
    input = torch.randn(batch, channels, side, side).to(dtype).contiguous(memory_format=cl).requires_grad_()
    bn_weight, bn_bias = (torch.rand(channels) + 0.5).requires_grad_(), torch.randn(channels).requires_grad_()
    weight = (torch.randn(channels, channels, 3, 3) / (3 * channels**0.5)).to(dtype).contiguous(memory_format=cl).requires_grad_()
    grad = torch.randn(batch, channels, side, side).to(dtype).contiguous(memory_format=cl)
    leaves = [input, bn_weight, bn_bias, weight]

    def step():
        output = ops.batch_norm_relu_conv2d(input, None, None, bn_weight, bn_bias, weight, None, True, 0.1, 1e-5, 1, 1)
        torch.autograd.grad(output, leaves, grad)

    os.environ["CIFARNET_CONV_ALGORITHM"] = "auto"
    default = _C._winograd_applies(channels, channels, side, side, [3, 3], [1, 1], [1, 1])
    medians = interleaved_medians(
        {name: with_algorithm(name, step) for name in ("native", "winograd")}, stopwatch, warmup, repeats
    )
    return dict(default=default, **medians)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--l2-bytes", type=int, default=None, help="pretend one core's L2 has this size")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.l2_bytes:
        machine = _C._cache_sizes()
        _C._set_cache_sizes(l1d_bytes=machine["l1d_bytes"], l2_bytes=args.l2_bytes, llc_bytes=machine["llc_bytes"])
    dtype = getattr(torch, args.dtype)
    stopwatch = Stopwatch(torch.device("cpu"))
    l2 = _C._cache_sizes()["l2_bytes"]
    print(f"batch_norm_relu_conv2d fwd+bwd, 3x3, batch {args.batch_size}, {args.dtype} channels-last, "
          f"{torch.get_num_threads()} thread(s), L2 {l2 >> 10} KiB{' (pretended)' if args.l2_bytes else ''}; "
          f"ms, medians of {args.repeats}")
    print("| channels | side | auto takes Winograd | oneDNN | Winograd | Winograd speedup |")
    print("|---|---|---|---|---|---|")
    for channels, divisor in STAGES:
        side = max(1, args.input_size // divisor)
        t = time_stage(channels, side, args.batch_size, dtype, stopwatch, args.warmup, args.repeats)
        print(f"| {channels} | {side} | {'yes' if t['default'] else 'no'} | {t['native']:.2f} | {t['winograd']:.2f} | "
              f"{t['native'] / t['winograd']:.2f}x |", flush=True)
    os.environ.pop("CIFARNET_CONV_ALGORITHM", None)


if __name__ == "__main__":
    main()
