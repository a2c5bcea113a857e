"""Benchmarks of the fused ops against native PyTorch: the ``cifarnet-bench`` command.

For each layer of the study's ConvNet it times, in one interleaved run (so machine noise hits
every variant alike), native eager, ``torch.compile``d native and the fused op, forward and
forward+backward, and counts the bytes autograd saves for the backward. Ratios are what to
read; absolute times are context.

    cifarnet-bench --batch-size 128 --threads 2 --json bench.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

import cifarnet
from cifarnet import ops

IMPLEMENTATIONS = ("native", "compiled", "fused")


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One conv -> ReLU -> max-pool layer of the study (5x5 kernels, padding 2, 2x2 pools)."""

    name: str
    in_channels: int
    out_channels: int
    size: int
    input_requires_grad: bool  # False for the first layer: images need no gradient

    def describe(self, batch_size: int) -> str:
        return f"{self.in_channels}->{self.out_channels} @{self.size}x{self.size} (N={batch_size})"


STUDY_LAYERS = (
    LayerShape("conv1", 3, 32, 32, input_requires_grad=False),
    LayerShape("conv2", 32, 64, 16, input_requires_grad=True),
    LayerShape("conv3", 64, 64, 8, input_requires_grad=True),
)


def native_conv2d_relu_max_pool2d(input, weight, bias):
    return F.max_pool2d(F.relu(F.conv2d(input, weight, bias, 1, 2)), 2)


def fused_conv2d_relu_max_pool2d(input, weight, bias):
    return ops.conv2d_relu_max_pool2d(input, weight, bias, padding=2)


@dataclasses.dataclass
class LayerTensors:
    input: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    def leaves(self, requires_grad: bool, input_requires_grad: bool) -> tuple[torch.Tensor, ...]:
        """Fresh leaves (so gradients never accumulate across timed calls)."""
        return (
            self.input.detach().requires_grad_(requires_grad and input_requires_grad),
            self.weight.detach().requires_grad_(requires_grad),
            self.bias.detach().requires_grad_(requires_grad),
        )


def make_layer_tensors(layer: LayerShape, batch_size: int, dtype, device, memory_format) -> LayerTensors:
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(batch_size, layer.in_channels, layer.size, layer.size, generator=generator, dtype=dtype)
    weight = torch.randn(layer.out_channels, layer.in_channels, 5, 5, generator=generator, dtype=dtype)
    weight *= (2.0 / (layer.in_channels * 25)) ** 0.5  # He-scaled, as in a trained network
    bias = 0.1 * torch.randn(layer.out_channels, generator=generator, dtype=dtype)
    return LayerTensors(input.to(device).contiguous(memory_format=memory_format), weight.to(device), bias.to(device))


class Stopwatch:
    """Wall-clock milliseconds of a call; on CUDA, measured with events around the call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def interleaved_medians(calls: dict[str, Callable[[], object]], stopwatch: Stopwatch, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, timing them round-robin so drift hits all alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            samples[name].append(stopwatch(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for the backward of ``fn()``: distinct storages saved by any node."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def make_block(implementation: str) -> Callable:
    """The conv -> ReLU -> max-pool block of one implementation: native, compiled or fused."""
    if implementation == "native":
        return native_conv2d_relu_max_pool2d
    if implementation == "fused":
        return fused_conv2d_relu_max_pool2d
    if implementation == "compiled":
        # dynamic=False: a user's fixed-shape training loop gets static-shape graphs.
        return torch.compile(native_conv2d_relu_max_pool2d, dynamic=False)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def make_call(block: Callable, tensors: LayerTensors, layer: LayerShape, mode: str) -> Callable[[], object]:
    """A zero-argument call of ``block``: its forward, or forward then backward.

    The forward runs on tensors that need no gradient (inference); forward+backward on fresh
    leaves that do (weights, bias, and the input except for the first layer), with a fixed
    output gradient.
    """
    if mode == "forward":
        leaves = tensors.leaves(False, False)
        return lambda: block(*leaves)
    if mode == "forward_backward":
        grad_output = torch.randn_like(native_conv2d_relu_max_pool2d(*tensors.leaves(False, False)))

        def forward_backward():
            block(*tensors.leaves(True, layer.input_requires_grad)).backward(grad_output)

        return forward_backward
    raise ValueError(f"mode must be 'forward' or 'forward_backward', got {mode!r}")


def benchmark_layer(
    layer: LayerShape,
    batch_size: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_format: torch.memory_format,
    implementations: Sequence[str],
    warmup: int,
    repeats: int,
) -> dict:
    """Times one layer's forward and forward+backward for each implementation."""
    tensors = make_layer_tensors(layer, batch_size, dtype, device, memory_format)
    blocks = {name: make_block(name) for name in implementations}
    stopwatch = Stopwatch(device)
    times = {
        mode: interleaved_medians(
            {name: make_call(blocks[name], tensors, layer, mode) for name in implementations},
            stopwatch,
            warmup,
            repeats,
        )
        for mode in ("forward", "forward_backward")
    }
    saved = {
        name: saved_tensor_bytes(lambda block=blocks[name]: block(*tensors.leaves(True, layer.input_requires_grad)))
        for name in ("native", "fused")
    }
    return {
        "layer": layer.name,
        "shape": layer.describe(batch_size),
        "forward_ms": times["forward"],
        "forward_backward_ms": times["forward_backward"],
        "saved_bytes": saved,
    }


