"""How many kernels each op launches on CUDA, counted with torch.profiler against the budgets of
docs/gpu.md's launch table (the one place the figures are written; the GPU tests skip without a
GPU), and that no op synchronises with the host.

At the study's layer sizes each op takes 0.1-1 ms on a GPU, so every launch and every per-channel
ATen op between kernels shows. A kernel whose name contains ``cifarnet`` is ours; other launches
(fills, copies, ATen ops) may only be the convolution's own, counted here on the same inputs with
native conv2d, plus what the table allows besides (evaluation's batch-norm folding).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cifarnet.ops import batch_norm, conv2d_batch_norm_relu_max_pool2d, conv2d_relu_max_pool2d
from conftest import DEVICES

GPU_PAGE = Path(__file__).resolve().parents[1] / "docs" / "gpu.md"
TABLE_MARKER = "<!-- launch budgets: read by tests/test_cuda_launches.py -->"

needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and cifarnet built with CUDA")


def launch_budgets() -> dict[tuple[str, str], tuple[int, int]]:
    """``(op, pass) -> (cifarnet kernels, other launches besides the convolution's)``, from the
    table after TABLE_MARKER in docs/gpu.md."""
    text = GPU_PAGE.read_text(encoding="utf-8")
    assert TABLE_MARKER in text, f"docs/gpu.md has lost its launch table's marker {TABLE_MARKER!r}"
    budgets = {}
    for line in text.split(TABLE_MARKER, 1)[1].lstrip().splitlines()[2:]:  # past the header
        if not line.startswith("|"):
            break
        op, step, ours, others = (cell.strip() for cell in line.strip().strip("|").split("|"))
        budgets[op.strip("`"), step] = (int(ours), int(others))
    return budgets


def layer(dtype=torch.float32, memory_format=torch.channels_last, batch=32, in_channels=16, out_channels=32, size=16):
    """A study-like layer's input, weight and bias on the GPU; input and weight in `memory_format`."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(batch, in_channels, size, size, generator=generator).to("cuda", dtype)
    weight = (0.1 * torch.randn(out_channels, in_channels, 5, 5, generator=generator)).to("cuda", dtype)
    bias = torch.randn(out_channels, generator=generator).to("cuda", dtype)
    return (input.contiguous(memory_format=memory_format).requires_grad_(),
            weight.contiguous(memory_format=memory_format).requires_grad_(), bias.requires_grad_())  # fmt: skip


def batch_norm_parameters(channels):
    """float32 weight and bias (as autocast leaves them, also for 16-bit data) and running statistics."""
    weight = (torch.rand(channels, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(channels, device="cuda").requires_grad_()
    return weight, bias, torch.zeros(channels, device="cuda"), torch.ones(channels, device="cuda")


def device_launches(run) -> list[str]:
    """Names of the device activities (kernels, fills, copies) that ``run()`` launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events() if event.device_type == DeviceType.CUDA]
    if not names:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI on this machine)")
    return names


def backward_pass(forward, leaves):
    """The backward alone as a step to count: the forward runs before, outside the count."""
    output = forward()
    grad = torch.randn_like(output)
    return lambda: torch.autograd.grad(output, leaves, grad, retain_graph=True)


def cases():
    """``(op, pass, id) -> builder``; a builder returns (our step, native convolution's step or
    None), each a callable to count."""

    def bn(dtype, memory_format, step):
        def build():
            input = layer(dtype, memory_format)[0]
            weight, bias, running_mean, running_var = batch_norm_parameters(input.shape[1])
            training = step.startswith("training")
            stats = (None, None) if "no running" in step else (running_mean, running_var)
            forward = lambda: batch_norm(input, *stats, weight, bias, training)  # noqa: E731
            return (forward if "forward" in step else backward_pass(forward, [input, weight, bias])), None

        return build

    def conv_relu_pool(step):
        def build():
            input, weight, bias = layer()
            forward = lambda: conv2d_relu_max_pool2d(input, weight, bias, padding=2)  # noqa: E731
            native = lambda: F.conv2d(input, weight, bias, 1, 2)  # noqa: E731
            if step == "forward":
                return forward, native
            return backward_pass(forward, [input, weight, bias]), backward_pass(native, [input, weight, bias])

        return build

    def conv_bn(step):
        def build():
            input, weight, _ = layer()
            bn_weight, bn_bias, running_mean, running_var = batch_norm_parameters(weight.shape[0])
            training = step.startswith("training")
            forward = lambda: conv2d_batch_norm_relu_max_pool2d(  # noqa: E731
                input, weight, None, running_mean, running_var, bn_weight, bn_bias, training, padding=2
            )
            # Evaluation convolves with the folded weight and a bias.
            conv_bias = None if training else bn_bias.detach()
            native = lambda: F.conv2d(input, weight, conv_bias, 1, 2)  # noqa: E731
            if "forward" in step:
                return forward, native
            return backward_pass(forward, [input, weight, bn_weight, bn_bias]), backward_pass(native, [input, weight])

        return build

    built = {}
    bn_steps = ["training forward", "training forward, no running statistics", "training backward",
                "evaluation forward", "evaluation backward"]  # fmt: skip
    for dtype, memory_format, name in [(torch.float32, torch.channels_last, "float32-channels_last"),
                                       (torch.float32, torch.contiguous_format, "float32-contiguous"),
                                       (torch.bfloat16, torch.channels_last, "bfloat16-channels_last")]:  # fmt: skip
        for step in bn_steps:
            built["batch_norm", step, name] = bn(dtype, memory_format, step)
    for step in ["forward", "backward"]:
        built["conv2d_relu_max_pool2d", step, "float32-channels_last"] = conv_relu_pool(step)
    for step in ["training forward", "training backward", "evaluation forward"]:
        built["conv2d_batch_norm_relu_max_pool2d", step, "float32-channels_last"] = conv_bn(step)
    return built


CASES = cases()


def test_the_launch_table_budgets_every_counted_pass():
    """Runs everywhere: docs/gpu.md's table and this test name the same ops and passes."""
    assert set(launch_budgets()) == {(op, step) for op, step, _ in CASES}


@needs_cuda
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: "-".join(case).replace(" ", "_").replace(",", ""))
def test_each_op_launches_no_more_kernels_than_its_budget(case):
    op, step, _ = case
    ours_budget, others_allowed = launch_budgets()[op, step]
    run, native = CASES[case]()
    run()  # warm-up: cuDNN's plans, the reductions' counter workspace
    names = device_launches(run)
    ours = [name for name in names if "cifarnet" in name]
    others = [name for name in names if "cifarnet" not in name]
    native_names = []
    if native is not None:
        native()
        native_names = device_launches(native)
    assert len(ours) <= ours_budget, f"{op}, {step}: {len(ours)} cifarnet kernels, budget {ours_budget}: {ours}"
    assert len(others) <= len(native_names) + others_allowed, (
        f"{op}, {step}: {len(others)} other launches where the convolution alone makes {len(native_names)} "
        f"(+{others_allowed} allowed): {others} (native convolution: {native_names})"
    )


@contextlib.contextmanager
def sync_debug_mode(mode):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@needs_cuda
@pytest.mark.parametrize("case", list(CASES), ids=lambda case: "-".join(case).replace(" ", "_").replace(",", ""))
def test_no_op_synchronises_with_the_host(case):
    run, _ = CASES[case]()
    run()  # the counter workspace's one-time fill happens outside
    with sync_debug_mode("error"):
        run()
