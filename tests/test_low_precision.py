"""The ops in bfloat16 and float16 on the CPU, and under torch.autocast("cpu").

Rule for values: measured against the native composition in float64 on the same (rounded)
data, no worse than native torch in the same dtype (op_cases.assert_no_worse_than_native).

Rule for gradients: in 16 bits a pool window's maximum is often a tie after rounding, and
two correct implementations may pick different positions; the gradient then lands elsewhere.
So the float64 reference of a gradient is taken through the positions the op itself chose
(its one-byte argmax, which the forward check has shown to hold a window maximum), and the
error must stay within a few roundings of the dtype times the size of the summed terms.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cifarnet
from cifarnet.ops import batch_norm, conv2d_batch_norm_relu_max_pool2d, conv2d_relu_max_pool2d
from cifarnet._op_handles import BN_BACKWARD_OP, BN_FORWARD_OP, CONV_BACKWARD_OP, TRAINING_BACKWARD_OP, TRAINING_OP, WITH_ARGMAX_OP
from conftest import native_conv2d_relu_max_pool2d
from op_cases import (
    assert_no_worse_than_native,
    assert_same_layout,
    conv_out,
    every_weight_element_sees_input,
    layer_cases,
    make_tensors,
    op_args,
)

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))
LOW_PRECISION = [torch.bfloat16, torch.float16]
RELU_ZERO = 255


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def value_tolerance(dtype):
    """Slack on top of 4x native's error: one rounding of the largest value."""
    return dict(rtol=2 * unit_roundoff(dtype), atol=1e-6)


def pool_at_argmax(activation, argmax, geometry):
    """max_pool2d(relu(activation)) through the given window argmax (255: the ReLU's zero)."""
    pool_size = geometry["pool_size"]
    pool_stride = geometry["pool_stride"] or pool_size
    pool_padding = pair(geometry.get("pool_padding", 0))
    _, _, out_h, out_w = argmax.shape
    offset = argmax.long().to(activation.device)
    hit = offset != RELU_ZERO
    offset = torch.where(hit, offset, torch.zeros_like(offset))
    # the offset counts from the window's first, padded, row and column
    rows = torch.arange(out_h, device=activation.device).view(-1, 1) * pool_stride[0] - pool_padding[0] + offset // pool_size[1]
    columns = torch.arange(out_w, device=activation.device).view(1, -1) * pool_stride[1] - pool_padding[1] + offset % pool_size[1]
    inside = (rows >= 0) & (rows < activation.shape[2]) & (columns >= 0) & (columns < activation.shape[3])
    assert inside[hit].all(), "an argmax names a padded position"
    rows, columns = rows.clamp(0, activation.shape[2] - 1), columns.clamp(0, activation.shape[3] - 1)  # (no hit)
    flat = (rows * activation.shape[3] + columns).flatten(2)
    gathered = activation.flatten(2).gather(2, flat).view(offset.shape)
    return torch.where(hit, gathered, torch.zeros_like(gathered))


def assert_relu_zero_flags_the_zero_outputs(output, argmax):
    """The argmax is the ReLU's zero (255) exactly where the pooled output is 0 (its window's
    maximum is not positive, padding never wins): there the backward sends nothing back, as
    native's ReLU gradient is 0. The gradient references here go through the op's own argmax, so
    this is what ties them to native."""
    counted = ~output.isnan()
    flagged, zero = (argmax == RELU_ZERO)[counted], (output == 0)[counted]
    assert torch.equal(flagged, zero), f"{(flagged != zero).sum().item()} windows flagged otherwise than their output"


def term_scales(input, weight, grad_conv, geometry):
    """Per element of the input, weight and bias gradients: the sum of the absolute values of
    the products they add up."""
    x, w, g = input.double().abs(), weight.double().abs(), grad_conv.double().abs()
    stride, padding = geometry["stride"], geometry["padding"]
    return [
        torch.nn.grad.conv2d_input(x.shape, w, g, stride, padding),
        torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding),
        g.sum((0, 2, 3)),
    ]


def assert_within_roundings(name, ours, reference, terms, dtype, roundings=8, native=None):
    """``ours`` within ``roundings`` roundings of ``dtype`` times the size of its summed terms,
    elementwise, or, where ``native`` (the same computation in native ops and ``dtype``) is
    given, no further from ``reference`` at its worst than native is at its."""
    ours = ours.double()
    assert torch.equal(ours.isnan(), reference.isnan()), f"{name}: NaN pattern differs"
    error = (ours - reference).abs().nan_to_num()
    bound = roundings * unit_roundoff(dtype) * terms.nan_to_num() + 1e-6
    if native is not None and not (error <= bound).all():
        native_error = (native.double() - reference).abs().nan_to_num().max()
        assert error.max() <= native_error, f"{name}: error {error.max().item():.3g}, native's {native_error.item():.3g}"
        return
    assert (error <= bound).all(), f"{name}: error {error.max().item():.3g} over {roundings} roundings of its terms"


