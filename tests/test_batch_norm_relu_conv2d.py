"""cifarnet.ops.batch_norm_relu_conv2d and its module against native F.batch_norm -> F.relu -> F.conv2d
and nn.BatchNorm2d -> nn.ReLU -> nn.Conv2d."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from cifarnet._timing import saved_tensor_bytes
from cifarnet.nn import BatchNormReLUConv2d
from cifarnet.ops import batch_norm_relu_conv2d
from cifarnet._op_handles import BN_RELU_CONV_TRAINING_BACKWARD_OP, BN_RELU_CONV_TRAINING_OP
from conftest import DEVICES, TRAINING_EPS_MESSAGE
from op_cases import assert_no_worse_than_native, assert_same_layout, every_weight_element_sees_input

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))
NAMES = ["input", "bn_weight", "bn_bias", "weight", "bias"]

pytestmark = pytest.mark.usefixtures("one_thread")


def native_chain(input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, momentum, eps, stride, padding):
    normalised = F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.conv2d(F.relu(normalised), weight, bias, stride, padding)


@st.composite
def chain_cases(draw):
    """A valid BN -> ReLU -> conv geometry, layouts, dtype, value pattern and batch-norm setup."""
    case = dict(
        batch=draw(st.integers(0, 4)),
        in_channels=draw(st.sampled_from([1, 2, 3, 8])),
        out_channels=draw(st.integers(1, 5)),
        size=(draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        kernel=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        bias=draw(st.booleans()),
        input_channels_last=draw(st.booleans()),
        weight_channels_last=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        values=draw(st.sampled_from(["normal", "integers", "negative", "zeros"])),
        training=draw(st.booleans()),
        bn_affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.9])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    assume(all(k <= s + 2 * p for k, s, p in zip(case["kernel"], case["size"], case["padding"])))
    if case["training"]:
        # Native's own rule: more than one value per channel, or an empty batch.
        assume(case["batch"] * case["size"][0] * case["size"][1] != 1)
    if case["dtype"] == torch.bfloat16:
        assume(every_weight_element_sees_input(case))
    case["running_stats"] = draw(st.booleans()) or not case["training"]
    return case


def chain_tensors(case, device):
    """input, running statistics, bn_weight, bn_bias, weight, bias (float64, to be cast) and a
    generator for the output gradient. "integers" makes exact sums: the batch mean is exact and
    normalised values tie at zero, the ReLU's kink; "negative" shifts the batch norm's output
    down so that most of it is rectified away; "zeros" makes constant channels (zero variance)."""
    generator = torch.Generator().manual_seed(case["seed"])
    channels, kind = case["in_channels"], case["values"]

    def draw(*shape):
        if kind == "integers":
            return torch.randint(-2, 3, shape, generator=generator).double()
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    input = draw(case["batch"], channels, *case["size"])
    if kind == "zeros":
        input.zero_()
    weight = draw(case["out_channels"], channels, *case["kernel"])
    bias = draw(case["out_channels"]) if case["bias"] else None
    bn_weight = 0.5 + torch.rand(channels, generator=generator, dtype=torch.float64) if case["bn_affine"] else None
    bn_bias = draw(channels) if case["bn_affine"] else None
    if kind == "negative":
        bn_bias = -1.0 - torch.rand(channels, generator=generator, dtype=torch.float64)
    running = (draw(channels), 0.5 + torch.rand(channels, generator=generator, dtype=torch.float64)) if case["running_stats"] else None
    if case["input_channels_last"]:
        input = input.contiguous(memory_format=torch.channels_last)
    if case["weight_channels_last"]:
        weight = weight.contiguous(memory_format=torch.channels_last)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return [move(t) for t in (input, bn_weight, bn_bias, weight, bias)], running and [move(t) for t in running], generator


def run_chain(function, tensors, running, case, dtype, grad_output):
    """Output, updated running statistics (copies: each run has its own) and gradients of the
    given tensors, in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
    stats = [t.to(dtype, copy=True) for t in running] if running else [None, None]
    # The batch norm's parameters and statistics of 16-bit data in float32, as autocast leaves them.
    if dtype == torch.bfloat16:
        leaves[1:3] = [t.detach().float().requires_grad_() if t is not None else None for t in leaves[1:3]]
        stats = [t.float() if t is not None else None for t in stats]
    output = function(
        leaves[0], stats[0], stats[1], leaves[1], leaves[2], leaves[3], leaves[4],
        case["training"], case["momentum"], 1e-5, case["stride"], case["padding"],
    )
    given = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(output, given, grad_output(output).to(output.dtype)) if output.numel() else [torch.zeros_like(t) for t in given]
    return output, stats, list(grads)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=chain_cases())
