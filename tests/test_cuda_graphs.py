"""The ops on CUDA without host synchronisation and inside CUDA graphs (skipped without a GPU).

- Every op, forward and backward, and a whole training step of the study's fused ``ConvNet``
  run under ``torch.cuda.set_sync_debug_mode("error")``: none of them waits for the GPU.
- Dropout reads its seed and offset from the CUDA generator on the device: a captured graph
  draws a new mask at every replay, the same generator state gives the same mask (in a graph
  and eagerly alike), and the backward applies the forward's mask.
- ``torch.compile(mode="reduce-overhead")`` of models holding the fused layers captures them in
  CUDA graphs and gives eager's results.

The CPU side of dropout's keys (its schema, tags, fake kernels, and the masks of a seed and
offset) is tested in tests/test_dropout.py.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import cifarnet
from cifarnet import ops
from cifarnet.study.models import ConvNet
from cifarnet.study.train import make_optimizer
from cifarnet.study.train.config import TRAINING_MEMORY_FORMAT, TrainConfig
from conftest import DEVICES

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and cifarnet built with CUDA")

DROPOUT = torch.ops.cifarnet.dropout.default
DROPOUT_BACKWARD = torch.ops.cifarnet._dropout_backward.default


@contextlib.contextmanager
def host_syncs_raise():
    """CUDA calls that wait for the GPU (``.item()``, a device-to-host copy, a stream or
    device synchronisation) raise while it is active."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def cuda_randn(*shape, seed=0, memory_format=torch.contiguous_format, requires_grad=False):
    """Made on the device: a host-to-device copy of pageable memory synchronises."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    tensor = torch.randn(*shape, device="cuda", generator=generator).contiguous(memory_format=memory_format)
    return tensor.requires_grad_(requires_grad)


# --------------------------------------------------------------------------------------------
# (a) No host synchronisation


def conv_layer_tensors():
    input = cuda_randn(16, 32, 16, 16, memory_format=torch.channels_last, requires_grad=True)
    weight = (0.1 * cuda_randn(64, 32, 5, 5, seed=1)).requires_grad_()
    bias = cuda_randn(64, seed=2, requires_grad=True)
    return input, weight, bias


def bn_tensors(channels=64):
    weight = (torch.rand(channels, device="cuda") + 0.5).requires_grad_()
    bias = cuda_randn(channels, seed=3, requires_grad=True)
    running = [torch.zeros(channels, device="cuda"), torch.ones(channels, device="cuda")]
    return weight, bias, running


def run_conv2d_relu_max_pool2d():
    input, weight, bias = conv_layer_tensors()
    return input, ops.conv2d_relu_max_pool2d(input, weight, bias, padding=2)


def run_batch_norm(training):
    def run():
        input = cuda_randn(16, 64, 8, 8, memory_format=torch.channels_last, requires_grad=True)
        weight, bias, (mean, var) = bn_tensors()
        return input, ops.batch_norm(input, mean, var, weight, bias, training=training)

    return run


def run_conv2d_batch_norm_relu_max_pool2d(training):
    def run():
        input, weight, bias = conv_layer_tensors()
        bn_weight, bn_bias, (mean, var) = bn_tensors()
        output = ops.conv2d_batch_norm_relu_max_pool2d(
            input, weight, bias, mean, var, bn_weight, bn_bias, training, padding=2
        )
        return input, output

    return run


def run_batch_norm_relu_conv2d(training):
    def run():
        input = cuda_randn(16, 64, 8, 8, memory_format=torch.channels_last, requires_grad=True)
        bn_weight, bn_bias, (mean, var) = bn_tensors()
        weight = (0.1 * cuda_randn(32, 64, 3, 3, seed=4)).requires_grad_()
        output = ops.batch_norm_relu_conv2d(input, mean, var, bn_weight, bn_bias, weight, None, training, padding=1)
        return input, output

    return run


def run_dropout(seeded):
    def run():
        input = cuda_randn(128, 1000, requires_grad=True)
        return input, ops.dropout(input, 0.5, generator=torch.Generator().manual_seed(1) if seeded else None)

    return run


OP_RUNS = {
    "conv2d_relu_max_pool2d": run_conv2d_relu_max_pool2d,
    "batch_norm-train": run_batch_norm(True),
    "batch_norm-eval": run_batch_norm(False),
    "conv2d_batch_norm_relu_max_pool2d-train": run_conv2d_batch_norm_relu_max_pool2d(True),
    "conv2d_batch_norm_relu_max_pool2d-eval": run_conv2d_batch_norm_relu_max_pool2d(False),
    "batch_norm_relu_conv2d-train": run_batch_norm_relu_conv2d(True),
    "batch_norm_relu_conv2d-eval": run_batch_norm_relu_conv2d(False),
    "dropout": run_dropout(seeded=False),
    "dropout-explicit_seed": run_dropout(seeded=True),  # a CPU seed, read on the host: no sync
}


@pytest.mark.parametrize("name", OP_RUNS)
def test_forward_and_backward_never_wait_for_the_gpu(name):
    def forward_backward():
        input, output = OP_RUNS[name]()
        output.backward(torch.ones_like(output))
        return input.grad

    forward_backward()  # first calls (cuDNN handles, kernel loading) outside the check
    with host_syncs_raise():
        grad = forward_backward()
    assert grad is not None


def test_a_training_step_of_the_fused_convnet_never_waits_for_the_gpu():
    torch.manual_seed(0)
    model = ConvNet("full", "fused").cuda().to(memory_format=TRAINING_MEMORY_FORMAT).train()
    optimizer, _ = make_optimizer(model, TrainConfig(variant="full", ops="fused"))
    criterion = nn.CrossEntropyLoss()
    images = cuda_randn(128, 3, 28, 28, memory_format=TRAINING_MEMORY_FORMAT)
    labels = torch.randint(0, 10, (128,), device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    step()
    with host_syncs_raise():
        loss = step()
    assert torch.isfinite(loss).item()


# --------------------------------------------------------------------------------------------
# (b) Dropout in a CUDA graph


def capture(function, *args):
    """``function(*args)`` captured in a CUDA graph after warm-up runs on a side stream (as the
    torch.cuda.graphs documentation does it): the graph and its static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            function(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function(*args)
    return graph, outputs


def replayed(graph, outputs):
    graph.replay()
    return [output.clone() for output in outputs]


def test_each_replay_draws_a_new_mask_and_a_generator_state_gives_one_mask():
    input = cuda_randn(64, 1000) + 10  # no zeros: a zero output is a dropped element
    graph, outputs = capture(lambda x: [ops.dropout(x, 0.5)], input)
    first, second = replayed(graph, outputs)[0], replayed(graph, outputs)[0]
    assert not torch.equal(first != 0, second != 0)
    for output in (first, second):
        assert abs((output != 0).float().mean().item() - 0.5) < 0.02
    state = torch.cuda.get_rng_state()
    again = replayed(graph, outputs)[0]
    torch.cuda.set_rng_state(state)
    assert torch.equal(replayed(graph, outputs)[0], again)
    torch.cuda.set_rng_state(state)
    assert torch.equal(ops.dropout(input, 0.5), again), "eager draws the replay's mask"
    torch.cuda.manual_seed(5)
    seeded = replayed(graph, outputs)[0]
    torch.cuda.manual_seed(5)
    assert torch.equal(replayed(graph, outputs)[0], seeded)


def test_a_captured_backward_applies_its_replays_forward_mask():
    input = (cuda_randn(32, 500) + 10).requires_grad_()
    grad_output = cuda_randn(32, 500, seed=1)

    def forward_backward(x):
        output = ops.dropout(x, 0.3)
        (grad,) = torch.autograd.grad(output, x, grad_output)
        return [output, grad]

    graph, outputs = capture(forward_backward, input)
    masks = []
    for _ in range(2):
        output, grad = replayed(graph, outputs)
        kept = output != 0
        scale = torch.tensor(1 / 0.7, dtype=torch.float32, device="cuda")
        assert torch.equal(grad, torch.where(kept, grad_output * scale, grad_output * 0))
        masks.append(kept)
    assert not torch.equal(*masks)


def test_the_mask_is_the_generators_seed_and_offset_read_on_the_device():
    """philox.h's key of a generator's (seed, offset): the CUDA op's mask equals the CPU
    kernel's for the generator's seed and offset before the call, and the offset moves by 4."""
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    torch.cuda.manual_seed(1234)
    ones = torch.ones(5, 777, device="cuda")
    DROPOUT(ones, None, 0.4)  # an offset other than 0
    offset = generator.get_offset()
    output = DROPOUT(ones, None, 0.4)
    assert generator.get_offset() == offset + 4
    expected = DROPOUT_BACKWARD(torch.ones(5, 777), torch.tensor([1234, offset]), 0.4)
    assert torch.equal(output.cpu(), expected)


def test_forward_and_backward_ops_agree_on_the_device():
    forward = torch.ops.cifarnet._dropout_forward.default
    input = cuda_randn(3, 1001)
    torch.cuda.manual_seed(9)
    output, seed_offset = forward(input, 0.25)
    assert seed_offset.device == input.device and seed_offset.dtype == torch.int64
    assert torch.equal(DROPOUT_BACKWARD(input, seed_offset, 0.25), output)
    torch.cuda.manual_seed(9)
    assert torch.equal(DROPOUT(input, None, 0.25), output), "the op without autograd draws the same mask"
    assert seed_offset.tolist() == [9, 0]


def test_a_cuda_generator_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="must be a CPU generator"):
        ops.dropout(cuda_randn(4, 4), 0.5, generator=torch.Generator(device="cuda"))