@st.composite
def low_precision_layer_cases(draw):
    case = draw(layer_cases())
    case["dtype"] = draw(st.sampled_from(LOW_PRECISION))
    assume(every_weight_element_sees_input(case))
    return case


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=low_precision_layer_cases())
def test_conv2d_relu_max_pool2d_low_precision(case):
    input, weight, bias, generator = make_tensors(case, "cpu")
    dtype, geometry = case["dtype"], op_args(case)
    tensors = [input, weight] + ([bias] if bias is not None else [])
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    output, argmax = WITH_ARGMAX_OP(leaves[0], leaves[1], leaves[2] if bias is not None else None, *conv_args(geometry))
    assert_relu_zero_flags_the_zero_outputs(output, argmax)
    public = conv2d_relu_max_pool2d(leaves[0], leaves[1], leaves[2] if bias is not None else None, **geometry)
    assert torch.equal(public.nan_to_num(), output.nan_to_num())
    native = native_conv2d_relu_max_pool2d(*tensors[:2], bias, **geometry)
    exact = native_conv2d_relu_max_pool2d(*(t.double() for t in tensors[:2]), bias.double() if bias is not None else None, **geometry)
    assert output.dtype == dtype and output.shape == native.shape
    assert_same_layout(output, native)
    assert_no_worse_than_native(output, native, exact, "output", **value_tolerance(dtype))

    grad_output = torch.randn(output.shape, generator=generator).round().to(dtype)
    ours = torch.autograd.grad(public, leaves, grad_output)
    # float64 gradients through the positions our argmax chose
    exact_leaves = [t.detach().double().requires_grad_() for t in tensors]
    conv = F.conv2d(exact_leaves[0], exact_leaves[1], exact_leaves[2] if bias is not None else None, geometry["stride"], geometry["padding"])
    reference = torch.autograd.grad(pool_at_argmax(conv, argmax, geometry), exact_leaves, grad_output.double())
    if case["values"] == "nan":
        native_leaves = [t.detach().clone().requires_grad_() for t in tensors]
        native_out = native_conv2d_relu_max_pool2d(native_leaves[0], native_leaves[1], native_leaves[2] if bias is not None else None, **geometry)
        native_grads = torch.autograd.grad(native_out, native_leaves, grad_output)
        for name, mine, theirs in zip(("input", "weight", "bias"), ours, native_grads):
            assert mine.dtype == dtype
            assert torch.equal(mine.isnan(), theirs.isnan()), f"grad {name}: NaN pattern differs from native"
        return
    grad_conv = torch.autograd.grad(pool_at_argmax(conv, argmax, geometry), conv, grad_output.double())[0]
    terms = term_scales(input, weight, grad_conv, geometry)
    for name, mine, exact_grad, scale in zip(("input", "weight", "bias"), ours, reference, terms):
        assert mine.dtype == dtype
        assert_within_roundings(f"grad {name}", mine, exact_grad, scale, dtype)


def conv_args(geometry):
    pool_stride = geometry["pool_stride"] or []
    return [
        pair(geometry["stride"]), pair(geometry["padding"]), pair(geometry["pool_size"]), pool_stride and pair(pool_stride),
        geometry["ceil_mode"], pair(geometry.get("pool_padding", 0)),
    ]  # fmt: skip