def test_forward_gradients_and_running_stats_match_native(case, device):
    """Output, running statistics and every gradient no further from float64 than native's in
    the case's dtype (the same data, rounded to it), in native's layout."""
    tensors, running, generator = chain_tensors(case, device)
    tensors = [t.to(case["dtype"]).double() if t is not None else None for t in tensors]  # the data the dtype can hold
    cache = {}

    def grad_output(output):
        if "grad" not in cache:
            cache["grad"] = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(device)
        return cache["grad"]

    ours = run_chain(batch_norm_relu_conv2d, tensors, running, case, case["dtype"], grad_output)
    native = run_chain(native_chain, tensors, running, case, case["dtype"], grad_output)
    exact = run_chain(native_chain, tensors, running, case, torch.float64, grad_output)
    assert ours[0].shape == native[0].shape and ours[0].dtype == native[0].dtype
    assert_same_layout(ours[0], native[0])
    tolerance = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    }[case["dtype"]]
    assert_no_worse_than_native(ours[0], native[0], exact[0], "output", **tolerance)
    for name, mine, theirs, reference in zip(("running_mean", "running_var"), ours[1], native[1], exact[1]):
        if mine is not None:
            assert_no_worse_than_native(mine, theirs, reference, name, **tolerance)
    present = [name for name, t in zip(NAMES, tensors) if t is not None]
    for name, mine, theirs, reference in zip(present, ours[2], native[2], exact[2]):
        assert mine.dtype == theirs.dtype, f"grad {name}: dtype {mine.dtype}, native {theirs.dtype}"
        if mine.dim() == 4:
            assert_same_layout(mine, theirs)
        assert_no_worse_than_native(mine, theirs, reference, f"grad {name}", **tolerance)


def test_ties_at_the_relu_kink_take_native_side():
    """Integer data whose normalised values are exactly zero: the ReLU passes no gradient there,
    in the forward's mask and the backward's recomputed one alike."""
    input = torch.tensor([-1.0, 0.0, 1.0, 0.0]).reshape(2, 1, 2, 1).repeat(1, 2, 1, 1).requires_grad_()
    weight = torch.ones(3, 2, 1, 1, requires_grad=True)
    ours = batch_norm_relu_conv2d(input, None, None, None, None, weight, training=True)
    native = native_chain(input, None, None, None, None, weight, None, True, 0.1, 1e-5, 1, 0)
    torch.testing.assert_close(ours, native)
    grad = torch.arange(ours.numel(), dtype=torch.float32).reshape(ours.shape)
    for mine, theirs in zip(torch.autograd.grad(ours, [input, weight], grad), torch.autograd.grad(native, [input, weight], grad)):
        torch.testing.assert_close(mine, theirs)