# --------------------------------------------------------------------------------------------
# (c) torch.compile(mode="reduce-overhead")


def cudagraph_skips() -> int:
    """How many graphs inductor has declined to capture in CUDA graphs so far.

    NB: torch has no public count; this private counter is checked below to count a graph
    that cannot be captured.
    """
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def test_the_skip_counter_counts_a_graph_that_cannot_be_captured():
    torch._dynamo.reset()
    before = cudagraph_skips()
    compiled = torch.compile(lambda x, y: x.cpu() + y, mode="reduce-overhead")
    for _ in range(3):
        compiled(cuda_randn(8), torch.ones(8))
    assert cudagraph_skips() > before, f"torch {torch.__version__} no longer counts cudagraph skips there"


class FusedLayers(nn.Module):
    """Each fused layer of the library, channels-last, and dropout when asked."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.block1 = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 16, 3, padding=1)
        self.block2 = cifarnet.nn.Conv2dReLUMaxPool2d(16, 32, 3, padding=1)
        self.bn = cifarnet.nn.BatchNorm2d(32)
        self.dropout = cifarnet.nn.Dropout(dropout) if dropout else nn.Identity()
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, input):
        return self.fc(self.dropout(torch.flatten(self.bn(self.block2(self.block1(input))), 1)))


def compiled_and_eager(model: nn.Module):
    torch._dynamo.reset()
    return torch.compile(copy.deepcopy(model), mode="reduce-overhead"), model


def images(seed=0, size=32):
    return cuda_randn(8, 3, size, size, seed=seed, memory_format=torch.channels_last)


TOLERANCE = dict(rtol=1e-4, atol=1e-4)  # inductor's own kernels for the native ops around ours


# The study's ConvNet takes 28 x 28 crops from `augmented` on.
@pytest.mark.parametrize(
    "model, size", [(FusedLayers, 32), (lambda: ConvNet("full", "fused"), 28)], ids=["fused_layers", "convnet"]
)
def test_reduce_overhead_in_evaluation_gives_eager_results(model, size):
    torch.manual_seed(0)
    compiled, eager = compiled_and_eager(model().cuda().to(memory_format=torch.channels_last).eval())
    skips = cudagraph_skips()
    with torch.no_grad():
        for seed in range(4):  # warm-up, recording, replays
            input = images(seed, size)
            torch.testing.assert_close(compiled(input), eager(input), **TOLERANCE)
    assert cudagraph_skips() == skips, "captured in CUDA graphs"


def test_reduce_overhead_in_training_without_dropout_gives_eager_results():
    torch.manual_seed(0)
    compiled, eager = compiled_and_eager(FusedLayers().cuda().to(memory_format=torch.channels_last).train())
    skips = cudagraph_skips()
    for seed in range(4):
        input = images(seed)
        ours, theirs = compiled(input), eager(input)
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
        grad = cuda_randn(*theirs.shape, seed=100 + seed)
        ours.backward(grad)
        theirs.backward(grad)
    assert cudagraph_skips() == skips, "captured in CUDA graphs"
    for (name, mine), theirs in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad, **TOLERANCE, msg=name)
    for (name, mine), theirs in zip(compiled.named_buffers(), eager.buffers()):
        torch.testing.assert_close(mine, theirs, **TOLERANCE, msg=name)


def test_reduce_overhead_in_training_draws_a_new_mask_at_every_replay():
    torch.manual_seed(0)
    compiled, _ = compiled_and_eager(FusedLayers(dropout=0.5).cuda().to(memory_format=torch.channels_last).train())
    skips = cudagraph_skips()
    input = images()
    with torch.no_grad():
        outputs = [compiled(input).clone() for _ in range(5)]  # warm-up, recording, replays
    assert cudagraph_skips() == skips, "captured in CUDA graphs"
    assert all(not torch.equal(a, b) for a, b in zip(outputs[2:], outputs[3:])), "a new mask at every replay"
