"""CUDA-only behaviour: float16/bfloat16, autocast and streams (skipped without a GPU).

Everything else about the CUDA kernels is covered by the op tests, which run on every device
in conftest.DEVICES.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import cifarnet
from cifarnet.ops import batch_norm, conv2d_batch_norm_relu_max_pool2d, conv2d_relu_max_pool2d
from conftest import DEVICES, native_conv2d_relu_max_pool2d

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and cifarnet built with CUDA")

REDUCED = [torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]


def study_layer(dtype, memory_format, in_channels=32, out_channels=64, size=16, batch=16):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(batch, in_channels, size, size, generator=generator).cuda().to(dtype)
    weight = (0.1 * torch.randn(out_channels, in_channels, 5, 5, generator=generator)).cuda().to(dtype)
    bias = torch.randn(out_channels, generator=generator).cuda().to(dtype)
    return input.contiguous(memory_format=memory_format), weight, bias


def tolerance(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=5e-3, atol=5e-3)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_conv_relu_pool_in_reduced_precision_matches_native(dtype, memory_format):
    tensors = [t.requires_grad_() for t in study_layer(dtype, memory_format)]
    fused = conv2d_relu_max_pool2d(*tensors, padding=2)
    native = native_conv2d_relu_max_pool2d(*tensors, padding=2)
    assert fused.dtype == dtype and fused.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(fused, native, **tolerance(dtype))
    grad = torch.randn_like(native)
    for ours, theirs in zip(torch.autograd.grad(fused, tensors, grad), torch.autograd.grad(native, tensors, grad)):
        scale = theirs.float().abs().max().clamp(min=1)
        torch.testing.assert_close(ours.float() / scale, theirs.float() / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("memory_format", FORMATS)
def test_batch_norm_in_reduced_precision_matches_native(dtype, memory_format):
    input = study_layer(dtype, memory_format)[0].requires_grad_()
    weight = (torch.rand(32, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(32, device="cuda").requires_grad_()
    stats = [torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")]
    native_stats = [t.clone() for t in stats]
    ours = batch_norm(input, *stats, weight, bias, training=True)
    native = F.batch_norm(input, *native_stats, weight, bias, training=True)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, native, **tolerance(dtype))
    for mine, theirs in zip(stats, native_stats):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(native)
    leaves = [input, weight, bias]
    for mine, theirs in zip(torch.autograd.grad(ours, leaves, grad), torch.autograd.grad(native, leaves, grad)):
        assert mine.dtype == theirs.dtype  # float32 parameters get float32 gradients
        scale = theirs.float().abs().max().clamp(min=1)
        torch.testing.assert_close(mine.float() / scale, theirs.float() / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", REDUCED)
def test_fused_conv_batch_norm_in_reduced_precision_matches_native(dtype):
    input, weight, bias = (t.requires_grad_() for t in study_layer(dtype, torch.channels_last))
    bn_weight = (torch.rand(64, device="cuda") + 0.5).requires_grad_()
    bn_bias = torch.randn(64, device="cuda").requires_grad_()
    stats = [torch.zeros(64, device="cuda"), torch.ones(64, device="cuda")]
    native_stats = [t.clone() for t in stats]
    fused = conv2d_batch_norm_relu_max_pool2d(input, weight, bias, *stats, bn_weight, bn_bias, True, padding=2)
    conv = F.conv2d(input, weight, bias, 1, 2)
    native = F.max_pool2d(F.relu(F.batch_norm(conv, *native_stats, bn_weight, bn_bias, True)), 2)
    torch.testing.assert_close(fused, native, **tolerance(dtype))
    torch.testing.assert_close(stats[1], native_stats[1], rtol=1e-3, atol=1e-3)
    leaves = [input, weight, bn_weight, bn_bias]
    grad = torch.randn_like(native)
    for ours, theirs in zip(torch.autograd.grad(fused, leaves, grad), torch.autograd.grad(native, leaves, grad)):
        assert ours.dtype == theirs.dtype  # float32 batch-norm parameters get float32 gradients
        scale = theirs.float().abs().max().clamp(min=1)
        torch.testing.assert_close(ours.float() / scale, theirs.float() / scale, **tolerance(dtype))


@pytest.mark.parametrize("dtype", REDUCED)
def test_autocast_runs_the_conv_ops_in_reduced_precision(dtype):
    layer = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 16, 3, padding=1).cuda()
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2)).cuda()
    native[0].load_state_dict({"weight": layer.weight, "bias": layer.bias})
    input = torch.randn(8, 3, 32, 32, device="cuda")
    for train in (True, False):
        layer.train(train), native.train(train)
        with torch.autocast("cuda", dtype=dtype):
            ours, theirs = layer(input), native(input)
        assert ours.dtype == dtype
        torch.testing.assert_close(ours.float(), theirs.float(), **tolerance(dtype))


# About half a second of GPU time (spin_kernel counts clock cycles; GPUs clock at 1-2 GHz).
SLEEP_CYCLES = 1_000_000_000


def cifarnet_work(input, weight, bias):
    """Forward and backward of the conv op and a training batch norm: every kind of kernel of
    cifarnet's own (the convolution itself is torch's)."""
    leaf = input.detach().requires_grad_()
    output = conv2d_relu_max_pool2d(leaf, weight, bias, padding=2)
    (grad,) = torch.autograd.grad(output, leaf, torch.ones_like(output))
    normalised = batch_norm(output.detach(), None, None, None, None, training=True)
    return output, grad, normalised


def stream_ids_while_the_default_stream_sleeps(work, stream):
    """Runs ``work`` on ``stream`` while the default stream runs a long sleep kernel.

    Returns the profiler's stream ids of cifarnet's kernels and of the sleep, whether the
    default stream was still busy when ``stream`` had finished, and ``work``'s result.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(SLEEP_CYCLES)  # on the default stream, the current one here
        with torch.cuda.stream(stream):
            result = work()
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
        default_busy = not torch.cuda.default_stream().query()
        torch.cuda.synchronize()
    kernels = [event for event in prof.events() if event.device_type == DeviceType.CUDA]
    if not kernels:
        pytest.skip("the profiler recorded no CUDA kernels (no CUPTI on this machine)")
    ours = {event.device_resource_id for event in kernels if "cifarnet" in event.name}
    sleep = {event.device_resource_id for event in kernels if "spin_kernel" in event.name}
    assert ours, f"no cifarnet kernel among the profiled ones: {sorted({e.name for e in kernels})}"
    assert len(sleep) == 1, f"spin_kernel on streams {sleep}"
    return ours, sleep.pop(), default_busy, result


