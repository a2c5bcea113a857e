"""CUDA-only behaviour: float16/bfloat16, autocast and streams (skipped without a GPU).

Everything else about the CUDA kernels is covered by the op tests, which run on every device
in conftest.DEVICES.
"""

from __future__ import annotations

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
    weight = torch.rand(32, device="cuda") + 0.5
    bias = torch.randn(32, device="cuda")
    stats = [torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")]
    native_stats = [t.clone() for t in stats]
    ours = batch_norm(input, *stats, weight, bias, training=True)
    native = F.batch_norm(input, *native_stats, weight, bias, training=True)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, native, **tolerance(dtype))
    for mine, theirs in zip(stats, native_stats):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)
    grad = torch.randn_like(native)
    torch.testing.assert_close(torch.autograd.grad(ours, input, grad)[0], torch.autograd.grad(native, input, grad)[0], **tolerance(dtype))


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


def test_ops_run_on_the_current_stream():
    input, weight, bias = study_layer(torch.float32, torch.contiguous_format)
    expected = native_conv2d_relu_max_pool2d(input, weight, bias, padding=2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # queue work behind work, then read only after the stream is done
            actual = conv2d_relu_max_pool2d(input, weight, bias, padding=2)
    stream.synchronize()
    torch.testing.assert_close(actual, expected)


def test_mixed_devices_are_refused():
    input, weight, bias = study_layer(torch.float32, torch.contiguous_format)
    with pytest.raises(RuntimeError, match="weight is on cpu but input is on cuda"):
        conv2d_relu_max_pool2d(input, weight.cpu(), None, padding=2)
