"""Where does a diverging run blow up first? Per-step traces of one run's first epoch(s).

    python tools/divergence_trace.py --variant momentum --ops fused --seed 0 --data-dir ../shared/cifar10-jpeg

Sets a run up as `cifarnet-train` does (seed, model, optimiser, loaders) and trains it with the
trainer's own `epoch` function, recording for every step: the loss; each layer's output
(largest magnitude and root mean square); each parameter's gradient and weight norms, and the
norm of its momentum buffer, before the update. Writes `trace.jsonl` (one line per step) to
`--out` and prints which quantity left its early range first (more than `--factor` times its
median over the first `--reference` steps) and when; `--plot PATH` draws the trace.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cifarnet.study.data import load_cifar10, make_loaders
from cifarnet.study.models import ConvNet
from cifarnet.study.train import PRECISIONS, TrainConfig, epoch, make_optimizer
from cifarnet.study.variants import recipe


class StepTrace:
    """Hooks on a model and its optimiser that collect one record per training step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.records: list[dict] = []
        self.current: dict = {}
        self.names = {parameter: name for name, parameter in model.named_parameters()}
        self.optimizer = optimizer
        for name, module in model.named_modules():
            if name and not list(module.children()):
                module.register_forward_hook(self._activation_hook(name))
        optimizer.register_step_pre_hook(self._before_step)

    def _activation_hook(self, name: str):
        def hook(module, inputs, output):
            if module.training and isinstance(output, torch.Tensor):
                value = output.detach().float()
                self.current[f"out/{name}/max"] = value.abs().max().item()
                self.current[f"out/{name}/rms"] = value.square().mean().sqrt().item()

        return hook

    def _before_step(self, optimizer, args, kwargs) -> None:
        record = self.current
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                name = self.names[parameter]
                record[f"grad/{name}"] = parameter.grad.norm().item() if parameter.grad is not None else 0.0
                record[f"weight/{name}"] = parameter.detach().norm().item()
                buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
                record[f"momentum/{name}"] = buffer.norm().item() if buffer is not None else 0.0
        record["grad/total"] = math.sqrt(sum(v * v for k, v in record.items() if k.startswith("grad/")))
        self.records.append(record)
        self.current = {}


def first_departures(records: list[dict], reference: int, factor: float) -> list[tuple[int, str, float, float]]:
    """(step, quantity, value, early median) for each quantity's first step past factor x its
    early median, earliest first. Steps count from 1."""
    departures = []
    for key in records[0]:
        early = [r[key] for r in records[:reference] if key in r and math.isfinite(r[key])]
        median = statistics.median(early) if early else 0.0
        if median <= 0:
            continue
        for step, record in enumerate(records, 1):
            value = record.get(key, 0.0)
            if step > reference and (not math.isfinite(value) or value > factor * median):
                departures.append((step, key, value, median))
                break
    return sorted(departures)


def plot(records: list[dict], path: Path, title: str) -> None:
    """Gradient norms, layer outputs and weight norms per step, log scale, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(records) + 1)
    panels = [
        ("gradient norm", [k for k in records[0] if k.startswith("grad/") and k.endswith("weight")] + ["grad/total"]),
        ("layer output, largest magnitude", [k for k in records[0] if k.startswith("out/") and k.endswith("/max")]),
        ("weight norm", [k for k in records[0] if k.startswith("weight/") and k.endswith("weight")]),
        ("momentum buffer norm", [k for k in records[0] if k.startswith("momentum/") and k.endswith("weight")]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), sharex=True)
    for axis, (label, keys) in zip(axes, panels):
        early = []
        for key in keys:
            values = [r.get(key, float("nan")) for r in records]
            axis.plot(steps, values, label=key.split("/", 1)[1], linewidth=1)
            early += [v for v in values[: len(values) * 9 // 10] if math.isfinite(v) and v > 0]
        axis.set_yscale("log")
        if early:  # the last steps run to 1e19 and would flatten everything else
            axis.set_ylim(min(early) / 2, max(early) * 1e3)
        axis.set_title(label)
        axis.set_xlabel("step")
        axis.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="momentum")
    parser.add_argument("--ops", default="fused")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/trace/<variant>-<ops>-seed<seed>")
    parser.add_argument("--reference", type=int, default=50, help="early steps whose median is the yardstick")
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--plot", type=Path, default=None, help="draw the trace to this PNG")
    args = parser.parse_args()
    out = args.out or Path("runs/trace") / f"{args.variant}-{args.ops}-seed{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    # As cifarnet.study.train.train sets a run up, so the trace follows the same run.
    config = TrainConfig(variant=args.variant, ops=args.ops, seed=args.seed, epochs=args.epochs)
    data = load_cifar10(args.data_dir, progress=False)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = ConvNet(config.variant, config.ops)
    optimizer, scheduler = make_optimizer(model, config)
    train_loader, _ = make_loaders(data, recipe(config.variant), config.batch_size, generator)
    trace = StepTrace(model, optimizer)
    diverged = None
    for epoch_number in range(1, config.epochs + 1):
        try:
            epoch(train_loader, model, nn.CrossEntropyLoss(), optimizer, autocast_dtype=PRECISIONS[config.precision])
        except ArithmeticError as error:
            diverged = (epoch_number, error.batch, error.loss)
            break
        if scheduler is not None:
            scheduler.step()
    with open(out / "trace.jsonl", "w") as file:
        for record in trace.records:
            file.write(json.dumps(record) + "\n")
    steps = len(trace.records)
    print(f"{out}: {steps} steps traced; " + (f"loss {diverged[2]} at epoch {diverged[0]} batch {diverged[1]}" if diverged else "no divergence"))
    for step, key, value, median in first_departures(trace.records, args.reference, args.factor)[:15]:
        print(f"  step {step:5d}  {key:<28} {value:12.4g}  (early median {median:.4g}, x{value / median:.3g})")
    if args.plot:
        ending = f"non-finite loss at epoch {diverged[0]} batch {diverged[1]}" if diverged else "loss finite throughout"
        plot(trace.records, args.plot, f"{args.variant}, {args.ops} ops, seed {args.seed}: {ending}")


if __name__ == "__main__":
    main()
