"""pytest-benchmark suite: conv2d -> ReLU -> max_pool2d, native eager vs torch.compile vs fused.

    pytest benchmarks/ --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group (one study layer, forward or forward+backward) lists the three implementations
side by side; compare medians within a group. CIFARNET_BENCH_BATCH sets the batch (default
128). `cifarnet-bench` prints the same cases as ratios from one interleaved run.
"""

from __future__ import annotations

import os

import pytest
import torch

from cifarnet import benchmark as bench

BATCH_SIZE = int(os.environ.get("CIFARNET_BENCH_BATCH", "128"))


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("layer", bench.STUDY_LAYERS, ids=lambda layer: layer.name)
@pytest.mark.parametrize("implementation", bench.IMPLEMENTATIONS)
def test_conv2d_relu_max_pool2d(benchmark, implementation, layer, mode):
    tensors = bench.make_layer_tensors(layer, BATCH_SIZE, torch.float32, torch.device("cpu"), torch.contiguous_format)
    block = bench.make_block(implementation)
    call = bench.make_call(block, tensors, layer, mode)
    for _ in range(3):  # compile and warm up outside the timed rounds
        call()
    benchmark.group = f"{layer.describe(BATCH_SIZE)} {mode}"
    if implementation != "compiled":
        benchmark.extra_info["saved_bytes"] = bench.saved_tensor_bytes(
            lambda: block(*tensors.leaves(True, layer.input_requires_grad))
        )
    benchmark.pedantic(call, rounds=15, iterations=1)
