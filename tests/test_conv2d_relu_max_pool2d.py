"""cifarnet.ops.conv2d_relu_max_pool2d against the native conv2d -> relu -> max_pool2d."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings

import cifarnet
from cifarnet.ops import conv2d_relu_max_pool2d
from cifarnet._op_handles import CONV_BACKWARD_OP, WITH_ARGMAX_OP
from conftest import DEVICES, native_conv2d_relu_max_pool2d, peak_cpu_allocation
from op_cases import assert_same_layout, layer_cases, make_tensors, op_args, tolerances



@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=int(__import__("os").environ.get("CIFARNET_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=layer_cases())
def test_forward_and_gradients_match_native(case, device):
    input, weight, bias, generator = make_tensors(case, device)
    leaves = [t.detach().clone().requires_grad_() for t in (input, weight) + ((bias,) if bias is not None else ())]
    native_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    fused = conv2d_relu_max_pool2d(leaves[0], leaves[1], leaves[2] if bias is not None else None, **op_args(case))
    native = native_conv2d_relu_max_pool2d(
        native_leaves[0], native_leaves[1], native_leaves[2] if bias is not None else None, **op_args(case)
    )

    assert fused.shape == native.shape
    assert_same_layout(fused, native)
    torch.testing.assert_close(fused, native, equal_nan=True, **tolerances(case["dtype"]))

    grad_output = torch.randn(native.shape, generator=generator, dtype=case["dtype"]).to(device)
    if case["values"] == "integers":
        grad_output = grad_output.round()
    fused_grads = torch.autograd.grad(fused, leaves, grad_output)
    native_grads = torch.autograd.grad(native, native_leaves, grad_output)
    for name, ours, theirs in zip(("input", "weight", "bias"), fused_grads, native_grads):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"grad {name}: {m}", **tolerances(case["dtype"]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "batch, in_channels, out_channels, size",
    # the study's layers; a wide input whose kernel rows (5 x 64 values) span several register
    # blocks of the sparse backward
    [(64, 3, 32, 32), (40, 16, 32, 16), (9, 8, 24, 8), (6, 64, 8, 9)],
)
def test_larger_shapes_match_native(device, threads, dtype, batch, in_channels, out_channels, size):
    """Batches of several tiles, with one thread and with two."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_layer_matches_native(device, dtype, batch, in_channels, out_channels, size, torch.contiguous_format)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("forward", ["tiles", "samples"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2, 3, 5, 13])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_either_cpu_forward_matches_native(forward, threads, batch, memory_format, dtype, monkeypatch):
    """The CPU forward convolves tiles of the batch with every thread, or hands each thread
    chunks of whole samples in one parallel region; both must be right where the batch shares
    out unevenly (fewer samples than threads, odd counts) and in chunks of two samples."""
    in_channels, out_channels, size = 8, 16, 12
    conv_sample_bytes = out_channels * size * size * torch.empty((), dtype=dtype).element_size()
    monkeypatch.setenv("CIFARNET_CONV_FORWARD", forward)
    # tiles of 2 * threads samples: chunks of 2 per thread
    monkeypatch.setenv("CIFARNET_FORWARD_TILE_BYTES", str(2 * threads * conv_sample_bytes))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_layer_matches_native("cpu", dtype, batch, in_channels, out_channels, size, memory_format)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("forward", ["tiles", "samples"])
