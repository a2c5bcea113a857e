"""Where a native ResNet training step spends its time and memory outside the convolutions: what
fusing the chains without a pool (conv→BN→ReLU, BN→add→ReLU) could buy at most.

    python benchmarks/resnet_chains_profile.py --model resnet50 --input-size 224 --batch-size 8 --threads 2

One training step (forward, backward, SGD with momentum), channels-last, under torch.profiler:
each top-level ATen op's time (with the ops it calls), grouped into convolution, batch norm, ReLU, add, pooling,
linear/loss and the rest (the optimiser, copies, allocation). A fusion of batch norm, ReLU and add
can remove at most their share; a fusion that leaves oneDNN's convolutions whole removes nothing
of theirs. Beside it, the step's median time in eager mode and under torch.compile (which fuses
batch norm, ReLU and add itself), and the bytes autograd saves for the backward, by producer:
the BN→ReLU outputs a convolution reads are what a BN→ReLU→conv op recomputing its input
would not keep.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
import torch.fx
import torch.fx.passes.shape_prop
import torchvision
from torch import nn

from cifarnet._timing import saved_tensor_bytes

GROUPS = {
    "convolution": ("convolution", "conv2d"),
    "batch norm": ("batch_norm",),
    "ReLU": ("relu", "threshold", "clamp_min"),
    "add": ("aten::add",),
    "pooling": ("pool",),
    "linear and loss": ("addmm", "aten::mm", "linear", "log_softmax", "nll_loss", "cross_entropy"),
    "optimiser": ("_foreach", "sgd"),
}


def group_of(name: str) -> str:
    for group, keys in GROUPS.items():
        if any(key in name for key in keys):
            return group
    return "other"


def make_step(model: nn.Module, input: torch.Tensor, labels: torch.Tensor, forward=None):
    forward = model if forward is None else forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        criterion(forward(input), labels).backward()
        optimizer.step()

    return step


def median_ms(step, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step()
        times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def is_op(name: str) -> bool:
    return name.startswith("aten::") or name.startswith("cifarnet::")


def op_shares(step, warmup: int) -> dict[str, float]:
    """CPU milliseconds of one step after `warmup` steps (oneDNN builds its kernels on the first
    calls), per group: each op called from outside another op counts whole (a convolution's
    backward with the weight reorders it does inside it)."""
    for _ in range(warmup):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    totals: dict[str, float] = defaultdict(float)
    for event in profiler.events():
        if is_op(event.name) and not (event.cpu_parent is not None and is_op(event.cpu_parent.name)):
            totals[group_of(event.name)] += event.cpu_time_total / 1e3
    return dict(totals)


def bn_relu_conv_bytes(model: nn.Module, input: torch.Tensor) -> int:
    """Bytes of the tensors a batch norm → ReLU pair hands only to convolutions (the
    bottlenecks' first two stages), from the model's torch.fx graph with its shapes: saved only
    as those convolutions' input, they are what a BN→ReLU→conv op recomputing them from the
    batch norm's input would not keep. (The ReLU after a residual add is not such a pair:
    recomputing it needs the block's input, itself such an output.)"""
    graph_module = torch.fx.symbolic_trace(model)
    torch.fx.passes.shape_prop.ShapeProp(graph_module).propagate(input)
    modules = dict(graph_module.named_modules())

    def is_module(node: torch.fx.Node, module_type: type) -> bool:
        return node.op == "call_module" and isinstance(modules[node.target], module_type)

    total = 0
    for node in graph_module.graph.nodes:
        if not (is_module(node, nn.ReLU) and is_module(node.args[0], nn.BatchNorm2d) and len(node.args[0].users) == 1):
            continue
        if all(is_module(user, nn.Conv2d) for user in node.users):
            meta = node.meta["tensor_meta"]
            total += meta.shape.numel() * meta.dtype.itemsize
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile step")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().to(memory_format=torch.channels_last).train()
    input = torch.randn(args.batch_size, 3, args.input_size, args.input_size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch_size,))
    eager = make_step(model, input, labels)

    shares = op_shares(eager, args.warmup)
    total = sum(shares.values())
    print(f"{args.model}, {args.input_size}x{args.input_size}, batch {args.batch_size}, float32 channels-last, "
          f"{torch.get_num_threads()} thread(s); one step's time in ATen ops by group:")
    print("| group | ms | share |\n|---|---|---|")
    for group, ms in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"| {group} | {ms:.1f} | {ms / total:.1%} |")

    times = {"eager": median_ms(eager, args.warmup, args.repeats)}
    if not args.no_compile:
        times["torch.compile"] = median_ms(make_step(model, input, labels, torch.compile(model)), args.warmup, args.repeats)
    print("step medians: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in times.items()))

    saved = saved_tensor_bytes(lambda: model(input))
    recomputable = bn_relu_conv_bytes(model, input)
    print(f"saved for backward: {saved / 2**20:.1f} MiB; of it BN→ReLU outputs a convolution reads: "
          f"{recomputable / 2**20:.1f} MiB ({recomputable / saved:.1%})")


if __name__ == "__main__":
    main()