def test_relu_takes_no_pass_of_its_own():
    """The ReLU is fused into the batch norm's passes: no relu in the forward or in the
    backward's recomputation, no threshold_backward (the ReLU's gradient) in the backward."""
    input = torch.randn(2, 3, 6, 6, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        output = batch_norm_relu_conv2d(input, None, None, None, None, weight, training=True, padding=1)
        torch.autograd.grad(output.sum(), [input, weight])
    names = {event.key for event in profile.key_averages()}
    # The profiler sees the ops the op's kernels call.
    assert {"cifarnet::_batch_norm_forward", "cifarnet::_batch_norm_backward"} <= names, names
    assert not names & {"aten::relu", "aten::relu_", "aten::clamp_min", "aten::clamp_min_", "aten::threshold_backward"}, names


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck_float64(device, training):
    generator = torch.Generator().manual_seed(5)

    def draw(*shape, offset=0.0):
        return (offset + torch.randn(shape, dtype=torch.float64, generator=generator)).to(device)

    tensors = (draw(3, 2, 6, 5), draw(2, offset=1.0), draw(2), draw(4, 2, 3, 3), draw(4))
    running_mean, running_var = draw(2), draw(2).abs() + 0.5

    def fn(input, bn_weight, bn_bias, weight, bias):
        return batch_norm_relu_conv2d(
            input, running_mean.clone(), running_var.clone(), bn_weight, bn_bias, weight, bias,
            training=training, stride=(2, 1), padding=1,
        )

    # Deterministic cuDNN: gradcheck wants bitwise-equal backward runs.
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False):
        inputs = tuple(t.requires_grad_() for t in tensors)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)
        assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    generator = torch.Generator().manual_seed(6)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64):
            def draw(*shape):
                return torch.randn(shape, dtype=dtype, generator=generator).to(device)

            input = draw(3, 4, 9, 8).contiguous(memory_format=memory_format).requires_grad_()
            weight = draw(6, 4, 3, 3).requires_grad_()
            bias, bn_weight, bn_bias = draw(6), draw(4).requires_grad_(), draw(4)
            for stride, padding in (([1, 1], [1, 1]), ([2, 1], [0, 2])):
                args = (input, bn_weight, bn_bias, weight, bias, 1e-5, stride, padding)
                torch.library.opcheck(BN_RELU_CONV_TRAINING_OP, args)
                output, save_mean, save_var = BN_RELU_CONV_TRAINING_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
                backward_args = (torch.randn_like(output), input.detach(), save_mean, save_var, bn_weight.detach(), bn_bias, weight.detach(), 1e-5, stride, padding)
                torch.library.opcheck(BN_RELU_CONV_TRAINING_BACKWARD_OP, (*backward_args, [True, True, True, True, True]))
                torch.library.opcheck(BN_RELU_CONV_TRAINING_BACKWARD_OP, (*backward_args, [False, True, False, True, False]))
                for training in (True, False):
                    running = [draw(4), draw(4).abs() + 0.5]
                    public_args = (input, *running, bn_weight, bn_bias, weight, bias, training, 0.1, 1e-5, stride, padding)
                    torch.library.opcheck(torch.ops.cifarnet.batch_norm_relu_conv2d.default, public_args)


