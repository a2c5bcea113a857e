"""What each kind of chain `cifarnet.fuse` fuses adds to a ResNet's training step: native, the
same model traced by plain torch.fx (fuse's rewrite runs a GraphModule), `fuse(bn_relu_conv=False)`
(the stem's pool chain alone) and `fuse` (the blocks' batch norm -> ReLU -> conv too), timed
interleaved in one process (a shuffled order each round), forward+backward, channels-last
float32, with glibc's malloc keeping freed memory as cifarnet-bench does (`--default-malloc`
not). Plain torch.fx turns a block's `out += identity` into an out-of-place add, whose fresh
tensor costs page faults where malloc returns freed memory; fuse's tracer keeps it in place.

    python benchmarks/resnet_fuse_parts.py --model resnet18 --input-size 32 --batch-size 128 --threads 2
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torchvision

import cifarnet
from cifarnet._timing import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["resnet18", "resnet50"], default="resnet18")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per configuration, interleaved")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc returning freed memory")
    args = parser.parse_args()
    keeps = not args.default_malloc and keep_freed_memory()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    native = getattr(torchvision.models, args.model)(num_classes=10).to(memory_format=torch.channels_last)
    models = {
        "native": native,
        "native traced by torch.fx": torch.fx.symbolic_trace(native),
        "fuse(bn_relu_conv=False)": cifarnet.fuse(native, bn_relu_conv=False),
        "fuse": cifarnet.fuse(native),
    }
    input = torch.randn(args.batch_size, 3, args.input_size, args.input_size).to(memory_format=torch.channels_last)

    def step(model) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model(input).sum().backward()
        return time.perf_counter() - start

    for model in models.values():  # warm-up: oneDNN primitives, allocator
        step(model), step(model)
    times = {name: [] for name in models}
    # A fresh order each round: in a fixed order the third model ran measurably slower than
    # the same model second (whatever the previous step leaves in the allocator and caches).
    order, shuffler = list(models), random.Random(0)
    for _ in range(args.rounds):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(step(models[name]))
    baseline = statistics.median(times["native"])
    print(f"{args.model}, {args.input_size}x{args.input_size}, batch {args.batch_size}, float32 channels-last, "
          f"{args.threads} thread(s), median of {args.rounds} interleaved steps; malloc "
          f"{'keeps' if keeps else 'returns'} freed memory")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:28s} {median * 1e3:9.1f} ms  {baseline / median:.3f}x native")


if __name__ == "__main__":
    main()