def stack_saved_bytes(batch_size: int, dtype, device, memory_format) -> dict[str, int]:
    """Saved-for-backward bytes of the whole three-layer stack, native and fused."""
    layers = [make_layer_tensors(layer, batch_size, dtype, device, memory_format) for layer in STUDY_LAYERS]

    def stack(block):
        def run():
            x = layers[0].input
            for tensors in layers:
                x = block(x, tensors.weight.detach().requires_grad_(), tensors.bias.detach().requires_grad_())
            return x

        return run

    return {
        "native": saved_tensor_bytes(stack(native_conv2d_relu_max_pool2d)),
        "fused": saved_tensor_bytes(stack(fused_conv2d_relu_max_pool2d)),
    }


def summarise(rows: list[dict], implementations: Sequence[str]) -> dict:
    """Totals over the layers and the ratios (native time / other time: > 1 means faster)."""
    total = {
        key: {name: sum(row[key][name] for row in rows) for name in implementations}
        for key in ("forward_ms", "forward_backward_ms")
    }
    total["saved_bytes"] = {name: sum(row["saved_bytes"][name] for row in rows) for name in ("native", "fused")}
    for entry in rows + [total]:
        entry["speedup"] = {
            key: {name: entry[key]["native"] / entry[key][name] for name in implementations if name != "native"}
            for key in ("forward_ms", "forward_backward_ms")
        }
        if "compiled" in implementations:
            for key in ("forward_ms", "forward_backward_ms"):
                entry["speedup"][key]["fused_vs_compiled"] = entry[key]["compiled"] / entry[key]["fused"]
        entry["saved_ratio"] = entry["saved_bytes"]["fused"] / entry["saved_bytes"]["native"]
    return total


def format_table(rows: list[dict], total: dict, stack_saved: dict, implementations: Sequence[str]) -> str:
    """A Markdown table: times in ms, speedups (x, > 1 is faster than native), saved MiB."""
    compiled = "compiled" in implementations
    header = ["layer", "shape"]
    for mode in ("fwd", "fwd+bwd"):
        header += [f"{mode} native", *([f"{mode} compiled"] if compiled else []), f"{mode} fused", f"{mode} speedup"]
        if compiled:
            header.append(f"{mode} vs compiled")
    header += ["saved native MiB", "saved fused MiB", "saved ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(entry, name, shape):
        out = [name, shape]
        for key in ("forward_ms", "forward_backward_ms"):
            out += [f"{entry[key]['native']:.1f}"]
            if compiled:
                out += [f"{entry[key]['compiled']:.1f}"]
            out += [f"{entry[key]['fused']:.1f}", f"{entry['speedup'][key]['fused']:.2f}x"]
            if compiled:
                out += [f"{entry['speedup'][key]['fused_vs_compiled']:.2f}x"]
        out += [f"{entry['saved_bytes'][k] / 2**20:.1f}" for k in ("native", "fused")]
        out += [f"{entry['saved_ratio']:.3f}"]
        return out

    for row in rows:
        lines.append("| " + " | ".join(cells(row, row["layer"], row["shape"])) + " |")
    lines.append("| " + " | ".join(cells(total, "**total**", "three layers")) + " |")
    stack_ratio = stack_saved["fused"] / stack_saved["native"]
    lines.append("")
    lines.append(
        f"Saved for backward by the three-layer stack: native {stack_saved['native'] / 2**20:.1f} MiB, "
        f"fused {stack_saved['fused'] / 2**20:.1f} MiB ({stack_ratio:.3f}x)."
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cifarnet-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd native variant")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cifarnet-bench: --device cuda asked for, but no GPU is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    implementations = [name for name in IMPLEMENTATIONS if not (name == "compiled" and args.no_compile)]

    rows = []
    for layer in tqdm(STUDY_LAYERS, desc="layers", leave=False):
        rows.append(
            benchmark_layer(layer, args.batch_size, dtype, device, memory_format, implementations, args.warmup, args.repeats)
        )
    total = summarise(rows, implementations)
    stack_saved = stack_saved_bytes(args.batch_size, dtype, device, memory_format)

    print(
        f"conv2d -> ReLU -> max_pool2d, {args.dtype}, {args.memory_format}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s), device {device}; median of {args.repeats} interleaved runs"
    )
    print(format_table(rows, total, stack_saved, implementations))
    if args.json:
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cifarnet": cifarnet.__version__,
            "build": {k: v for k, v in cifarnet.build_info().items() if k != "parallel"},
            "config": vars(args) | {"threads": torch.get_num_threads()},
            "layers": rows,
            "total": total,
            "stack_saved_bytes": stack_saved,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