def test_either_cpu_forward_keeps_the_callers_dispatch_state(forward, monkeypatch):
    """The threads that convolve chunks of samples convolve in the caller's dispatch state: in
    inference mode nothing is recorded for autograd (an inference tensor saved for a weight
    that requires grad would raise: OpenMP's threads do not inherit the caller's thread-local
    state), and under autocast the output is bfloat16."""
    monkeypatch.setenv("CIFARNET_CONV_FORWARD", forward)
    monkeypatch.setenv("CIFARNET_FORWARD_TILE_BYTES", "1")  # chunks of one sample
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # channels last, as the kernel convolves with: the very tensor that requires grad
        weight = (0.1 * torch.randn(32, 32, 5, 5)).contiguous(memory_format=torch.channels_last).requires_grad_()
        with torch.inference_mode():
            # 16 chunks of about a millisecond each: the second thread takes some
            input = torch.randn(16, 32, 32, 32)
            fused = conv2d_relu_max_pool2d(input, weight, padding=2)
            native = native_conv2d_relu_max_pool2d(input, weight, padding=2)
        # Winograd's rounding where it runs (AVX2 CPUs), oneDNN's elsewhere
        torch.testing.assert_close(fused, native, rtol=1e-4, atol=1e-4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused = conv2d_relu_max_pool2d(input.clone(), weight, padding=2)
            native = native_conv2d_relu_max_pool2d(input.clone(), weight, padding=2)
        assert fused.dtype == torch.bfloat16
        torch.testing.assert_close(fused, native, rtol=2e-2, atol=2e-2)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, in_channels, out_channels, size", [(64, 3, 32, 32), (40, 16, 32, 16)])
def test_either_cpu_backward_matches_native(backward, memory_format, dtype, batch, in_channels, out_channels, size, monkeypatch):
    """The CPU picks the sparse or the dense backward per layer (channels-last layers with
    kernel rows under one vector go dense); both must be right in either layout."""
    monkeypatch.setenv("CIFARNET_CONV_BACKWARD", backward)
    assert_layer_matches_native("cpu", dtype, batch, in_channels, out_channels, size, memory_format)


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "pool",
    [
        dict(pool_size=3, pool_stride=2, pool_padding=1),  # a ResNet stem's: overlapping windows
        dict(pool_size=2, pool_padding=1),  # windows that tile, shifted by the padding
        dict(pool_size=(3, 4), pool_stride=(3, 5), pool_padding=(1, 2), ceil_mode=True),  # rows and columns in no window
    ],
    ids=["3x3s2p1", "2x2p1", "3x4s3x5p1x2-ceil"],
)
def test_either_cpu_backward_of_a_padded_pool_matches_native(backward, memory_format, dtype, pool, monkeypatch):
    """Padded windows through the sparse backward, the dense scatter and the channels-last
    dense writer of windows that do not overlap."""
    monkeypatch.setenv("CIFARNET_CONV_BACKWARD", backward)
    assert_layer_matches_native("cpu", dtype, 8, 16, 24, 15, memory_format, pool)