def pair(value):
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_ties_go_to_the_first_maximum_and_nan_to_the_last(dtype):
    x = torch.tensor([[[[3.0, 3.0, 1.0, float("nan")], [2.0, 3.0, float("nan"), 5.0]]]], dtype=dtype, requires_grad=True)
    weight = torch.ones(1, 1, 1, 1, dtype=dtype)
    out = conv2d_relu_max_pool2d(x, weight, pool_size=2)
    out.backward(torch.tensor([[[[10.0, 20.0]]]], dtype=dtype))
    assert out[0, 0, 0, 0].item() == 3.0 and out[0, 0, 0, 1].isnan()
    expected = torch.tensor([[[[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 20.0, 0.0]]]], dtype=dtype)
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_batch_norm_output_ties_in_the_storage_dtype(device, dtype):
    """Native rounds its batch norm output to the storage dtype before ReLU and max_pool2d
    compare it, so values distinct in float32 but equal in bfloat16/float16 tie and the first
    maximum takes the gradient. A shift where the dtype's spacing is 2 makes most of a window's
    normalised values (about 0.1 apart) equal in 16 bits; a 1x1 identity convolution makes the input gradient the batch norm's
    input gradient, where a hit at another position shows."""
    generator = torch.Generator().manual_seed(0)
    channels = 3
    # Multiples of 1/8 in [-2, 2): exact in both dtypes, about 0.1 apart once normalised.
    input = (torch.randint(-16, 16, (4, channels, 8, 8), generator=generator) / 8).to(device, dtype)
    weight = torch.eye(channels, dtype=dtype, device=device).view(channels, channels, 1, 1)
    bn_weight = torch.ones(channels, device=device)
    bn_bias = torch.full((channels,), 2 / torch.finfo(dtype).eps, device=device)
    grad = torch.randn(4, channels, 4, 4, generator=generator).to(device, dtype)

    ours_input = input.clone().requires_grad_()
    ours = conv2d_batch_norm_relu_max_pool2d(ours_input, weight, None, None, None, bn_weight, bn_bias, True)
    native_input = input.clone().requires_grad_()
    normalised = F.batch_norm(F.conv2d(native_input, weight), None, None, bn_weight, bn_bias, True)
    native = F.max_pool2d(F.relu(normalised), 2)
    window_max = F.max_pool2d(normalised.detach(), 2).repeat_interleave(2, 2).repeat_interleave(2, 3)
    tied_windows = (normalised.detach() == window_max).view(4, channels, 4, 2, 4, 2).sum((3, 5)) > 1
    assert tied_windows.sum() > tied_windows.numel() // 4, "too few tied windows to test"
    torch.testing.assert_close(ours, native, rtol=0, atol=0)
    (ours_grad,) = torch.autograd.grad(ours, ours_input, grad)
    (native_grad,) = torch.autograd.grad(native, native_input, grad)
    # The same hits give the same gradient up to rounding; one other hit moves ~|grad| ~ 1.
    torch.testing.assert_close(ours_grad.float(), native_grad.float(), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pool", [dict(pool_size=2), dict(pool_size=3, pool_stride=2), dict(pool_size=3, pool_stride=2, pool_padding=1)])
def test_study_shapes_low_precision(dtype, channels_last, pool, backward, monkeypatch):
    """Batches of several tiles; windows that tile and overlap; either backward (the CPU picks
    one per dtype, see conv2d_relu_max_pool2d_kernel.cpp; both must be right)."""
    monkeypatch.setenv("CIFARNET_CONV_BACKWARD", backward)
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(40, 16, 16, 16, generator=generator)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    weight = 0.1 * torch.randn(32, 16, 5, 5, generator=generator)
    bias = torch.randn(32, generator=generator)
    tensors = [t.to(dtype) for t in (input, weight, bias)]
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    geometry = dict(
        stride=(1, 1), padding=(2, 2), pool_size=pair(pool["pool_size"]), pool_stride=pair(pool.get("pool_stride", pool["pool_size"])),
        ceil_mode=False, pool_padding=pair(pool.get("pool_padding", 0)),
    )  # fmt: skip
    output, argmax = WITH_ARGMAX_OP(*tensors, *conv_args(geometry))
    assert_relu_zero_flags_the_zero_outputs(output, argmax)
    ours_out = conv2d_relu_max_pool2d(*leaves, **geometry)
    native = native_conv2d_relu_max_pool2d(*tensors, **geometry)
    exact = native_conv2d_relu_max_pool2d(*(t.double() for t in tensors), **geometry)
    assert_no_worse_than_native(ours_out, native, exact, "output", **value_tolerance(dtype))
    grad_output = torch.randn(output.shape, generator=generator).to(dtype)
    ours = torch.autograd.grad(ours_out, leaves, grad_output)
    exact_leaves = [t.detach().double().requires_grad_() for t in tensors]
    conv = F.conv2d(exact_leaves[0], exact_leaves[1], exact_leaves[2], 1, 2)
    pooled = pool_at_argmax(conv, argmax, geometry)
    reference = torch.autograd.grad(pooled, exact_leaves + [conv], grad_output.double())
    terms = term_scales(tensors[0], tensors[1], reference[3], geometry)
    for name, mine, exact_grad, scale in zip(("input", "weight", "bias"), ours, reference[:3], terms):
        assert mine.dtype == dtype and mine.shape == exact_grad.shape
        assert_within_roundings(f"grad {name}", mine, exact_grad, scale, dtype)


@st.composite
def low_precision_batch_norm_cases(draw):
    rank = draw(st.sampled_from([2, 4, 4, 3]))
    training = draw(st.booleans())
    channels = draw(st.one_of(st.integers(1, 20), st.integers(21, 70)))
    shape = [draw(st.integers(2, 5)), channels] + [draw(st.integers(1, 6)) for _ in range(rank - 2)]
    return dict(
        shape=shape,
        channels_last=rank == 4 and draw(st.booleans()),
        dtype=draw(st.sampled_from(LOW_PRECISION)),
        parameter_dtype=draw(st.sampled_from(["same", "float32"])),
        training=training,
        running_stats=draw(st.booleans()) or not training,
        affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 1.0])),
        offset=draw(st.sampled_from([0.0, 10.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize(
    "pool",
    [
        dict(pool_size=2, pool_stride=2, ceil_mode=True),  # partial windows at the edge
        dict(pool_size=2, pool_stride=3, ceil_mode=False),  # rows and columns in no window
        dict(pool_size=(1, 3), pool_stride=(2, 3), ceil_mode=True),
        # padded windows: the first row and column of windows start in the padding
        dict(pool_size=3, pool_stride=3, ceil_mode=True, pool_padding=1),
        dict(pool_size=(2, 4), pool_stride=(3, 4), ceil_mode=False, pool_padding=(1, 2)),
    ],
)
def test_dense_backward_channels_last_windows_that_do_not_overlap(dtype, pool, monkeypatch):
    """The dense backward writes the channels-last pre-pool gradient whole (no zero fill) and
    sums the bias gradient on the way: positions in no window or in a partial window, and
    channels past the last whole vector (19 = 16 + 3), must come out right."""
    monkeypatch.setenv("CIFARNET_CONV_BACKWARD", "dense")
    generator = torch.Generator().manual_seed(5)
    input = torch.randn(3, 6, 11, 11, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = 0.3 * torch.randn(19, 6, 3, 3, generator=generator)
    bias = torch.randn(19, generator=generator)
    tensors = [t.to(dtype) for t in (input, weight, bias)]
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    geometry = dict(
        stride=(1, 1), padding=(1, 1), pool_size=pair(pool["pool_size"]), pool_stride=pair(pool["pool_stride"]),
        ceil_mode=pool["ceil_mode"], pool_padding=pair(pool.get("pool_padding", 0)),
    )  # fmt: skip
    output, argmax = WITH_ARGMAX_OP(*tensors, *conv_args(geometry))
    assert_relu_zero_flags_the_zero_outputs(output, argmax)
    ours_out = conv2d_relu_max_pool2d(*leaves, **geometry)
    assert ours_out.is_contiguous(memory_format=torch.channels_last)
    grad_output = torch.randn(output.shape, generator=generator).to(dtype)
    ours = torch.autograd.grad(ours_out, leaves, grad_output)
    exact_leaves = [t.detach().double().requires_grad_() for t in tensors]
    conv = F.conv2d(exact_leaves[0], exact_leaves[1], exact_leaves[2], 1, 1)
    reference = torch.autograd.grad(pool_at_argmax(conv, argmax, geometry), exact_leaves + [conv], grad_output.double())
    terms = term_scales(tensors[0], tensors[1], reference[3], geometry)
    for name, mine, exact_grad, scale in zip(("input", "weight", "bias"), ours, reference[:3], terms):
        assert mine.dtype == dtype and mine.shape == exact_grad.shape
        assert_within_roundings(f"grad {name}", mine, exact_grad, scale, dtype)

@settings(max_examples=EXAMPLES, deadline=None)
@given(case=low_precision_batch_norm_cases())
def test_batch_norm_low_precision(case):
    """Storage in 16 bits; parameters and running statistics in the data's dtype or float32."""
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, channels = case["dtype"], case["shape"][1]
    parameter_dtype = dtype if case["parameter_dtype"] == "same" else torch.float32
    input = (torch.randn(case["shape"], generator=generator) + case["offset"]).to(dtype)
    if case["channels_last"]:
        input = input.contiguous(memory_format=torch.channels_last)
    parameters = [torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)] if case["affine"] else []
    parameters = [p.to(parameter_dtype) for p in parameters]
    running = [torch.randn(channels, generator=generator) + case["offset"], torch.rand(channels, generator=generator) + 0.5] if case["running_stats"] else None
    running = [r.to(parameter_dtype) for r in running] if running else None
    grad = torch.randn(input.shape, generator=generator).to(dtype)
    args = dict(training=case["training"], momentum=case["momentum"], eps=1e-5)

    def run(function, as_float64):
        convert = (lambda t: t.detach().double()) if as_float64 else (lambda t: t.detach().clone())  # noqa: E731
        leaves = [convert(t).requires_grad_() for t in [input] + parameters]
        stats = [convert(t) for t in running] if running else [None, None]
        weight, bias = (leaves[1], leaves[2]) if case["affine"] else (None, None)
        output = function(leaves[0], stats[0], stats[1], weight, bias, **args)
        return output, stats, torch.autograd.grad(output, leaves, grad.double() if as_float64 else grad)

    ours, ours_stats, ours_grads = run(batch_norm, False)
    native, native_stats, native_grads = run(F.batch_norm, False)
    exact, exact_stats, exact_grads = run(F.batch_norm, True)
    assert ours.dtype == dtype and ours.shape == input.shape
    assert_same_layout(ours, native)
    tolerance = value_tolerance(dtype)
    assert_no_worse_than_native(ours, native, exact, "output", **tolerance)
    if running:
        for name, mine, theirs, reference in zip(("running_mean", "running_var"), ours_stats, native_stats, exact_stats):
            assert mine.dtype == parameter_dtype
            assert_no_worse_than_native(mine, theirs, reference, name, **value_tolerance(parameter_dtype))
    for name, mine, theirs, reference in zip(("grad input", "grad weight", "grad bias"), ours_grads, native_grads, exact_grads):
        assert mine.dtype == theirs.dtype, f"{name}: dtype {mine.dtype}, native {theirs.dtype}"
        assert_no_worse_than_native(mine, theirs, reference, name, **value_tolerance(mine.dtype if mine.dtype != torch.float32 else dtype))


@st.composite
def low_precision_block_cases(draw):
    case = draw(low_precision_layer_cases())
    assume(case["values"] != "zeros")
    conv_pixels = case["batch"] * conv_out(case["size"][0], case["kernel"][0], case["stride"][0], case["padding"][0])
    conv_pixels *= conv_out(case["size"][1], case["kernel"][1], case["stride"][1], case["padding"][1])
    assume(conv_pixels > 1)
    case["bn_affine"] = draw(st.booleans())
    case["parameter_dtype"] = draw(st.sampled_from(["same", "float32"]))
    return case


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=low_precision_block_cases())
def test_conv2d_batch_norm_relu_max_pool2d_low_precision(case):
    """Training mode: output and running statistics by the value rule, gradients through our
    argmax (see the module docstring)."""
    check_conv2d_batch_norm_relu_max_pool2d_low_precision(case)


# 4x2 windows of stride 1 send up to 8 hits to one position; at some, the hits' gradients cancel
# to a third of their sizes (integer values, so the argmax sees ties).
OVERLAPPING_HITS = {
    "batch": 3, "in_channels": 1, "out_channels": 1, "size": (12, 10), "kernel": (2, 3), "stride": (2, 1),
    "padding": (1, 2), "pool_size": (4, 2), "pool_stride": (1, 1), "ceil_mode": False, "pool_padding": (1, 0),
    "bias": True, "input_channels_last": False, "weight_channels_last": False, "values": "integers", "seed": 1,
    "bn_affine": False, "parameter_dtype": "same",
}  # fmt: skip


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_overlapping_windows_add_their_hits_in_float(dtype):
    """The hits of overlapping windows add up in float, as native max-pool backward's do: added
    in bfloat16, the rounding of their partial sums put 38 roundings of its terms into the input
    gradient (native's: 2.3), found by a 1500-example run of the test above."""
    check_conv2d_batch_norm_relu_max_pool2d_low_precision({**OVERLAPPING_HITS, "dtype": dtype}, gradients_as_bounded=True)


def check_conv2d_batch_norm_relu_max_pool2d_low_precision(case, gradients_as_bounded=False):
    """The training-mode checks of one case. ``gradients_as_bounded``: the convolution's
    gradients within their rounding bound everywhere, not merely no worse than native's."""
    input, weight, bias, generator = make_tensors(case, "cpu")
    dtype, channels, geometry = case["dtype"], case["out_channels"], op_args(case)
    parameter_dtype = dtype if case["parameter_dtype"] == "same" else torch.float32
    bn = [torch.rand(channels, generator=generator) * 2 - 0.5, torch.rand(channels, generator=generator) * 2 - 1] if case["bn_affine"] else [None, None]
    bn = [None if t is None else t.to(parameter_dtype) for t in bn]
    running = [torch.zeros(channels, dtype=parameter_dtype), torch.ones(channels, dtype=parameter_dtype)]
    tensors = [input, weight, bias, bn[0], bn[1]]
    present = [i for i, t in enumerate(tensors) if t is not None]

    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    stats = [t.clone() for t in running]
    output = conv2d_batch_norm_relu_max_pool2d(leaves[0], leaves[1], leaves[2], stats[0], stats[1], leaves[3], leaves[4], training=True, momentum=0.5, **geometry)
    training_output, argmax, *_ = TRAINING_OP(input, weight, bias, bn[0], bn[1], 1e-5, *conv_args(geometry))
    assert_relu_zero_flags_the_zero_outputs(training_output, argmax)
    native_stats = [t.clone() for t in running]
    native = native_bn_block(input, weight, bias, native_stats, bn, geometry)
    exact_stats = [t.double() for t in running]
    exact = native_bn_block(*(None if t is None else t.double() for t in (input, weight, bias)), exact_stats, [None if t is None else t.double() for t in bn], geometry)
    assert output.dtype == dtype and output.shape == native.shape
    assert_same_layout(output, native)
    if case["values"] == "nan":
        assert torch.equal(output.isnan(), native.isnan())
        return
    assert_no_worse_than_native(output, native, exact, "output", **value_tolerance(dtype))
    for name, mine, theirs, reference in zip(("running_mean", "running_var"), stats, native_stats, exact_stats):
        assert mine.dtype == parameter_dtype
        assert_no_worse_than_native(mine, theirs, reference, name, **value_tolerance(dtype))

    grad_output = torch.randn(output.shape, generator=generator).to(dtype)
    ours = torch.autograd.grad(output, [leaves[i] for i in present], grad_output)
    exact_leaves = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    conv = F.conv2d(exact_leaves[0], exact_leaves[1], exact_leaves[2], geometry["stride"], geometry["padding"])
    normalised = F.batch_norm(conv, None, None, exact_leaves[3], exact_leaves[4], True)
    pooled = pool_at_argmax(normalised, argmax, geometry)
    reference = torch.autograd.grad(pooled, [exact_leaves[i] for i in present] + [conv], grad_output.double())
    # native's gradients in the dtype through the same argmax: where the rounding bound is
    # tight (a weight gradient without cancellation), ours must then be no worse than native's
    native_leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    native_conv = F.conv2d(native_leaves[0], native_leaves[1], native_leaves[2], geometry["stride"], geometry["padding"])
    native_pooled = pool_at_argmax(F.batch_norm(native_conv, None, None, native_leaves[3], native_leaves[4], True), argmax, geometry)
    native_grads = torch.autograd.grad(native_pooled, [native_leaves[i] for i in present], grad_output)
    terms = term_scales(input, weight, bn_grad_conv_term_scales(conv, bn[0], argmax, grad_output, geometry), geometry)
    hit_terms = bn_parameter_term_scales(conv, argmax, grad_output, geometry)
    names = ["input", "weight", "bias", "bn_weight", "bn_bias"]
    for i, mine, exact_grad, native_grad in zip(present, ours, reference[:-1], native_grads):
        assert mine.dtype == tensors[i].dtype, f"grad {names[i]}: dtype {mine.dtype}"
        if i < 3:
            # 16 roundings: the convolution output is stored rounded and normalised from there
            native_or_none = None if gradients_as_bounded else native_grad
            assert_within_roundings(f"grad {names[i]}", mine, exact_grad, terms[i], dtype, roundings=16, native=native_or_none)
        else:
            # sums over the hits of |grad| (bn_bias) or |grad * normalised value| (bn_weight)
            assert_within_roundings(f"grad {names[i]}", mine, exact_grad, hit_terms[i - 3], dtype, roundings=16, native=native_grad)


def bn_grad_conv_term_scales(conv, bn_weight, argmax, grad_output, geometry):
    """Per element of the convolution-output gradient k (dy - mean(dy) - x_hat mean(dy x_hat)):
    the size of its terms, with x_hat's rounding error growing with |x| (the convolution output
    is stored rounded), not |x - mean|."""
    conv = conv.detach()
    placeholder = torch.zeros_like(conv).requires_grad_()
    dy = torch.autograd.grad(pool_at_argmax(placeholder, argmax, geometry), placeholder, grad_output.double())[0]
    mean = conv.mean((0, 2, 3), keepdim=True)
    invstd = (conv.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).rsqrt()
    x_hat = (conv - mean) * invstd
    k = invstd * (1 if bn_weight is None else bn_weight.double().abs().view(1, -1, 1, 1))
    mean_dy = dy.mean((0, 2, 3), keepdim=True).abs()
    mean_dy_x_hat = (dy * x_hat).mean((0, 2, 3), keepdim=True).abs()
    return k * (dy.abs() + mean_dy + (x_hat.abs() + conv.abs() * invstd) * mean_dy_x_hat)


def bn_parameter_term_scales(conv, argmax, grad_output, geometry):
    """Per channel, the sums over the argmax hits of |grad| times the normalised value's size
    (bn_weight), with its rounding error growing with |x| as in bn_grad_conv_term_scales (the
    convolution output is stored rounded: a channel far from zero loses most of its spread to
    that rounding, native's as much as ours), and of |grad| (bn_bias)."""
    conv = conv.detach()
    normalised = F.batch_norm(conv, None, None, None, None, True)
    invstd = (conv.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).rsqrt()
    placeholder = torch.zeros_like(normalised).requires_grad_()
    hits = torch.autograd.grad(pool_at_argmax(placeholder, argmax, geometry), placeholder, grad_output.double().abs())[0]
    return [(hits * (normalised.abs() + conv.abs() * invstd)).sum((0, 2, 3)), hits.sum((0, 2, 3))]


def native_bn_block(input, weight, bias, running, bn, geometry, training=True):
    conv = F.conv2d(input, weight, bias, geometry["stride"], geometry["padding"])
    normalised = F.batch_norm(conv, running[0], running[1], bn[0], bn[1], training, 0.5, 1e-5)
    return F.max_pool2d(
        F.relu(normalised), geometry["pool_size"], geometry["pool_stride"], geometry.get("pool_padding", 0), ceil_mode=geometry["ceil_mode"]
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_conv2d_batch_norm_relu_max_pool2d_evaluation_low_precision(dtype):
    """Evaluation folds float32 batch-norm parameters into a 16-bit convolution."""
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(4, 3, 10, 10, generator=generator).to(dtype)
    weight = torch.randn(8, 3, 3, 3, generator=generator).to(dtype)
    bn = [torch.rand(8, generator=generator) + 0.5, torch.randn(8, generator=generator)]
    running = [torch.randn(8, generator=generator), torch.rand(8, generator=generator) + 0.5]
    geometry = dict(stride=(1, 1), padding=(1, 1), pool_size=(2, 2), pool_stride=None, ceil_mode=False)
    ours = conv2d_batch_norm_relu_max_pool2d(input, weight, None, running[0], running[1], bn[0], bn[1], training=False, padding=1)
    native = native_bn_block(input, weight, None, running, bn, geometry, training=False)
    exact = native_bn_block(input.double(), weight.double(), None, [t.double() for t in running], [t.double() for t in bn], geometry, training=False)
    assert ours.dtype == dtype
    assert_no_worse_than_native(ours, native, exact, "output", rtol=4 * unit_roundoff(dtype), atol=1e-6)


# A float32 batch-norm weight or bias alone on 16-bit data (issue 25: the bias's gradient took
# the dtype of the weight, or of the input where there was none, and lost float32's precision).
# Each parameter's gradient takes its own dtype, as native's does, with native's precision.
ALONE = ["weight", "bias"]


def one_affine_parameter(channels, given, generator):
    """(weight, bias) of float32 with only ``given`` of them."""
    weight = torch.rand(channels, generator=generator) + 0.5
    bias = torch.randn(channels, generator=generator)
    return (weight, None) if given == "weight" else (None, bias)


def run_with_gradients(function, tensors, grad_output, as_float64):
    """``function`` of fresh leaves copied from ``tensors`` (None stays None; float64 copies
    where ``as_float64``), its output and the gradients of the given leaves."""
    leaves = [None if t is None else (t.detach().double() if as_float64 else t.detach().clone()).requires_grad_() for t in tensors]
    output = function(*leaves)
    grad_output = grad_output.double() if as_float64 else grad_output
    return output, torch.autograd.grad(output, [leaf for leaf in leaves if leaf is not None], grad_output)


def module_step(module, input, grad_output, as_float64):
    """A training step of a copy of ``module`` (in float64 where ``as_float64``): its output
    and the gradients of its input and of its parameters."""
    module = copy.deepcopy(module)
    if as_float64:
        module = module.double()
    leaf = (input.double() if as_float64 else input.clone()).requires_grad_()
    output = module(leaf)
    output.backward(grad_output.double() if as_float64 else grad_output)
    return output, [leaf.grad, *(p.grad for p in module.parameters())]


def assert_gradients_like_natives(ours, native, exact, names):
    """Each gradient in native's dtype, its error against the float64 reference no worse than
    native's (within a rounding of its own dtype: float32's for the parameters)."""
    assert len(ours) == len(native) == len(exact) == len(names)
    for name, mine, theirs, reference in zip(names, ours, native, exact):
        assert mine.dtype == theirs.dtype, f"{name}: dtype {mine.dtype}, native {theirs.dtype}"
        assert_no_worse_than_native(mine, theirs, reference, name, **value_tolerance(mine.dtype))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("given", ALONE)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_one_float32_parameter(dtype, given, training):
    generator = torch.Generator().manual_seed(3)
    input = (torch.randn(16, 6, 12, 12, generator=generator) * 2 + 1).to(dtype)
    weight, bias = one_affine_parameter(6, given, generator)
    running = [torch.randn(6, generator=generator), torch.rand(6, generator=generator) + 0.5]
    grad_output = torch.randn(input.shape, generator=generator).to(dtype)

    def call(function, as_float64):
        def batch_norm_of(x, w, b):
            stats = [r.double() if as_float64 else r.clone() for r in running]
            return function(x, stats[0], stats[1], w, b, training=training, momentum=0.1, eps=1e-5)

        return run_with_gradients(batch_norm_of, [input, weight, bias], grad_output, as_float64)

    (ours, ours_grads), (native, native_grads), (_, exact_grads) = (
        call(batch_norm, False), call(F.batch_norm, False), call(F.batch_norm, True)
    )
    assert ours.dtype == native.dtype == dtype
    assert_gradients_like_natives(ours_grads, native_grads, exact_grads, ["grad input", f"grad {given}"])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("given", ALONE)
def test_batch_norm_module_one_float32_parameter(dtype, given):
    """cifarnet.nn.BatchNorm2d of float32, its other parameter set to None, on 16-bit data."""
    torch.manual_seed(4)
    module = cifarnet.nn.BatchNorm2d(6)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5), module.bias.normal_()
    setattr(module, "bias" if given == "weight" else "weight", None)
    generator = torch.Generator().manual_seed(5)
    input = (torch.randn(16, 6, 12, 12, generator=generator) * 2 + 1).to(dtype)
    grad_output = torch.randn(input.shape, generator=generator).to(dtype)
    (_, ours), (_, native), (_, exact) = (
        module_step(module, input, grad_output, False),
        module_step(module.to_native(), input, grad_output, False),
        module_step(module.to_native(), input, grad_output, True),
    )
    assert_gradients_like_natives(ours, native, exact, ["grad input", f"grad {given}"])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("given", ALONE)
def test_conv2d_batch_norm_relu_max_pool2d_one_float32_parameter(dtype, given):
    """The fused op in training, a 16-bit convolution with a float32 batch-norm weight or bias
    alone; as a function and as a layer."""
    generator = torch.Generator().manual_seed(6)
    input = torch.randn(8, 3, 12, 12, generator=generator).to(dtype)
    weight = (torch.randn(6, 3, 3, 3, generator=generator) * 0.3).to(dtype)
    bias = (torch.randn(6, generator=generator) * 0.1).to(dtype)
    bn_weight, bn_bias = one_affine_parameter(6, given, generator)
    geometry = dict(stride=(1, 1), padding=(1, 1), pool_size=(2, 2), pool_stride=None, ceil_mode=False)
    grad_output = torch.randn(8, 6, 6, 6, generator=generator).to(dtype)

    def call(fused, as_float64):
        def chain(x, w, b, bn_w, bn_b):
            running = [torch.zeros(6, dtype=torch.float64 if as_float64 else torch.float32), torch.ones(6, dtype=torch.float64 if as_float64 else torch.float32)]
            if fused:
                return conv2d_batch_norm_relu_max_pool2d(x, w, b, running[0], running[1], bn_w, bn_b, training=True, padding=1)
            return native_bn_block(x, w, b, running, [bn_w, bn_b], geometry)

        return run_with_gradients(chain, [input, weight, bias, bn_weight, bn_bias], grad_output, as_float64)

    names = ["grad input", "grad weight", "grad bias", f"grad bn_{given}"]
    (ours, ours_grads), (native, native_grads), (_, exact_grads) = call(True, False), call(False, False), call(False, True)
    assert ours.dtype == native.dtype == dtype
    # the convolution's gradients are covered above (through the op's own argmax); here the
    # batch norm's parameter
    assert_gradients_like_natives(ours_grads[3:], native_grads[3:], exact_grads[3:], names[3:])

    torch.manual_seed(7)
    layer = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 6, 3, padding=1).to(dtype)
    with torch.no_grad():
        layer.bn.float().weight.uniform_(0.5, 1.5), layer.bn.bias.normal_()
    setattr(layer.bn, "bias" if given == "weight" else "weight", None)
    (_, ours), (_, native), (_, exact) = (
        module_step(layer, input, grad_output, False),
        module_step(layer.to_native(), input, grad_output, False),
        module_step(layer.to_native(), input, grad_output, True),
    )
    assert [g.dtype for g in ours] == [g.dtype for g in native] == [dtype, dtype, dtype, torch.float32]
    assert_gradients_like_natives(ours[3:], native[3:], exact[3:], names[3:])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_opcheck_low_precision(dtype):
    generator = torch.Generator().manual_seed(1)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        input = torch.randn(3, 4, 10, 9, generator=generator).to(dtype).contiguous(memory_format=memory_format)
        weight = torch.randn(6, 4, 3, 3, generator=generator).to(dtype)
        bias = torch.randn(6, generator=generator).to(dtype)
        for args in (
            (input.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), [1, 1], [1, 1], [2, 2], [], False, [0, 0]),
            (input.detach(), weight.detach().requires_grad_(), None, [2, 1], [0, 2], [3, 2], [2, 1], True, [1, 1]),
        ):
            torch.library.opcheck(WITH_ARGMAX_OP, args)
            output, argmax = WITH_ARGMAX_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
            grad_output = torch.randn(output.shape, generator=generator).to(dtype)
            torch.library.opcheck(CONV_BACKWARD_OP, (grad_output, args[0].detach(), args[1].detach(), argmax, *args[3:], [True, True, True]))
        for parameter_dtype in (dtype, torch.float32):
            bn_weight = torch.rand(6, generator=generator).to(parameter_dtype) + 0.5
            bn_bias = torch.randn(6, generator=generator).to(parameter_dtype)
            geometry = ([1, 1], [1, 1], [3, 3], [2, 2], False, [1, 1])  # a padded pool
            training_args = (input.detach().requires_grad_(), weight.detach().requires_grad_(), bias.detach(), bn_weight.requires_grad_(), bn_bias, 1e-5, *geometry)
            torch.library.opcheck(TRAINING_OP, training_args)
            out, argmax, conv, mean, var = TRAINING_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in training_args])
            torch.library.opcheck(
                TRAINING_BACKWARD_OP,
                (torch.randn(out.shape, generator=generator).to(dtype), input.detach(), weight.detach(), conv, mean, var, bn_weight.detach(), argmax, 1e-5, *geometry, [True] * 5),
            )
            bn_input = torch.randn(3, 6, 5, 4, generator=generator).to(dtype).contiguous(memory_format=memory_format)
            mean_, var_ = torch.randn(6, generator=generator).to(parameter_dtype), torch.rand(6, generator=generator).to(parameter_dtype) + 0.5
            for training in (True, False):
                args = (bn_input.requires_grad_(), None if training else mean_, None if training else var_, bn_weight.detach().requires_grad_(), bn_bias, training, 1e-5)
                torch.library.opcheck(BN_FORWARD_OP, args)
                output, save_mean, save_var = BN_FORWARD_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
                torch.library.opcheck(BN_BACKWARD_OP, (torch.randn_like(output), bn_input.detach(), save_mean, save_var, bn_weight.detach(), training, 1e-5, [True, True, True]))


