"""Benchmarks of the fused ops against native PyTorch: the ``cifarnet-bench`` command.

For each layer of the study's ConvNet it times, in one interleaved run (so machine noise hits
every implementation alike), the op's implementations, forward and forward+backward (batch norm
in training mode), and counts the bytes autograd saves for the backward. Ratios are what to
read; absolute times are context.

The implementations (``IMPLEMENTATIONS``; ``--help`` lists them): on the CPU, native eager,
``torch.compile``d native and the fused op; on CUDA also native compiled with
``mode="max-autotune-no-cudagraphs"``, and native and the fused op each captured in a CUDA graph
(the timed call is the graph's replay: no host work, no launch overhead). Each is compared with
native eager, and the fastest fused one with the fastest native one (``fused_vs_best_native``).

With ``--model`` it times a whole model instead, forward+backward in training mode, before and
after :func:`cifarnet.fuse` (and, for ``vgg11_bn``, its convolution stack ``features`` alone).

    cifarnet-bench --batch-size 128 --threads 2 --json bench.json
    cifarnet-bench --device cuda --dtype bfloat16 --memory-format channels_last --batch-size 1024
    cifarnet-bench --model vgg11_bn --batch-size 128 --threads 2
    cifarnet-bench --model resnet50 --batch-size 8 --memory-format channels_last --threads 2
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import cifarnet
from cifarnet import ops
from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe
from cifarnet._cpu import describe_cpu
from cifarnet._timing import (
    MEMORY_FORMATS,
    Stopwatch,
    interleaved_medians,
    keep_freed_memory,
    saved_tensor_bytes,
    under_autocast,
)
from cifarnet.benchmark_models import MODEL_INPUT_SIZES, benchmark_model, format_model_table
from cifarnet.study.fileio import output_file_problem

MODES = ("forward", "forward_backward")


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way of running an op that ``cifarnet-bench`` times."""

    fused: bool  # cifarnet's fused op; else the native composition
    description: str
    compiled: bool = False  # through torch.compile, in compile_mode
    compile_mode: str | None = None  # None: torch.compile's default mode
    graph: bool = False  # captured in a CUDA graph; the timed call is the graph's replay
    cuda_only: bool = False


IMPLEMENTATIONS = {
    "native": Implementation(False, "the native composition (F.conv2d, F.batch_norm, F.relu, F.max_pool2d), eager"),
    "compiled": Implementation(False, "torch.compile of the native composition, default mode", compiled=True),
    "compiled_autotune": Implementation(
        False, 'torch.compile(mode="max-autotune-no-cudagraphs") of the native composition', compiled=True,
        compile_mode="max-autotune-no-cudagraphs", cuda_only=True,
    ),
    "native_graph": Implementation(
        False, "the native composition captured in a CUDA graph, timed as the graph's replay", graph=True, cuda_only=True
    ),
    "fused": Implementation(True, "cifarnet's fused op, eager"),
    "fused_graph": Implementation(
        True, "cifarnet's fused op captured in a CUDA graph, timed as the graph's replay", graph=True, cuda_only=True
    ),
}
"""Every implementation ``cifarnet-bench`` can time, in the order of its table's columns. Graph
implementations capture a call after ``GRAPH_WARMUP`` calls on a side stream (see
:class:`CapturedCall`); forward+backward captures the fresh leaves, the forward and the
backward with a fixed output gradient."""

GRAPH_WARMUP = 3
"""Calls on a side stream before a CUDA graph captures one, as torch's docs prescribe (lazy
initialisation, cuDNN's and autograd's first-call work stay out of the graph)."""


def device_implementations(device: torch.device, compile: bool = True) -> list[str]:
    """The implementations timed by default on ``device``: native, compiled and fused on the
    CPU; every one on CUDA. ``compile=False`` leaves out the ``torch.compile`` ones."""
    return [
        name for name, implementation in IMPLEMENTATIONS.items()
        if (device.type == "cuda" or not implementation.cuda_only) and (compile or not implementation.compiled)
    ]


