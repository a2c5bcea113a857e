"""What ``cifarnet-bench`` times: the implementations of each op (native eager, compiled, fused,
captured in CUDA graphs), the study's three layers, their inputs, the timed calls, and the bytes
each saves for backward."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cifarnet import ops
from cifarnet._timing import Stopwatch, interleaved_medians, saved_tensor_bytes, under_autocast

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