def integer_tensor(generator, *shape):
    return torch.randint(-2, 3, shape, generator=generator).float()


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("channels_last", [False, True])
def test_autocast_conv2d_relu_max_pool2d(dtype, channels_last):
    """As native conv2d under autocast: a 16-bit output, float32 parameter gradients. Integer
    data make every value exact in both, so they must agree to the last bit but for the
    rounding of large gradient sums."""
    generator = torch.Generator().manual_seed(0)
    input = integer_tensor(generator, 4, 3, 10, 10)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    layer = cifarnet.nn.Conv2dReLUMaxPool2d(3, 8, 3, padding=1)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    with torch.no_grad():
        layer.weight.copy_(integer_tensor(generator, 8, 3, 3, 3))
        layer.bias.copy_(integer_tensor(generator, 8))
    native[0].load_state_dict(layer.state_dict())
    grad = integer_tensor(generator, 4, 8, 5, 5).to(dtype)
    results = []
    for model in (layer, native):
        with torch.autocast("cpu", dtype=dtype):
            output = model(input)
        output.backward(grad)
        parameters = list(model.parameters())
        assert output.dtype == dtype
        assert all(p.grad.dtype == torch.float32 for p in parameters)
        results.append([output] + [p.grad for p in parameters])
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=2 * unit_roundoff(dtype), atol=0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_autocast_conv2d_batch_norm_relu_max_pool2d(dtype):
    """Training steps under autocast: 16-bit output, float32 running statistics and parameter
    gradients; values no worse than native autocast against the float64 model."""
    torch.manual_seed(0)
    ours = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 16, 3, padding=1)
    native = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
    native.load_state_dict({k.replace("bn.", "1.").replace("weight", "weight") if k.startswith("bn.") else "0." + k: v for k, v in ours.state_dict().items()})
    exact = copy.deepcopy(native).double()
    input = torch.randn(8, 3, 12, 12)
    outputs = []
    for model, run_dtype in ((ours, dtype), (native, dtype), (exact, None)):
        if run_dtype is None:
            output = model(input.double())
        else:
            with torch.autocast("cpu", dtype=run_dtype):
                output = model(input)
        output.float().sum().backward() if run_dtype else output.sum().backward()
        outputs.append((output, [p.grad for p in model.parameters()], [b for b in model.buffers() if b.is_floating_point()]))
    (ours_out, ours_grads, ours_buffers), (native_out, native_grads, native_buffers), (exact_out, exact_grads, exact_buffers) = outputs
    assert ours_out.dtype == dtype
    assert all(g.dtype == torch.float32 for g in ours_grads) and all(b.dtype == torch.float32 for b in ours_buffers)
    tolerance = dict(rtol=4 * unit_roundoff(dtype), atol=1e-6)
    assert_no_worse_than_native(ours_out, native_out, exact_out, "output", **tolerance)
    for index, (mine, theirs, reference) in enumerate(zip(ours_buffers, native_buffers, exact_buffers)):
        assert_no_worse_than_native(mine, theirs, reference, f"buffer {index}", **tolerance)
    for index, (mine, theirs, reference) in enumerate(zip(ours_grads, native_grads, exact_grads)):
        assert_no_worse_than_native(mine, theirs, reference, f"grad {index}", rtol=16 * unit_roundoff(dtype), atol=1e-4)