def check_implementations(names: Sequence[str], device: torch.device) -> list[str]:
    """``names`` in ``IMPLEMENTATIONS``' order, after checking that each exists, runs on
    ``device``, and that native and fused (every ratio's reference) are among them.

    Raises:
        ValueError: naming the offending implementations.
    """
    unknown = [name for name in names if name not in IMPLEMENTATIONS]
    if unknown:
        raise ValueError(f"unknown implementations {unknown}; expected some of {list(IMPLEMENTATIONS)}")
    cuda_only = [name for name in names if IMPLEMENTATIONS[name].cuda_only and device.type != "cuda"]
    if cuda_only:
        raise ValueError(f"implementations {cuda_only} need --device cuda, got {device.type}")
    missing = [name for name in ("native", "fused") if name not in names]
    if missing:
        raise ValueError(f"implementations must include native and fused (the ratios' references), missing {missing}")
    return [name for name in IMPLEMENTATIONS if name in names]


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One conv -> [BN ->] ReLU -> max-pool layer of the study (5x5, padding 2, 2x2 pools)."""

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


@dataclasses.dataclass(frozen=True)
class BenchOp:
    """An op to benchmark: its native composition, the fused op, and how to make inputs."""

    name: str
    native: Callable[..., Tensor]
    fused: Callable[..., Tensor]
    conv: bool  # takes the layer's input and convolves it (else: batch norm of its output)

    def describe(self, layer: LayerShape, batch_size: int) -> str:
        if self.conv:
            return layer.describe(batch_size)
        return f"{layer.out_channels} ch @{layer.size}x{layer.size} (N={batch_size})"


def _conv_relu_pool(t):
    return F.max_pool2d(F.relu(F.conv2d(t["input"], t["weight"], t["bias"], 1, 2)), 2)


def _conv_bn_relu_pool(t):
    conv = F.conv2d(t["input"], t["weight"], t["bias"], 1, 2)
    normalised = F.batch_norm(conv, t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], True)
    return F.max_pool2d(F.relu(normalised), 2)


OPS = {
    op.name: op
    for op in (
        BenchOp(
            "conv2d_relu_max_pool2d",
            native=_conv_relu_pool,
            fused=lambda t: ops.conv2d_relu_max_pool2d(t["input"], t["weight"], t["bias"], padding=2),
            conv=True,
        ),
        BenchOp(
            "conv2d_batch_norm_relu_max_pool2d",
            native=_conv_bn_relu_pool,
            fused=lambda t: ops.conv2d_batch_norm_relu_max_pool2d(
                t["input"], t["weight"], t["bias"], t["running_mean"], t["running_var"], t["bn_weight"],
                t["bn_bias"], training=True, padding=2,
            ),
            conv=True,
        ),
        BenchOp(
            "batch_norm",
            native=lambda t: F.batch_norm(t["input"], t["running_mean"], t["running_var"], t["weight"], t["bias"], True),
            fused=lambda t: ops.batch_norm(t["input"], t["running_mean"], t["running_var"], t["weight"], t["bias"], True),
            conv=False,
        ),
    )
}

# Tensors that never take a gradient.
_BUFFERS = ("running_mean", "running_var")


def make_tensors(op: BenchOp, layer: LayerShape, batch_size: int, dtype, device, memory_format) -> dict[str, Tensor]:
    """Inputs of one op at one layer: He-scaled weights, as in a trained network."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=generator, dtype=dtype)).to(device)

    channels = layer.out_channels
    if op.conv:
        tensors = {
            "input": randn(batch_size, layer.in_channels, layer.size, layer.size),
            "weight": randn(channels, layer.in_channels, 5, 5, scale=(2.0 / (layer.in_channels * 25)) ** 0.5),
            "bias": randn(channels, scale=0.1),
        }
        if op.name == "conv2d_batch_norm_relu_max_pool2d":
            tensors.update(bn_weight=1 + randn(channels, scale=0.1), bn_bias=randn(channels, scale=0.1))
    else:
        tensors = {
            "input": randn(batch_size, channels, layer.size, layer.size),
            "weight": 1 + randn(channels, scale=0.1),
            "bias": randn(channels, scale=0.1),
        }
    if op.name != "conv2d_relu_max_pool2d":
        tensors.update(running_mean=torch.zeros(channels, dtype=dtype, device=device), running_var=torch.ones(channels, dtype=dtype, device=device))
    tensors["input"] = tensors["input"].contiguous(memory_format=memory_format)
    return tensors