def assert_layer_matches_native(device, dtype, batch, in_channels, out_channels, size, memory_format, pool=None):
    generator = torch.Generator().manual_seed(batch)
    input = torch.randn(batch, in_channels, size, size, generator=generator, dtype=dtype)
    input = input.to(device).contiguous(memory_format=memory_format).requires_grad_()
    weight = (0.1 * torch.randn(out_channels, in_channels, 5, 5, generator=generator, dtype=dtype)).to(device)
    bias = torch.randn(out_channels, generator=generator, dtype=dtype).to(device).requires_grad_()
    weight = weight.contiguous(memory_format=memory_format).requires_grad_()
    fused = conv2d_relu_max_pool2d(input, weight, bias, padding=2, **(pool or {}))
    native = native_conv2d_relu_max_pool2d(input, weight, bias, padding=2, **(pool or {}))
    torch.testing.assert_close(fused, native, **tolerances(dtype))
    grad_output = torch.randn(native.shape, generator=generator, dtype=dtype).to(device)
    for ours, theirs in zip(
        torch.autograd.grad(fused, (input, weight, bias), grad_output),
        torch.autograd.grad(native, (input, weight, bias), grad_output),
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-3 if dtype == torch.float32 else 1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_the_first_maximum_and_nan_to_the_last(device):
    # A 1x1 identity convolution makes the pooled input exactly what we write here.
    x = torch.tensor([[[[3.0, 3.0, 1.0, math.nan], [2.0, 3.0, math.nan, 5.0]]]], device=device, requires_grad=True)
    weight = torch.ones(1, 1, 1, 1, device=device)
    out = conv2d_relu_max_pool2d(x, weight, pool_size=2)
    out.backward(torch.tensor([[[[10.0, 20.0]]]], device=device))
    assert out[0, 0, 0, 0].item() == 3.0 and math.isnan(out[0, 0, 0, 1].item())
    expected = torch.tensor([[[[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 20.0, 0.0]]]], device=device)
    native_x = x.detach().clone().requires_grad_()
    native_conv2d_relu_max_pool2d(native_x, weight, pool_size=2).backward(torch.tensor([[[[10.0, 20.0]]]], device=device))
    torch.testing.assert_close(native_x.grad, expected)  # the rule we claim is native's
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_only_input_parameters_and_one_byte_argmax(device):
    input = torch.randn(4, 3, 16, 16, device=device, requires_grad=True)
    weight = torch.randn(8, 3, 5, 5, device=device, requires_grad=True)
    bias = torch.randn(8, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = conv2d_relu_max_pool2d(input, weight, bias, padding=2)
    kinds = sorted((str(t.dtype), tuple(t.shape)) for t in saved)
    # The parameters are the module's own tensors (no memory of their own); the bias is for a
    # differentiable backward, which recomputes the convolution.
    expected = [(torch.float32, input.shape), (torch.float32, weight.shape), (torch.float32, bias.shape), (torch.uint8, out.shape)]
    assert kinds == sorted((str(dtype), tuple(shape)) for dtype, shape in expected)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    input = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    bias = torch.randn(4, device=device, requires_grad=True)
    out = conv2d_relu_max_pool2d(input, weight, bias, padding=1)
    assert out.shape == (0, 4, 4, 4)
    out.sum().backward()
    assert input.grad.shape == input.shape
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and torch.equal(bias.grad, torch.zeros_like(bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(stride=1, padding=1, pool_size=2, pool_stride=None, ceil_mode=False),
        dict(stride=2, padding=2, pool_size=(3, 2), pool_stride=(2, 1), ceil_mode=True),
        dict(stride=(1, 2), padding=(0, 1), pool_size=3, pool_stride=1, ceil_mode=False),
        # padded pools: a ResNet stem's 3x3/2 pad 1, and a ceil-mode pool padded on one side only
        dict(stride=1, padding=1, pool_size=3, pool_stride=2, ceil_mode=False, pool_padding=1),
        dict(stride=1, padding=0, pool_size=(2, 4), pool_stride=(3, 2), ceil_mode=True, pool_padding=(1, 2)),
    ],
)
def test_gradcheck_float64(device, bias, geometry):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=generator).to(device).requires_grad_()
    bias_tensor = torch.randn(4, dtype=torch.float64, generator=generator).to(device).requires_grad_() if bias else None
    inputs = (input, weight) + ((bias_tensor,) if bias else ())

    def fn(*tensors):
        return conv2d_relu_max_pool2d(tensors[0], tensors[1], tensors[2] if bias else None, **geometry)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def opcheck_samples(device):
    generator = torch.Generator().manual_seed(1)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64):
            input = torch.randn(3, 4, 10, 9, dtype=dtype, generator=generator).to(device).contiguous(memory_format=memory_format)
            weight = torch.randn(6, 4, 3, 3, dtype=dtype, generator=generator).to(device)
            bias = torch.randn(6, dtype=dtype, generator=generator).to(device)
            yield (input.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), [1, 1], [1, 1], [2, 2], [], False, [0, 0])
            yield (input.detach(), weight.detach().requires_grad_(), None, [2, 1], [0, 2], [3, 2], [2, 2], True, [0, 0])
            yield (input.requires_grad_(), weight.detach(), bias.detach(), [1, 1], [1, 1], [3, 3], [2, 2], True, [1, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in opcheck_samples(device):
        torch.library.opcheck(WITH_ARGMAX_OP, args)
        output, argmax = WITH_ARGMAX_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        grad_output = torch.randn_like(output)
        input, weight = args[0].detach(), args[1].detach()
        torch.library.opcheck(
            CONV_BACKWARD_OP, (grad_output, input, weight, argmax, *args[3:], [True, True, args[2] is not None])
        )
        torch.library.opcheck(CONV_BACKWARD_OP, (grad_output, input, weight, argmax, *args[3:], [False, True, False]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()
    layer = cifarnet.nn.Conv2dReLUMaxPool2d(3, 8, 3, padding=1, pool_size=3, ceil_mode=True, pool_padding=1).to(device)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for batch in (4, 6):
        input = torch.randn(batch, 3, 11, 11, device=device, requires_grad=True)
        expected = layer(input)
        (expected_grad,) = torch.autograd.grad(expected.sum(), input)
        actual = compiled(input)
        (actual_grad,) = torch.autograd.grad(actual.sum(), input)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(actual_grad, expected_grad)


def _bad_input_cases():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    return [
        ("2-D input", dict(input=torch.randn(8, 8)), RuntimeError, "input must be a 3-D (unbatched) or 4-D (batched) tensor, got 2-D"),
        ("5-D input", dict(input=torch.randn(2, 3, 8, 8, 1)), RuntimeError, "input must be a 3-D (unbatched) or 4-D (batched) tensor, got 5-D"),
        ("5-D weight", dict(weight=torch.randn(4, 3, 3, 3, 1)), RuntimeError, "weight must be a 4-D tensor"),
        ("channel mismatch", dict(input=torch.randn(2, 5, 8, 8)), RuntimeError, "input has 5 channels"),
        # native conv2d returns 0 output channels here, whatever the weight's 4
        ("no input channels", dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(4, 0, 3, 3)), RuntimeError,
         "weight must have at least one input channel, got shape [4, 0, 3, 3]"),
        ("no output channels", dict(weight=torch.randn(0, 3, 3, 3), bias=torch.randn(0)), RuntimeError,
         "weight must have at least one output channel, got shape [0, 3, 3, 3]"),
        ("dtype mismatch", dict(weight=w.double()), RuntimeError, "weight dtype Double does not match input dtype Float"),
        ("integer input", dict(input=x.long(), weight=w.long()), RuntimeError, "input must be float32, float64, float16 or bfloat16, got Long"),
        ("mixed 16-bit dtypes", dict(input=x.half(), weight=w.bfloat16()), RuntimeError, "weight dtype BFloat16 does not match input dtype Half"),
        ("bias shape", dict(bias=torch.randn(5)), RuntimeError, "bias must be a 1-D tensor of 4 elements"),
        ("weight too large", dict(weight=torch.randn(4, 3, 11, 3)), RuntimeError, "weight kernel 11x3 is larger than the padded input 8x8"),
        ("zero stride", dict(stride=0), RuntimeError, "stride must be positive, got [0, 0]"),
        ("negative padding", dict(padding=(1, -1)), RuntimeError, "padding must be non-negative, got [1, -1]"),
        ("zero pool size", dict(pool_size=(0, 2)), RuntimeError, "pool_size must be positive, got [0, 2]"),
        ("zero pool stride", dict(pool_stride=0), RuntimeError, "pool_stride must be positive, got [0, 0]"),
        ("pool window of 256", dict(input=torch.randn(1, 3, 20, 20), pool_size=16), RuntimeError, "has 256 elements; at most 255"),
        # sizes whose products and sums would overflow int64
        ("pool window of 2**64", dict(pool_size=2**32, pool_stride=2, ceil_mode=True), RuntimeError, "pool_size [4294967296, 4294967296] has more than 255 elements"),
        ("pool stride over max_pool2d's", dict(pool_stride=2**63 - 1, ceil_mode=True), RuntimeError, "pool_stride must be at most 2147483647"),
        ("padding over int64", dict(padding=2**62), RuntimeError, "padding [4611686018427387904, 4611686018427387904] is too large"),
        ("pool larger than conv output", dict(pool_size=7), RuntimeError, "pool_size [7, 7] is larger than the convolution output 6x6"),
        # max_pool2d's limit, and its exception type
        ("pool padding over half the window", dict(pool_size=(3, 2), pool_padding=(1, 2)), RuntimeError,
         "pool_padding should be at most half of pool_size, got pool_padding=[1, 2] and pool_size=[3, 2]"),
        ("negative pool padding", dict(pool_size=3, pool_padding=(-1, 0)), RuntimeError, "pool_padding must be non-negative, got [-1, 0]"),
        ("three-element pool padding", dict(pool_padding=(1, 1, 1)), RuntimeError, "pool_padding must be an int or a pair"),
        # a RuntimeError, as F.conv2d raises it
        ("three-element stride", dict(stride=(1, 1, 1)), RuntimeError, "stride must be an int or a pair"),
        ("float padding", dict(padding=1.5), TypeError, "padding must be an int or a pair"),
        # F.max_pool2d takes a bool alone
        ("integer ceil_mode", dict(ceil_mode=1), TypeError, "ceil_mode must be bool, not int"),
        ("string ceil_mode", dict(ceil_mode="yes"), TypeError, "ceil_mode must be bool, not str"),
        ("device mismatch", dict(weight=w.to("meta")), RuntimeError, "meta"),
    ]


@pytest.mark.parametrize("name, overrides, error, message", _bad_input_cases(), ids=[c[0] for c in _bad_input_cases()])
def test_bad_input_raises_a_clear_error(name, overrides, error, message):
    args = dict(input=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bias=None)
    args.update(overrides)
    with pytest.raises(error, match=None) as info:
        conv2d_relu_max_pool2d(**args)
    assert message in str(info.value), str(info.value)


def test_one_element_sizes_and_an_empty_pool_stride_read_as_native_reads_them():
    input, weight = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    out = conv2d_relu_max_pool2d(input, weight, stride=(1,), padding=[1], pool_size=[3], pool_stride=[], pool_padding=(1,))
    native = F.max_pool2d(F.relu(F.conv2d(input, weight, stride=(1,), padding=[1])), [3], [], (1,))
    torch.testing.assert_close(out, native)


def test_pool_window_of_255_elements_is_accepted():
    # 15 x 17 = 255: the largest window the one-byte argmax can address.
    input = torch.randn(1, 2, 20, 20, requires_grad=True)
    weight = torch.randn(3, 2, 3, 3)
    out = conv2d_relu_max_pool2d(input, weight, pool_size=(15, 17), pool_stride=(2, 3))
    native = native_conv2d_relu_max_pool2d(input, weight, pool_size=(15, 17), pool_stride=(2, 3))
    torch.testing.assert_close(out, native)
    grad = torch.randn_like(native)
    torch.testing.assert_close(torch.autograd.grad(out, input, grad)[0], torch.autograd.grad(native, input, grad)[0])


def test_backward_op_rejects_inconsistent_saved_tensors():
    input, weight = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    geometry = ([1, 1], [1, 1], [2, 2], [], False, [0, 0])
    output, argmax = WITH_ARGMAX_OP(input, weight, None, *geometry)
    with pytest.raises(RuntimeError, match=r"argmax must have shape \[2, 4, 4, 4\]"):
        CONV_BACKWARD_OP(torch.ones_like(output), input, weight, argmax[:1], *geometry, [True, True, True])
    with pytest.raises(RuntimeError, match="argmax must be uint8"):
        CONV_BACKWARD_OP(torch.ones_like(output), input, weight, argmax.long(), *geometry, [True, True, True])


def test_build_info_reports_the_build():
    info = cifarnet.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    # CUDA kernels are what the dispatcher holds for the ops, not what the build says of itself.
    registered = torch._C._dispatch_has_kernel_for_dispatch_key("cifarnet::conv2d_relu_max_pool2d_with_argmax", "CUDA")
    assert info["cuda"] is registered and (info["cuda_version"] is None) is not registered
    assert info["cpu_isa"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_overlapping_windows_sum_their_gradients_in_float_and_in_order(device, dtype):
    """All nine 3x3 windows at stride 1 over a 5x5 plane pick its single positive centre; its
    gradient is their nine pooled gradients summed in float and rounded once (as native's CUDA
    kernel sums them; native's CPU kernel adds in the storage dtype and is further off), not
    added one by one in 16 bits, and the same on every run."""
    input = torch.zeros(1, 1, 5, 5, dtype=dtype, device=device)
    input[0, 0, 2, 2] = 5
    weight = torch.ones(1, 1, 1, 1, dtype=dtype, device=device)
    # 1024 + 8 * 0.4 = 1027.2: one rounding gives 1027 in float16 (1028 in bfloat16), while
    # adding 0.4 to 1024 in 16 bits, term by term, leaves 1024.
    grad = torch.full((1, 1, 3, 3), 0.4, dtype=dtype, device=device)
    grad[0, 0, 0, 0] = 1024
    results = []
    for _ in range(2):
        leaf = input.clone().requires_grad_()
        (ours,) = torch.autograd.grad(conv2d_relu_max_pool2d(leaf, weight, pool_size=3, pool_stride=1), leaf, grad)
        results.append(ours)
    exact = grad.double().sum()  # of the terms as stored
    expected = torch.zeros_like(input)
    expected[0, 0, 2, 2] = exact.to(dtype)
    torch.testing.assert_close(results[0], expected, rtol=1e-6, atol=0)  # float32: a few roundings
    if dtype != torch.float32:
        assert torch.equal(results[0], expected)
    assert torch.equal(results[0], results[1])
    if device == "cuda":
        leaf = input.clone().requires_grad_()
        (native,) = torch.autograd.grad(native_conv2d_relu_max_pool2d(leaf, weight, pool_size=3, pool_stride=1), leaf, grad)
        torch.testing.assert_close(results[0], native, rtol=1e-6, atol=0)


def test_sparse_backward_memory_does_not_grow_with_threads():
    # The weight gradient of the sparse backward is split by output channel between threads:
    # with 16 threads the backward allocates what it does with one, not a weight gradient per
    # thread (a 512->512 3x3 layer on 64 cores once took 600 MB). Oversubscribed here, but the
    # allocation is what counts.
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(4, 64, 4, 4, generator=generator, requires_grad=True)
    weight = (torch.randn(128, 64, 3, 3, generator=generator) * 0.1).requires_grad_()
    output = conv2d_relu_max_pool2d(input, weight, None, padding=1)
    grad_output = torch.randn(output.shape, generator=generator)
    threads = torch.get_num_threads()
    peaks = {}
    try:
        for count in (1, 16):
            torch.set_num_threads(count)
            peaks[count] = peak_cpu_allocation(lambda: torch.autograd.grad(output, (input, weight), grad_output, retain_graph=True))
    finally:
        torch.set_num_threads(threads)
    weight_bytes = weight.numel() * weight.element_size()
    assert peaks[16] <= peaks[1] + weight_bytes // 4, f"peak allocation with 1 and 16 threads: {peaks}, weight {weight_bytes} bytes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_backward_is_the_same_bits_however_threads_share_it(dtype, monkeypatch):
    # The sparse backward's threads take samples (input gradient) and chunks of output channels
    # (weight gradient) as they come free, so a thread slowed by another process takes fewer;
    # each sample and each channel is still summed by one thread in one order, so the gradients
    # are the same bits with 1, 2 or 3 threads and from run to run. 24 samples of 16 channels
    # are several L2 tiles of the weight gradient on any CPU with at most 1 MiB of L2.
    monkeypatch.setenv("CIFARNET_CONV_BACKWARD", "sparse")
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(24, 16, 14, 14, generator=generator).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (0.1 * torch.randn(32, 16, 5, 5, generator=generator)).to(dtype)
    input.requires_grad_()
    weight.requires_grad_()
    output = conv2d_relu_max_pool2d(input, weight, None, padding=2)
    grad_output = torch.randn(output.shape, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2, 3, 2, 3):
            torch.set_num_threads(count)
            grads.append(torch.autograd.grad(output, (input, weight), grad_output, retain_graph=True))
    finally:
        torch.set_num_threads(threads)
    for count, other in zip((2, 3, 2, 3), grads[1:]):
        for name, ours, first in zip(("input", "weight"), other, grads[0]):
            assert torch.equal(ours, first), f"grad {name} with {count} threads differs from 1 thread's"


SPARSE_BACKWARD_SCRIPT = r"""
import torch, cifarnet
from cifarnet.ops import conv2d_relu_max_pool2d
from conftest import native_conv2d_relu_max_pool2d
assert cifarnet.build_info()["cpu_isa"].startswith(%r), cifarnet.build_info()["cpu_isa"]
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
# Kernel rows of kW * C_in = 9, 15 or 20 values: a partial vector ends every row. Padded pools
# (a ResNet stem's; one with 19 channels, a whole vector and a remainder) through the pooling
# loops too.
for dtype in (torch.float32, torch.float64):
    for in_channels, out_channels, kernel, padding, pool in (
        (3, 7, 3, 1, {}), (3, 7, 5, 2, {}), (5, 7, 4, 1, {}),
        (3, 19, 3, 1, dict(pool_size=3, pool_stride=2, pool_padding=1)),
        (5, 16, 3, 1, dict(pool_size=(2, 4), pool_stride=(3, 4), pool_padding=(1, 2), ceil_mode=True)),
    ):
      for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(5, in_channels, 10, 10, generator=g, dtype=dtype).contiguous(memory_format=memory_format)
        w = torch.randn(out_channels, in_channels, kernel, kernel, generator=g, dtype=dtype)
        ours = [t.clone().requires_grad_() for t in (x, w)]
        native = [t.clone().requires_grad_() for t in (x, w)]
        out = conv2d_relu_max_pool2d(*ours, None, padding=padding, **pool)
        ref = native_conv2d_relu_max_pool2d(*native, None, padding=padding, **pool)
        torch.testing.assert_close(out, ref)
        grad = torch.randn(out.shape, generator=g, dtype=dtype)
        out.backward(grad)
        ref.backward(grad)
        for a, b in zip(ours, native):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4 if dtype == torch.float32 else 1e-7, atol=1e-4 if dtype == torch.float32 else 1e-7)
print("ok")
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_sparse_backward_without_avx512_matches_native(isa):
    """The AVX2 and baseline variants of the sparse backward's loops (their partial-vector
    loads included) on a CPU that also has AVX-512: CIFARNET_CPU_ISA caps the variant."""
    env = dict(os.environ, CIFARNET_CPU_ISA=isa, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", SPARSE_BACKWARD_SCRIPT % isa], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


BAD_SETTING_SCRIPT = """
import torch, cifarnet
input, weight = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3)
try:
    cifarnet.ops.conv2d_relu_max_pool2d(input, weight).sum().backward()
except ValueError as error:
    print(error)
"""


@pytest.mark.parametrize(
    "variable, value, accepted",
    [
        ("CIFARNET_CPU_ISA", "AVX2", "avx512, avx2, baseline"),  # ONEDNN_MAX_CPU_ISA's spelling
        ("CIFARNET_CONV_BACKWARD", "Sparse", "sparse, dense"),
        ("CIFARNET_CONV_FORWARD", "sample", "samples, tiles"),
    ],
)
def test_a_bad_setting_is_refused_not_ignored(variable, value, accepted):
    """In a fresh process (the instruction-set cap is read once per process): a typo must not
    leave the default in force while the user believes they measure the setting."""
    env = dict(os.environ, **{variable: value})
    result = subprocess.run([sys.executable, "-c", BAD_SETTING_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert f"{variable} must be one of {accepted} (or unset), got '{value}'" in result.stdout, result.stdout + result.stderr[-3000:]


def test_no_input_channels_are_refused_by_the_fake_kernels_too():
    """As by the CPU kernel (the bad-input cases above): native conv2d would return 0 output
    channels, which no fused op can match."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        input, weight = torch.empty(2, 0, 8, 8), torch.empty(4, 0, 3, 3)
        with pytest.raises(RuntimeError, match=r"weight must have at least one input channel, got shape \[4, 0, 3, 3\]"):
            torch.ops.cifarnet.conv2d_relu_max_pool2d_with_argmax(input, weight)
        with pytest.raises(RuntimeError, match="weight must have at least one input channel"):
            torch.ops.cifarnet._batch_norm_relu_conv2d_training(input, None, None, weight, None, 1e-5, [1, 1], [0, 0])
