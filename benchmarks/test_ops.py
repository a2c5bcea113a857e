"""pytest-benchmark suite: each fused op against native eager and torch.compile'd native.

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group (one op at one study layer, forward or forward+backward, batch norm in training
mode) lists the three implementations side by side; compare medians within a group.
CIFARNET_BENCH_BATCH sets the batch (default 128); CIFARNET_BENCH_DTYPE=bfloat16 (or float16)
times every case under CPU autocast in that dtype, as one trains in low precision on the CPU. `cifarnet-bench` prints the same cases as
ratios from one interleaved run, which is the fairer comparison on a noisy machine.
"""

from __future__ import annotations

import os

import pytest
import torch

import cifarnet
from cifarnet import benchmark_ops as bench
from cifarnet._timing import keep_freed_memory, saved_tensor_bytes

BATCH_SIZE = int(os.environ.get("CIFARNET_BENCH_BATCH", "128"))
DTYPE_NAME = os.environ.get("CIFARNET_BENCH_DTYPE", "float32")
if DTYPE_NAME not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"CIFARNET_BENCH_DTYPE must be float32, bfloat16 or float16, got {DTYPE_NAME!r}")
AUTOCAST_DTYPE = None if DTYPE_NAME == "float32" else getattr(torch, DTYPE_NAME)


@pytest.fixture(scope="module", autouse=True)
def steady_allocator():
    """As cifarnet-bench does: no page faults from glibc returning freed memory mid-run."""
    keep_freed_memory()


@pytest.fixture(autouse=True)
def fresh_compile_caches():
    """Each case compiles from empty caches, as cifarnet-bench does per layer: under autocast
    every case's block wraps the one autocast function, whose cache keeps 8 graphs
    (torch._dynamo.config.recompile_limit); past that, torch.compile ran the later cases eager
    with no more than a warning."""
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("layer", bench.STUDY_LAYERS, ids=lambda layer: layer.name)
@pytest.mark.parametrize("implementation", bench.device_implementations(torch.device("cpu")))
@pytest.mark.parametrize("op", bench.OPS.values(), ids=lambda op: op.name)
def test_op(benchmark, op, implementation, layer, mode):
    tensors = bench.make_tensors(op, layer, BATCH_SIZE, torch.float32, torch.device("cpu"), torch.contiguous_format)
    block = bench.make_block(op, implementation, AUTOCAST_DTYPE)
    call = bench.make_call(block, tensors, op, layer, mode)
    for _ in range(3):  # compile and warm up outside the timed rounds
        call()
    benchmark.group = f"{op.name} {op.describe(layer, BATCH_SIZE)} {DTYPE_NAME} {mode}"
    if implementation != "compiled":
        benchmark.extra_info["saved_bytes"] = saved_tensor_bytes(
            lambda: block(bench.leaves(tensors, True, bench.input_requires_grad(op, layer)))
        )
    benchmark.pedantic(call, rounds=15, iterations=1)


DROPOUT_IMPLEMENTATIONS = {
    "native": lambda x: torch.nn.functional.dropout(x, 0.5, True),
    "compiled": torch.compile(lambda x: torch.nn.functional.dropout(x, 0.5, True)),
    "fused": lambda x: cifarnet.ops.dropout(x, 0.5),
}


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("implementation", DROPOUT_IMPLEMENTATIONS)
def test_dropout(benchmark, implementation, mode):
    """Dropout(0.5) on the study's fc4 output (batch x 1000), in CIFARNET_BENCH_DTYPE (under
    autocast that tensor is already 16-bit: fc4 is a linear layer)."""
    dtype = AUTOCAST_DTYPE or torch.float32
    x = torch.randn(BATCH_SIZE, 1000, dtype=dtype, requires_grad=mode != "forward")
    dropout = DROPOUT_IMPLEMENTATIONS[implementation]

    def call():
        output = dropout(x)
        if mode != "forward":
            output.backward(torch.ones_like(output))

    for _ in range(3):
        call()
    benchmark.group = f"dropout {BATCH_SIZE}x1000 {DTYPE_NAME} {mode}"
    benchmark.pedantic(call, rounds=30, iterations=1)