def leaves(tensors: dict[str, Tensor], requires_grad: bool, input_requires_grad: bool) -> dict[str, Tensor]:
    """Fresh leaves (so gradients never accumulate across timed calls)."""
    fresh = {}
    for name, tensor in tensors.items():
        wants_grad = requires_grad and name not in _BUFFERS and (name != "input" or input_requires_grad)
        fresh[name] = tensor if name in _BUFFERS else tensor.detach().requires_grad_(wants_grad)
    return fresh


def input_requires_grad(op: BenchOp, layer: LayerShape) -> bool:
    # A batch norm's input is an activation: it always needs a gradient.
    return layer.input_requires_grad or not op.conv


def make_block(op: BenchOp, implementation: str, autocast_dtype: torch.dtype | None = None) -> Callable[[dict[str, Tensor]], Tensor]:
    """The op as ``implementation`` runs it (see ``IMPLEMENTATIONS``): the native composition or
    the fused op, through ``torch.compile`` for the compiled ones, each under CPU autocast in
    ``autocast_dtype`` where given (as a user trains in low precision). The graph
    implementations' block is the eager one: :func:`make_timed_call` captures its call."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {list(IMPLEMENTATIONS)}, got {implementation!r}")
    spec = IMPLEMENTATIONS[implementation]
    block = under_autocast(op.fused if spec.fused else op.native, autocast_dtype)
    if spec.compiled:
        # dynamic=False: a training loop over fixed shapes gets static-shape graphs.
        return torch.compile(block, dynamic=False, mode=spec.compile_mode)
    return block


def make_call(block, tensors: dict[str, Tensor], op: BenchOp, layer: LayerShape, mode: str) -> Callable[[], object]:
    """A zero-argument call of ``block``: its forward (no gradient needed), or forward then
    backward with a fixed output gradient on fresh leaves."""
    if mode == "forward":
        inference = leaves(tensors, False, False)
        return lambda: block(inference)
    if mode == "forward_backward":
        grad_output = torch.randn_like(block(leaves(tensors, False, False)))

        def forward_backward():
            block(leaves(tensors, True, input_requires_grad(op, layer))).backward(grad_output)

        return forward_backward
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class CapturedCall:
    """A zero-argument call captured in a CUDA graph, as torch's docs prescribe: ``warmup`` calls
    on a side stream, then one call captured; calling this replays the graph (the same kernels on
    the same memory, none of the host's work). ``output`` is the captured call's result, which
    each replay rewrites in place.

    NB: graph and output live as long as this object: tensors the capture allocated stay in the
    graph's private memory pool, which no allocation outside the graph takes.
    """

    def __init__(self, call: Callable[[], object], warmup: int = GRAPH_WARMUP):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                call()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = call()

    def __call__(self) -> None:
        self.graph.replay()


def make_timed_call(op: BenchOp, implementation: str, block, tensors: dict[str, Tensor], layer: LayerShape, mode: str) -> Callable[[], object]:
    """The call ``cifarnet-bench`` times for ``implementation``: :func:`make_call` of its block,
    captured in a CUDA graph (:class:`CapturedCall`) for the graph implementations."""
    call = make_call(block, tensors, op, layer, mode)
    if not IMPLEMENTATIONS[implementation].graph:
        return call
    try:
        return CapturedCall(call)
    except RuntimeError as error:
        raise RuntimeError(f"{implementation}: capturing {op.name} at {layer.name} ({mode}) in a CUDA graph failed: {error}") from error


def benchmark_layer(op: BenchOp, layer: LayerShape, batch_size: int, dtype, device, memory_format, implementations: Sequence[str], warmup: int, repeats: int, autocast_dtype: torch.dtype | None = None) -> dict:
    """Times one op at one layer, forward and forward+backward, for each of ``implementations``
    (names in ``IMPLEMENTATIONS``; tensors in ``dtype``, computed under CPU autocast in
    ``autocast_dtype`` where given), and counts the bytes native and fused save for backward."""
    tensors = make_tensors(op, layer, batch_size, dtype, device, memory_format)
    # Every layer, memory format and mode is a recompilation of the same native function:
    # a fresh start per layer keeps dynamo under its recompile limit (past it, it runs eager).
    torch._dynamo.reset()
    blocks = {name: make_block(op, name, autocast_dtype) for name in implementations}
    stopwatch = Stopwatch(device)
    row = {"op": op.name, "layer": layer.name, "shape": op.describe(layer, batch_size)}
    for mode in MODES:
        calls = {name: make_timed_call(op, name, blocks[name], tensors, layer, mode) for name in implementations}
        row[f"{mode}_ms"] = interleaved_medians(calls, stopwatch, warmup, repeats)
    row["saved_bytes"] = {
        name: saved_tensor_bytes(lambda block=blocks[name]: block(leaves(tensors, True, input_requires_grad(op, layer))))
        for name in ("native", "fused")
    }
    return row


def stack_saved_bytes(op: BenchOp, batch_size: int, dtype, device, memory_format, autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Saved-for-backward bytes of the study's three-layer stack of a conv op."""
    layers = [make_tensors(op, layer, batch_size, dtype, device, memory_format) for layer in STUDY_LAYERS]

    def stack(block):
        def run():
            x = layers[0]["input"]
            for tensors in layers:
                x = block({**leaves(tensors, True, False), "input": x})
            return x

        return run

    return {name: saved_tensor_bytes(stack(make_block(op, name, autocast_dtype))) for name in ("native", "fused")}


def summarise(rows: list[dict], implementations: Sequence[str]) -> dict:
    """Totals over the rows, and each row's and the total's ratios (> 1 means faster).

    Per mode, ``entry["speedup"][mode]`` holds each implementation's speedup over native eager
    (native ms / its ms, keyed by its name) and the named ratios: ``fused_vs_compiled`` (compiled
    ms / fused ms, where compiled was timed), ``fused_vs_best_native`` (the fastest non-fused
    implementation's ms / the fastest fused one's) and ``fused_graph_vs_native_graph`` (where
    both were timed); ``entry["fastest"][mode]`` names the fastest ``native`` (non-fused) and
    ``fused`` implementations. The total's fastest are those of the three layers' summed times.
    ``saved_ratio`` is fused / native saved-for-backward bytes.
    """
    total = {f"{mode}_ms": {name: sum(row[f"{mode}_ms"][name] for row in rows) for name in implementations} for mode in MODES}
    total["saved_bytes"] = {name: sum(row["saved_bytes"][name] for row in rows) for name in ("native", "fused")}
    native_side = [name for name in implementations if not IMPLEMENTATIONS[name].fused]
    fused_side = [name for name in implementations if IMPLEMENTATIONS[name].fused]
    for entry in rows + [total]:
        entry["speedup"], entry["fastest"] = {}, {}
        for mode in MODES:
            times = entry[f"{mode}_ms"]
            speedup = {name: times["native"] / times[name] for name in implementations if name != "native"}
            if "compiled" in implementations:
                speedup["fused_vs_compiled"] = times["compiled"] / times["fused"]
            fastest = {"native": min(native_side, key=times.get), "fused": min(fused_side, key=times.get)}
            speedup["fused_vs_best_native"] = times[fastest["native"]] / times[fastest["fused"]]
            if "native_graph" in implementations and "fused_graph" in implementations:
                speedup["fused_graph_vs_native_graph"] = times["native_graph"] / times["fused_graph"]
            entry["speedup"][mode], entry["fastest"][mode] = speedup, fastest
        entry["saved_ratio"] = entry["saved_bytes"]["fused"] / entry["saved_bytes"]["native"]
    return total


def shows_best_native(implementations: Sequence[str]) -> bool:
    """Whether the table has a "vs best native" column: where a CUDA-only implementation was
    timed (on the CPU, "vs compiled" already compares with the other native one)."""
    return any(IMPLEMENTATIONS[name].cuda_only for name in implementations)


def format_table(rows: list[dict], total: dict, implementations: Sequence[str]) -> str:
    """A Markdown table: each implementation's ms (its name, underscores as spaces), per mode;
    "speedup" is the fused op's over native eager, "vs compiled" its over torch.compile'd native,
    "vs best native" (with CUDA-only implementations) the fastest fused implementation's over
    the fastest native one (x, > 1 is faster); then saved MiB."""
    compiled = "compiled" in implementations
    best_native = shows_best_native(implementations)
    header = ["layer", "shape"]
    for mode in ("fwd", "fwd+bwd"):
        header += [f"{mode} {name.replace('_', ' ')}" for name in implementations] + [f"{mode} speedup"]
        header += ([f"{mode} vs compiled"] if compiled else []) + ([f"{mode} vs best native"] if best_native else [])
    header += ["saved native MiB", "saved fused MiB", "saved ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(entry, name, shape):
        out = [name, shape]
        for mode in MODES:
            times, speedup = entry[f"{mode}_ms"], entry["speedup"][mode]
            out += [f"{times[implementation]:.2f}" for implementation in implementations] + [f"{speedup['fused']:.2f}x"]
            out += [f"{speedup['fused_vs_compiled']:.2f}x"] if compiled else []
            out += [f"{speedup['fused_vs_best_native']:.2f}x"] if best_native else []
        out += [f"{entry['saved_bytes'][k] / 2**20:.1f}" for k in ("native", "fused")] + [f"{entry['saved_ratio']:.3f}"]
        return out

    for row in rows:
        lines.append("| " + " | ".join(cells(row, row["layer"], row["shape"])) + " |")
    lines.append("| " + " | ".join(cells(total, "**total**", "three layers")) + " |")
    return "\n".join(lines)


def plot_speedups(results: list[dict], path: str) -> None:
    """Bar charts of the fused op's speedup over native eager (and torch.compile, and of the
    fastest fused implementation over the fastest native one where CUDA-only implementations
    ran), one panel per op and memory format, forward and forward+backward per layer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(results), 3.6), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results):
        entries = result["layers"] + [result["total"] | {"layer": "total"}]
        names = [entry["layer"] for entry in entries]
        series = [(f"{label} vs native", mode, "fused") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        if "fused_vs_compiled" in result["total"]["speedup"]["forward"]:
            series += [(f"{label} vs compiled", mode, "fused_vs_compiled") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        if shows_best_native(result.get("implementations", ())):
            series += [(f"{label} best vs best native", mode, "fused_vs_best_native") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        width = 0.8 / len(series)
        for i, (label, mode, key) in enumerate(series):
            positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            ax.bar(positions, [entry["speedup"][mode][key] for entry in entries], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("speedup of the fused op (x)")
        ax.set_title(f"{result['op']}\n{result['memory_format']}", fontsize=9)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    implementations = "\n".join(
        f"  {name:<18} {spec.description}{' (CUDA only)' if spec.cuda_only else ''}" for name, spec in IMPLEMENTATIONS.items()
    )
    parser = argparse.ArgumentParser(
        prog="cifarnet-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"implementations (the per-op tables' columns; on the CPU by default native, compiled, fused; on CUDA "
        f"all):\n{implementations}\nA CUDA graph captures one call after {GRAPH_WARMUP} warm-up calls on a side stream; "
        "forward+backward captures the fresh leaves, the forward and the backward with a fixed output gradient.",
    )
    parser.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op to benchmark (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
        help="float16/bfloat16: on the CPU, float32 tensors under torch.autocast in that dtype (how one "
        "trains in low precision there); on CUDA, tensors in that dtype. float32 on CUDA: torch's TF32 settings, "
        "which the header states",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--memory-format", choices=[*MEMORY_FORMATS, "both"], default="contiguous", help="layout of the inputs"
    )
    parser.add_argument(
        "--model",
        choices=list(MODEL_INPUT_SIZES),
        help="time this whole model before and after cifarnet.fuse instead of the per-op tables "
        "(in --memory-format contiguous or channels_last; --op, --no-compile, --implementations and --plot do not apply)",
    )
    parser.add_argument(
        "--input-size", type=int, metavar="PIXELS",
        help=f"with --model: the side of its square inputs (default per model: "
        f"{', '.join(f'{name} {size}' for name, size in MODEL_INPUT_SIZES.items())})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per implementation, median reported (default: 20; 5 with --model)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3; 1 with --model)")
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile'd native implementations (compiled, compiled_autotune)"
    )
    parser.add_argument(
        "--implementations", metavar="NAMES",
        help="comma-separated implementations to time (below; native and fused always among them; default: all the "
        "device runs, less the compiled ones with --no-compile)",
    )
    parser.add_argument(
        "--malloc-trim",
        action="store_true",
        help="leave glibc's malloc returning freed memory to the system, as it does by default (timings "
        "then include page faults on fresh tensors, which land on one variant or another)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also draw the speedups as a PNG")
    args = parser.parse_args(argv)
    # A whole model takes seconds per call at batch 128: fewer calls still give a steady median.
    if args.repeats is None:
        args.repeats = 5 if args.model else 20
    if args.warmup is None:
        args.warmup = 1 if args.model else 3
    if args.model and args.plot:
        parser.error("--plot draws the per-op speedups; it does not apply with --model")
    if args.model and args.memory_format == "both":
        parser.error("--model times one layout per run: --memory-format contiguous or channels_last")
    if args.input_size is not None and not args.model:
        parser.error("--input-size sizes the inputs of --model; the per-op tables use the study's layer shapes")
    if args.input_size is not None and args.input_size < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if args.implementations is None:
        args.implementations = device_implementations(device, compile=not args.no_compile)
    else:
        try:
            names = check_implementations(args.implementations.split(","), device)
        except ValueError as error:
            parser.error(f"--implementations {args.implementations}: {error}")
        args.implementations = [name for name in names if not (args.no_compile and IMPLEMENTATIONS[name].compiled)]
    # Checked now, not after minutes of timing; missing folders are created when writing.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = output_file_problem(path) if path is not None else None
        if problem:
            parser.error(f"{option} {path}: {problem}")
    return args


def _make_parent(path: str) -> str:
    """Creates the folders ``path`` is to go in, and returns it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def allocator_note(args: argparse.Namespace) -> str:
    return "; malloc keeps freed memory" if args.keeps_freed_memory else ""


def tf32_settings() -> dict[str, bool]:
    """torch's TF32 switches, which float32 convolutions (cuDNN) and matrix products on CUDA
    follow, the same for every implementation; cifarnet-bench leaves them as torch sets them
    (by default: cuDNN's on, matmul's off)."""
    return {
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def precision_note(dtype_name: str, autocast_dtype: torch.dtype | None, device: torch.device | None = None) -> str:
    """The precision as the header states it: CPU autocast where used; on CUDA in float32, the
    TF32 settings the convolutions run under."""
    if autocast_dtype is not None:
        return f"{dtype_name} (torch.autocast on float32 tensors)"
    if device is not None and device.type == "cuda" and dtype_name == "float32":
        return f"float32 ({', '.join(f'{name}={value}' for name, value in tf32_settings().items())})"
    return dtype_name


def gpu_info(device: torch.device) -> dict | None:
    """The GPU the figures were measured on, with cuDNN's version and the TF32 settings; None on
    the CPU."""
    if device.type != "cuda":
        return None
    return {"name": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(), **tf32_settings()}


def machine_line(device: torch.device) -> str:
    """What the figures were measured on: the CPU (model, instruction sets, cache) or the GPU
    (with cuDNN's version)."""
    if device.type == "cuda":
        gpu = gpu_info(device)
        return f"GPU: {gpu['name']}, cuDNN {gpu['cudnn']}; CPU: {describe_cpu()}"
    return f"CPU: {describe_cpu()}"


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension_quietly() -> None:
    """Imports ``torch.utils.cpp_extension`` without its note about CUDA_HOME.

    NB: torch.compile's CPU backend (inductor) imports ``torch.utils.cpp_extension`` for torch's
    include paths, and that import logs "No CUDA runtime is found, using CUDA_HOME=..." wherever
    a CUDA build of torch sees no GPU but finds a toolkit (an ``nvcc`` on ``PATH`` will do). The
    note concerns building CUDA extensions; the compiled native variant needs none, and neither
    does cifarnet at run time. So the module is imported here first, with that one record
    filtered out (tests/test_benchmark.py fails if torch words it otherwise)."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    note = _NoCudaRuntimeNote()
    logger.addFilter(note)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.removeFilter(note)


@ends_quietly_on_a_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.keeps_freed_memory = not args.malloc_trim and keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cifarnet-bench: --device cuda asked for, but no GPU is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    # On the CPU a low precision is used through autocast: parameters stay float32.
    autocast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu" else None
    if autocast_dtype is not None:
        dtype = torch.float32
    if args.model:
        return main_model(args, device, dtype, autocast_dtype)
    implementations = args.implementations
    if any(IMPLEMENTATIONS[name].compiled for name in implementations):
        _import_cpp_extension_quietly()
    formats = list(MEMORY_FORMATS) if args.memory_format == "both" else [args.memory_format]
    selected = list(OPS.values()) if args.op == "all" else [OPS[args.op]]

    print(
        f"cifarnet-bench: {precision_note(args.dtype, autocast_dtype, device)}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
        f"device {device}; median of {args.repeats} interleaved runs; batch norm in training mode{allocator_note(args)}"
    )
    print(machine_line(device))
    results = []
    progress = tqdm(total=len(selected) * len(formats) * len(STUDY_LAYERS), desc="benchmarking", leave=False)
    for op in selected:
        for format_name in formats:
            memory_format = MEMORY_FORMATS[format_name]
            rows = []
            for layer in STUDY_LAYERS:
                rows.append(benchmark_layer(op, layer, args.batch_size, dtype, device, memory_format, implementations, args.warmup, args.repeats, autocast_dtype))
                progress.update()
            total = summarise(rows, implementations)
            result = {"op": op.name, "memory_format": format_name, "implementations": implementations, "layers": rows, "total": total}
            if op.conv:
                result["stack_saved_bytes"] = stack_saved_bytes(op, args.batch_size, dtype, device, memory_format, autocast_dtype)
            results.append(result)
            progress.clear()
            print(f"\n{op.name}, {format_name}:")
            print(format_table(rows, total, implementations))
            if op.conv:
                stack = result["stack_saved_bytes"]
                print(
                    f"Saved for backward by the three-layer stack: native {stack['native'] / 2**20:.1f} MiB, "
                    f"fused {stack['fused'] / 2**20:.1f} MiB ({stack['fused'] / stack['native']:.3f}x)."
                )
    progress.close()
    if args.plot:
        plot_speedups(results, _make_parent(args.plot))
    if args.json:
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cifarnet": cifarnet.__version__,
            "build": {k: v for k, v in cifarnet.build_info().items() if k != "parallel"},
            "gpu": gpu_info(device),
            "config": vars(args) | {"threads": torch.get_num_threads()},
            "implementations": {name: IMPLEMENTATIONS[name].description for name in implementations},
            "results": results,
        }
        with open(_make_parent(args.json), "w") as file:
            json.dump(report, file, indent=2)
    return 0


def main_model(args: argparse.Namespace, device: torch.device, dtype, autocast_dtype: torch.dtype | None) -> int:
    """``cifarnet-bench --model``: one model before and after ``cifarnet.fuse``."""
    print(
        f"cifarnet-bench --model {args.model}: {precision_note(args.dtype, autocast_dtype, device)}, {args.memory_format}, batch {args.batch_size}, {torch.get_num_threads()} "
        f"thread(s), device {device}; forward+backward in training mode, median of {args.repeats} interleaved runs"
        f"{allocator_note(args)}"
    )
    print(machine_line(device))
    rows = benchmark_model(args.model, args.batch_size, dtype, device, args.warmup, args.repeats, autocast_dtype,
                           MEMORY_FORMATS[args.memory_format], args.input_size)
    print(format_model_table(rows))
    if args.json:
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cifarnet": cifarnet.__version__,
            "build": {k: v for k, v in cifarnet.build_info().items() if k != "parallel"},
            "gpu": gpu_info(device),
            "config": vars(args) | {"threads": torch.get_num_threads()},
            "model": args.model,
            "results": rows,
        }
        with open(_make_parent(args.json), "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
