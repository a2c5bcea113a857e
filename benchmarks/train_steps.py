"""Time N training steps of the study's ConvNet with native and with fused ops.

    python benchmarks/train_steps.py --device cuda --steps 200 --json steps.json

Synthetic CIFAR-sized batches (28x28 crops, batch 128) and the study's optimiser, so only the
network's forward, backward and update are timed; the two models start from the same weights.
Prints the median step time of each and their ratio. `--channels-last` and `--precision
bfloat16` (autocast) give native its fastest configuration on CPUs with AMX.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

from cifarnet.models import ConvNet
from cifarnet.train import PRECISIONS


def time_steps(model: nn.Module, batches, device: torch.device, warmup: int, autocast_dtype=None) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    times = []
    for step, (images, labels) in enumerate(batches):
        begin = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            times.append((time.perf_counter() - begin) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--precision", choices=PRECISIONS, default="float32",
                        help="bfloat16: forward under torch.autocast, as cifarnet-train --precision")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, 28, 28, generator=generator).to(device),
         torch.randint(0, 10, (args.batch_size,), generator=generator).to(device))
        for _ in range(args.steps + args.warmup)
    ]
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    results = {}
    for ops in ("native", "fused"):
        torch.manual_seed(0)
        model = ConvNet(args.variant, ops).to(device).train()
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        times = time_steps(model, batches, device, args.warmup, PRECISIONS[args.precision])
        results[ops] = {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times)}
        print(f"{ops:>6}: median {results[ops]['median_ms']:.2f} ms/step over {len(times)} steps")
    results["speedup"] = results["native"]["median_ms"] / results["fused"]["median_ms"]
    print(f"fused speedup: {results['speedup']:.2f}x")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": vars(args), "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