def test_meta_tensors_get_shapes_and_layouts():
    """Meta tensors (the fake kernels, which register_fake also makes the ops' Meta kernels)."""
    input = torch.empty(2, 3, 7, 6, device="meta").contiguous(memory_format=torch.channels_last)
    weight, bn = torch.empty(5, 3, 3, 3, device="meta"), torch.empty(3, device="meta")
    output, save_mean, save_var = BN_RELU_CONV_TRAINING_OP(input, bn, bn, weight, None, 1e-5, [2, 1], [1, 0])
    assert output.shape == (2, 5, 4, 4) and output.is_contiguous(memory_format=torch.channels_last)
    grads = BN_RELU_CONV_TRAINING_BACKWARD_OP(torch.empty_like(output), input, save_mean, save_var, bn, bn, weight, 1e-5, [2, 1], [1, 0], [True] * 5)
    assert [tuple(g.shape) for g in grads] == [(2, 3, 7, 6), (3,), (3,), (5, 3, 3, 3), (5,)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(0)

    def draw(*shape, offset=0.0):
        return (offset + torch.randn(shape, generator=generator)).to(device)

    bn_weight, bn_bias, weight = draw(3, offset=1.0), draw(3), draw(8, 3, 3, 3)

    def chain(input, running_mean, running_var, training):
        return batch_norm_relu_conv2d(input, running_mean, running_var, bn_weight, bn_bias, weight, None, training, 0.1, 1e-5, 1, 1)

    compiled = torch.compile(chain, fullgraph=True, dynamic=dynamic)
    eager_stats, compiled_stats = [torch.zeros(3, device=device), torch.ones(3, device=device)], [torch.zeros(3, device=device), torch.ones(3, device=device)]
    for training in (True, False):
        for batch in (4, 6):
            input = draw(batch, 3, 11, 11).requires_grad_()
            expected, actual = chain(input, *eager_stats, training), compiled(input, *compiled_stats, training)
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(torch.autograd.grad(actual.sum(), input)[0], torch.autograd.grad(expected.sum(), input)[0])
    for ours, theirs in zip(compiled_stats, eager_stats):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_in_channels_last_out(device):
    input = torch.randn(2, 4, 8, 8, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    output = batch_norm_relu_conv2d(input, None, None, None, None, weight, training=True, padding=1)
    assert output.is_contiguous(memory_format=torch.channels_last)
    grad_input, grad_weight = torch.autograd.grad(output.sum(), [input, weight])
    native = native_chain(input, None, None, None, None, weight, None, True, 0.1, 1e-5, 1, 1)
    native_grads = torch.autograd.grad(native.sum(), [input, weight])
    assert grad_input.is_contiguous(memory_format=torch.channels_last)
    for mine, theirs in zip((output, grad_input, grad_weight), (native, *native_grads)):
        assert_same_layout(mine, theirs)
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_saves_the_rectified_tensor_fewer_than_native(device):
    """Native keeps, for the backward of BN -> ReLU -> conv: the batch norm's input and
    parameters, its running statistics and its batch mean and inverse std (float32), the
    rectified tensor (the ReLU's output, which the convolution reads as its input too) and the
    convolution's weight. The op keeps the same input and parameters and its batch mean and
    variance in the statistics dtype, and not the rectified tensor."""
    batch, channels, size, out_channels = 4, 8, 10, 6
    input = torch.randn(batch, channels, size, size, device=device, requires_grad=True)
    bn_weight, bn_bias = (torch.randn(channels, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(out_channels, channels, 3, 3, device=device, requires_grad=True)
    running = [torch.zeros(channels, device=device), torch.ones(channels, device=device)]

    def call(function):
        return lambda: function(input, *running, bn_weight, bn_bias, weight, None, True, 0.1, 1e-5, 1, 1)

    rectified_bytes = input.numel() * input.element_size()
    per_channel = channels * input.element_size()
    native_stats = 2 * per_channel  # save_mean and save_invstd, float32
    native_running = 2 * per_channel  # native batch norm's backward keeps the running statistics
    our_stats = 2 * channels * torch.empty(0, dtype=torch.float64 if device == "cpu" else torch.float32).element_size()
    our_bn_bias = per_channel  # the recomputation's shift; native's backward needs no bias
    expected = rectified_bytes + native_stats + native_running - our_stats - our_bn_bias
    assert saved_tensor_bytes(call(native_chain)) - saved_tensor_bytes(call(batch_norm_relu_conv2d)) == expected


def test_autocast_cpu_keeps_a_float32_batch_norm_and_casts_the_convolution_as_native():
    # Native runs batch norm and ReLU on the float32 input and the convolution in bfloat16: the
    # op must give the same values, gradients and running statistics, not normalise a rounded input.
    torch.manual_seed(0)
    input = torch.randn(4, 3, 8, 8, requires_grad=True)
    weight = torch.randn(5, 3, 3, 3, requires_grad=True)
    bn_weight, bn_bias = torch.rand(3, requires_grad=True) + 0.5, torch.randn(3, requires_grad=True)
    runs = [(torch.zeros(3), torch.ones(3)), (torch.zeros(3), torch.ones(3))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = batch_norm_relu_conv2d(input, *runs[0], bn_weight, bn_bias, weight, training=True, padding=1)
        native = native_chain(input, *runs[1], bn_weight, bn_bias, weight, None, True, 0.1, 1e-5, 1, 1)
    assert ours.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(ours, native, rtol=0, atol=0)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    for mine, theirs in zip(torch.autograd.grad(ours, [input, weight, bn_weight, bn_bias], grad),
                            torch.autograd.grad(native, [input, weight, bn_weight, bn_bias], grad)):
        assert mine.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    for mine, theirs in zip(*runs):
        torch.testing.assert_close(mine, theirs)


def test_autocast_cpu_runs_a_bfloat16_input_fused_as_native():
    torch.manual_seed(0)
    input = torch.randn(4, 3, 8, 8).bfloat16().requires_grad_()
    weight = torch.randn(5, 3, 3, 3, requires_grad=True)
    bn_weight, bn_bias = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = batch_norm_relu_conv2d(input, None, None, bn_weight, bn_bias, weight, training=True, padding=1)
        native = native_chain(input, None, None, bn_weight, bn_bias, weight, None, True, 0.1, 1e-5, 1, 1)
    assert ours.dtype == native.dtype == torch.bfloat16
    # Both round to bfloat16 (2**-8 of each value) where they store: a few roundings of the
    # largest value apart at most.
    def assert_within_roundings(mine, theirs):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=0.01, atol=0.01 * theirs.float().abs().max().item())

    assert_within_roundings(ours, native)
    for mine, theirs in zip(torch.autograd.grad(ours.float().sum(), [input, weight, bn_weight]), torch.autograd.grad(native.float().sum(), [input, weight, bn_weight])):
        assert mine.dtype == theirs.dtype
        assert_within_roundings(mine, theirs)


def _bad_cases():
    return [
        ("3-D input", dict(input=torch.randn(3, 8, 8)), "input must be a 4-D tensor", RuntimeError),
        ("bn_weight size", dict(bn_weight=torch.ones(4)), "bn_weight should contain 3 elements", RuntimeError),
        ("running_var size", dict(running_var=torch.ones(4)), "running_var should contain 3 elements", RuntimeError),
        ("channel mismatch", dict(weight=torch.randn(4, 5, 3, 3)), "input has 3 channels but weight", RuntimeError),
        ("weight dtype", dict(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64)), "weight dtype Double does not match input dtype Float", RuntimeError),
        ("eval without stats", dict(training=False, running_mean=None, running_var=None), "must be defined in evaluation mode", RuntimeError),
        ("one value per channel", dict(input=torch.randn(1, 3, 1, 1), padding=1), "Expected more than 1 value per channel when training", ValueError),
        ("eps zero in training", dict(eps=0.0), TRAINING_EPS_MESSAGE, ValueError),
        ("negative padding", dict(padding=-1), "padding must be non-negative, got [-1, -1]", RuntimeError),
        ("kernel over the input", dict(weight=torch.randn(4, 3, 9, 3)), "weight kernel 9x3 is larger than the padded input 8x8", RuntimeError),
        ("same padding, even kernel", dict(weight=torch.randn(4, 3, 2, 2), padding="same"), "padding='same' with an even kernel", ValueError),
        ("integer input", dict(input=torch.randint(0, 5, (2, 3, 8, 8)), weight=torch.randint(0, 5, (4, 3, 3, 3))),
         "batch_norm: input must be float32, float64, float16 or bfloat16, got Long", NotImplementedError),
        ("running_var requiring grad", dict(running_var=torch.ones(3, requires_grad=True)), "running_var cannot have requires_grad=True", RuntimeError),
    ]


@pytest.mark.parametrize("name, overrides, message, error", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_a_clear_error(name, overrides, message, error):
    args = dict(
        input=torch.randn(2, 3, 8, 8), running_mean=torch.zeros(3), running_var=torch.ones(3), bn_weight=None,
        bn_bias=None, weight=torch.randn(4, 3, 3, 3), bias=None, training=True,
    )
    args.update(overrides)
    with pytest.raises(error) as info:
        batch_norm_relu_conv2d(**args)
    assert message in str(info.value), str(info.value)


def test_empty_batch_as_native():
    input, weight = torch.randn(0, 3, 5, 5, requires_grad=True), torch.randn(4, 3, 3, 3)
    running = [torch.zeros(3), torch.ones(3)]
    output = batch_norm_relu_conv2d(input, *running, None, None, weight, training=True)
    assert output.shape == native_chain(input, None, None, None, None, weight, None, True, 0.1, 1e-5, 1, 0).shape
    assert torch.equal(running[0], torch.zeros(3)) and torch.equal(running[1], torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("padding", [1, "same"])
def test_module_matches_native_sequential_over_training_then_eval(device, momentum, padding):
    torch.manual_seed(0)
    bn, conv = nn.BatchNorm2d(3, momentum=momentum).double(), nn.Conv2d(3, 8, 3, stride=1, padding=padding).double()
    native = nn.Sequential(bn, nn.ReLU(), conv).to(device)
    fused = BatchNormReLUConv2d(3, 8, 3, padding=padding, momentum=momentum).double().to(device)
    fused.load_state_dict({"weight": conv.weight, "bias": conv.bias, **{f"bn.{k}": v for k, v in bn.state_dict().items()}})
    for step in range(3):
        input = torch.randn(5, 3, 10, 10, dtype=torch.float64, device=device, requires_grad=True)
        ours, theirs = fused(input), native(input)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(torch.autograd.grad(ours.sum(), input)[0], torch.autograd.grad(theirs.sum(), input)[0])
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(fused.bn.state_dict()[key], value)
    fused.eval(), native.eval()
    input = torch.randn(5, 3, 10, 10, dtype=torch.float64, device=device)
    torch.testing.assert_close(fused(input), native(input))
    torch.testing.assert_close(fused.to_native()(input), native(input))


def test_from_modules_shares_parameters_and_to_native_keeps_the_keys():
    bn, conv = nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, bias=False)
    fused = BatchNormReLUConv2d.from_modules(bn, conv)
    assert fused.weight is conv.weight and fused.bias is None and fused.bn is bn
    expected = [k for k in conv.state_dict()] + [f"bn.{k}" for k in bn.state_dict()]
    assert list(fused.state_dict()) == expected
    native = fused.to_native()
    assert list(native.state_dict()) == expected and native.weight is conv.weight and native.bn.running_mean is bn.running_mean
    assert type(native.bn) is nn.BatchNorm2d and "kernel_size=(3, 3)" in repr(fused)
    for bad_bn, bad_conv, message in (
        (nn.BatchNorm2d(5), conv, "num_features"),
        (bn, nn.Conv2d(3, 6, 3, groups=3), "groups"),
        (bn, nn.Conv2d(3, 4, 2, padding="same"), "even kernel"),
        (nn.SyncBatchNorm(3), conv, "SyncBatchNorm synchronizes its statistics"),
    ):
        with pytest.raises(ValueError, match=message):
            BatchNormReLUConv2d.from_modules(bad_bn, bad_conv)


def test_from_modules_takes_the_conv_mode_and_leaves_the_batch_norm_its_own():
    bn, conv = nn.BatchNorm2d(3).eval(), nn.Conv2d(3, 4, 3)
    fused = BatchNormReLUConv2d.from_modules(bn, conv)
    assert fused.training and not bn.training


def test_module_is_a_leaf_under_fx_tracing_and_follows_train_eval():
    model = nn.Sequential(BatchNormReLUConv2d(3, 4, 3, padding=1), nn.Flatten())
    traced = torch.fx.symbolic_trace(model)
    assert [n.op for n in traced.graph.nodes].count("call_module") == 2
    input = torch.randn(2, 3, 5, 5)
    for mode in (True, False):
        model.train(mode), traced.train(mode)
        torch.testing.assert_close(traced(input), model(input))
    with pytest.raises(ValueError, match="expected 4D input"):
        model(torch.randn(3, 5, 5))


def test_same_seed_gives_the_native_pair_initialisation():
    torch.manual_seed(3)
    bn, conv = nn.BatchNorm2d(6), nn.Conv2d(6, 4, 5)
    torch.manual_seed(3)
    fused = BatchNormReLUConv2d(6, 4, 5)
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)
    assert torch.equal(fused.bn.weight, bn.weight) and torch.equal(fused.bn.running_var, bn.running_var)