@pytest.mark.parametrize("dynamic", [False, True])
def test_autocast_under_torch_compile(dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 8, 3, padding=1)
    eager_layer = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, dynamic=dynamic)
    for batch in (4, 6):
        input = torch.randn(batch, 3, 10, 10)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = eager_layer(input)
            actual = compiled(input)
        assert actual.dtype == expected.dtype == torch.bfloat16
        torch.testing.assert_close(actual, expected)
        actual.float().sum().backward()
        expected.float().sum().backward()
    for (name, ours), theirs in zip(layer.named_parameters(), eager_layer.parameters()):
        assert ours.grad.dtype == torch.float32
        torch.testing.assert_close(ours.grad, theirs.grad, msg=name)
    torch.testing.assert_close(layer.bn.running_var, eager_layer.bn.running_var)


AVX2_SCRIPT = r"""
import torch, torch.nn.functional as F, cifarnet
from cifarnet.ops import conv2d_relu_max_pool2d, batch_norm, conv2d_batch_norm_relu_max_pool2d
assert cifarnet.build_info()["cpu_isa"].startswith(%r), cifarnet.build_info()["cpu_isa"]
g = torch.Generator().manual_seed(0)
for dtype in (torch.bfloat16, torch.float16):
    x = torch.randn(6, 5, 9, 9, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(19, 5, 3, 3, generator=g).to(dtype)
    ours = conv2d_relu_max_pool2d(x, w, None, padding=1)
    native = F.max_pool2d(F.relu(F.conv2d(x, w, None, padding=1)), 2)
    torch.testing.assert_close(ours, native, rtol=0.02, atol=0.02)
    b = torch.randn(19, generator=g).to(dtype)
    xs, ns = ([t.detach().clone().requires_grad_() for t in (x, w, b)] for _ in range(2))
    out = conv2d_relu_max_pool2d(*xs, padding=1)
    out.backward(torch.ones_like(out))
    assert xs[0].grad.dtype == dtype and xs[0].grad.isfinite().all()
    native_out = F.max_pool2d(F.relu(F.conv2d(*ns, padding=1)), 2)
    native_out.backward(torch.ones_like(native_out))
    # The bias gradient counts each channel's positive outputs (exact in 16 bits up to 256):
    # native's count, give or take one output that rounds to the other side of zero.
    torch.testing.assert_close(xs[2].grad.float(), ns[2].grad.float(), rtol=0, atol=1)
    y = torch.randn(4, 37, 5, 5, generator=g).to(dtype)
    torch.testing.assert_close(batch_norm(y, None, None, training=True).float(), F.batch_norm(y, None, None, training=True).float(), rtol=0.02, atol=0.02)
    bn = conv2d_batch_norm_relu_max_pool2d(x, w, None, None, None, torch.ones(19), torch.zeros(19), training=True, padding=1)
    assert bn.dtype == dtype and not bn.isnan().any()
print("ok")
"""


@pytest.mark.parametrize("isa, prefix", [("avx2", "avx2"), ("baseline", "baseline")])
def test_low_precision_without_avx512(isa, prefix):
    """A CPU without AVX-512 (and so without AVX512-BF16 or AMX) runs the same code: the loops'
    AVX2 or baseline variant, oneDNN capped at AVX2."""
    env = dict(os.environ, CIFARNET_CPU_ISA=isa, ONEDNN_MAX_CPU_ISA="AVX2")
    result = subprocess.run([sys.executable, "-c", AVX2_SCRIPT % prefix], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