def test_ops_run_on_the_current_stream():
    """Each op launches on the caller's current stream: not the default stream (which is busy
    meanwhile, and which the op must not wait for) nor a stream of its own."""
    input, weight, bias = study_layer(torch.float32, torch.contiguous_format)
    expected = [t.clone() for t in cifarnet_work(input, weight, bias)]  # also warms cuDNN up
    side_streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for stream in side_streams:  # the allocator's blocks for each stream, outside the timing
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            cifarnet_work(input, weight, bias)
    torch.cuda.synchronize()
    seen = []
    for stream in side_streams:
        work = functools.partial(cifarnet_work, input, weight, bias)
        ours, default_id, default_busy, result = stream_ids_while_the_default_stream_sleeps(work, stream)
        assert default_id not in ours, "a cifarnet kernel ran on the default stream, not the current one"
        assert len(ours) == 1, f"cifarnet's kernels ran on {len(ours)} streams, not just the current one"
        assert default_busy, (
            "the default stream had finished its sleep before the side stream's work: "
            "the op waited for the default stream (or SLEEP_CYCLES is too short for this GPU)"
        )
        seen.append(ours.pop())
        for actual, reference in zip(result, expected):
            torch.testing.assert_close(actual, reference)
    assert seen[0] != seen[1], "two current streams, one stream id: the op launches on a stream of its own"


def test_mixed_devices_are_refused():
    input, weight, bias = study_layer(torch.float32, torch.contiguous_format)
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        conv2d_relu_max_pool2d(input, weight.cpu(), None, padding=2)


def test_the_batch_norm_backward_phase_ops_refuse_a_gradient_or_sums_on_another_device():
    # Called directly (autograd and synchronized batch norm pass matching devices), a CPU
    # gradient would reach the kernel as a host pointer.
    ops = torch.ops.cifarnet
    input = torch.randn(4, 3, 5, 5, device="cuda")
    mean, var = ops._batch_norm_stats(input)
    grad = torch.randn_like(input)
    sums = ops._batch_norm_backward_reduce(grad, input, mean)
    with pytest.raises(RuntimeError, match="grad_output is on cpu but input is on cuda"):
        ops._batch_norm_backward(grad.cpu(), input, mean, var, None, True, 1e-5, [True, True, True])
    with pytest.raises(RuntimeError, match="grad_output is on cpu but input is on cuda"):
        ops._batch_norm_backward_reduce(grad.cpu(), input, mean)
    with pytest.raises(RuntimeError, match="sum_dy is on cpu but input is on cuda"):
        ops._batch_norm_backward_elementwise(grad, input, mean, var, None, sums[0].cpu(), sums[1], 100, 1e-5)
    with pytest.raises(RuntimeError, match="grad_output dtype Double does not match input dtype Float"):
        ops._batch_norm_backward_reduce(grad.double(), input, mean)
