"""The most a fused batch norm -> add -> ReLU (the end of every ResNet block) could save of a
native training step: the chain at each block's shapes against its batch norm alone.

    python benchmarks/bn_add_relu_bound.py --model resnet50 --input-size 224 --batch-size 8 --threads 2

For each block of torchvision's ResNet (its last batch norm: a BasicBlock's bn2, a Bottleneck's
bn3), native ``relu_(bn(x) + identity)`` and native ``bn(x)`` alone are timed, forward and
forward+backward, channels-last float32, interleaved, at the shapes the model gives that batch
norm. A fused op still computes the batch norm, reads the identity and writes its gradient, so
it takes at least what the batch norm alone takes: the difference, summed over the blocks, bounds
its gain. The model's native training step (forward, backward, SGD) is timed in the same run
to put the bound in scale.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cifarnet._timing import Stopwatch, interleaved_medians, keep_freed_memory
from resnet_chains_profile import make_step  # (benchmarks/ is on sys.path when run as a script)


def block_batch_norms(model: nn.Module) -> list[nn.BatchNorm2d]:
    """Each residual block's last batch norm, the one its add follows."""
    blocks = [m for m in model.modules() if isinstance(m, (torchvision.models.resnet.BasicBlock, torchvision.models.resnet.Bottleneck))]
    return [block.bn3 if hasattr(block, "bn3") else block.bn2 for block in blocks]


def input_shapes(model: nn.Module, batch_norms: list[nn.BatchNorm2d], input: torch.Tensor) -> list[torch.Size]:
    """The shape each of ``batch_norms`` sees in one forward of ``model``."""
    shapes = {}

    def record(bn, args, output):
        shapes[bn] = args[0].shape  # returns None: the output stays

    handles = [bn.register_forward_hook(record) for bn in batch_norms]
    with torch.no_grad():
        model(input)
    for handle in handles:
        handle.remove()
    return [shapes[bn] for bn in batch_norms]


def chain_calls(shape: torch.Size) -> dict[str, object]:
    """Forward and forward+backward of the native chain and of its batch norm alone at ``shape``."""
    channels = shape[1]

    x, identity, grad = (torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_(i < 2) for i in range(3))
    weight, bias = torch.ones(channels, requires_grad=True), torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)

    def batch_norm():
        return F.batch_norm(x, running_mean, running_var, weight, bias, training=True)

    def chain():
        out = batch_norm()
        out += identity  # as torchvision's blocks: in place, then an in-place ReLU
        return F.relu_(out)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn()

        return run

    return {
        "chain forward": forward(chain),
        "batch norm forward": forward(batch_norm),
        "chain forward+backward": lambda: chain().backward(grad),
        "batch norm forward+backward": lambda: batch_norm().backward(grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    stopwatch = Stopwatch(torch.device("cpu"))
    model = getattr(torchvision.models, args.model)().to(memory_format=torch.channels_last)
    input = torch.randn(args.batch_size, 3, args.input_size, args.input_size).contiguous(memory_format=torch.channels_last)
    labels = torch.zeros(args.batch_size, dtype=torch.long)
    step_ms = interleaved_medians({"step": make_step(model, input, labels)}, stopwatch, warmup=2, repeats=max(3, args.repeats // 3))["step"]

    print(f"{args.model}, {args.input_size}x{args.input_size}, batch {args.batch_size}, float32 channels-last, {args.threads} thread(s), median of {args.repeats}")
    print("| batch norm input | blocks | chain fwd ms | BN fwd ms | chain fwd+bwd ms | BN fwd+bwd ms |")
    print("|---|---|---|---|---|---|")
    batch_norms = block_batch_norms(model)
    shapes = input_shapes(model, batch_norms, input)
    totals = dict.fromkeys(("chain forward", "batch norm forward", "chain forward+backward", "batch norm forward+backward"), 0.0)
    for shape in dict.fromkeys(shapes):
        blocks = shapes.count(shape)
        medians = interleaved_medians(chain_calls(shape), stopwatch, warmup=2, repeats=args.repeats)
        for name, ms in medians.items():
            totals[name] += blocks * ms
        print(f"| {'x'.join(map(str, shape))} | {blocks} | " + " | ".join(f"{ms:.2f}" for ms in medians.values()) + " |")
    print("| all blocks | " + str(len(shapes)) + " | " + " | ".join(f"{ms:.1f}" for ms in totals.values()) + " |")
    bound = totals["chain forward+backward"] - totals["batch norm forward+backward"]
    print(f"native training step {step_ms:.1f} ms; the add and ReLU around the batch norms: {bound:.1f} ms ({100 * bound / step_ms:.1f}% of the step) at most to gain")


if __name__ == "__main__":
    main()
