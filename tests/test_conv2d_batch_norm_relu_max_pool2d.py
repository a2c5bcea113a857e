"""cifarnet.ops.conv2d_batch_norm_relu_max_pool2d and its module against native layers."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import cifarnet
from cifarnet.nn import Conv2dBatchNormReLUMaxPool2d, SyncConv2dBatchNormReLUMaxPool2d
from cifarnet.ops import conv2d_batch_norm_relu_max_pool2d
from cifarnet._op_handles import TRAINING_BACKWARD_OP, TRAINING_OP
from conftest import DEVICES, EVALUATION_EPS_MESSAGE, TRAINING_EPS_MESSAGE
from op_cases import (
    assert_no_worse_than_native,
    assert_same_layout,
    conv_out,
    layer_cases,
    make_tensors,
    op_args,
    tolerances,
)

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))


def native_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, **pool):
    conv = F.conv2d(input, weight, bias, pool["stride"], pool["padding"])
    normalised = F.batch_norm(conv, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.max_pool2d(
        F.relu(normalised), pool["pool_size"], pool["pool_stride"], pool.get("pool_padding", 0), ceil_mode=pool["ceil_mode"]
    )


def exact_block(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, **pool):
    """``native_block`` as exact arithmetic computes it, the float64 reference: where a training
    batch's integer-valued convolution output equals its channel's mean, the normalised value
    is 0 and the ReLU's gradient there is 0. Native normalises with an FMA of a rounded shift
    (x * a + b), whose residue (1e-17, of either sign) picks a side of the kink by rounding."""
    conv = F.conv2d(input, weight, bias, pool["stride"], pool["padding"])
    normalised = F.batch_norm(conv, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    if training and bn_weight is None and bn_bias is None and torch.equal(conv, conv.round()):
        count = conv.numel() // conv.shape[1]
        at_mean = conv * count == conv.sum(dim=(0, 2, 3), keepdim=True)  # integers: exact
        normalised = torch.where(at_mean, torch.zeros_like(normalised), normalised)
    return F.max_pool2d(
        F.relu(normalised), pool["pool_size"], pool["pool_stride"], pool.get("pool_padding", 0), ceil_mode=pool["ceil_mode"]
    )


@st.composite
def block_cases(draw):
    case = draw(layer_cases())
    case["training"] = draw(st.booleans())
    # A constant channel has no variance: batch norm maps it to its bias plus whatever residue
    # its rounding of the mean leaves, which puts the ReLU at its kink, where either side is a
    # valid subgradient (native takes the side of its residue).
    assume(case["values"] != "zeros")
    conv_pixels = case["batch"] * conv_out(case["size"][0], case["kernel"][0], case["stride"][0], case["padding"][0])
    conv_pixels *= conv_out(case["size"][1], case["kernel"][1], case["stride"][1], case["padding"][1])
    assume(conv_pixels > 1 if case["training"] else case["batch"] > 0)
    if not case["training"]:
        # Evaluation folds the batch norm into the weights: exact ties no longer survive.
        assume(case["values"] in ("normal", "negative"))
    case["running_stats"] = draw(st.booleans()) or not case["training"]
    case["bn_affine"] = draw(st.booleans())
    case["momentum"] = draw(st.sampled_from([0.1, 0.9]))
    return case


def block_tensors(case, device):
    input, weight, bias, generator = make_tensors(case, device)
    channels, dtype = case["out_channels"], case["dtype"]

    def draw(scale, offset):
        return (offset + scale * torch.rand(channels, generator=generator, dtype=dtype)).to(device)

    bn_weight = draw(2.0, -0.5) if case["bn_affine"] else None  # negative scales reverse the pooling order
    bn_bias = draw(2.0, -1.0) if case["bn_affine"] else None
    running = (draw(2.0, -1.0), draw(1.0, 0.5)) if case["running_stats"] else None
    return input, weight, bias, bn_weight, bn_bias, running, generator


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=block_cases())
def test_forward_gradients_and_running_stats_match_native(case, device):
    check_block_against_native(case, device, conv2d_batch_norm_relu_max_pool2d)


def check_block_against_native(case, device, fused_op, rounding_bound=None):
    """``fused_op`` against the native composition in float64: no further off than native in
    the case's dtype, in its output, the running statistics it updates and its gradients.

    The convolution gradients are sums of products that a batch norm makes cancel (its output
    ignores the scale and shift of its input), so their float32 error is measured against the
    size of the summed terms: the same gradient computed from absolute values.
    ``rounding_bound(name, terms)`` gives the float32 bound on a convolution gradient from
    those (default: 1e-5 of each element's terms).
    """
    input, weight, bias, bn_weight, bn_bias, running, generator = block_tensors(case, device)
    tensors = [input, weight, bias, bn_weight, bn_bias]
    present = [i for i, t in enumerate(tensors) if t is not None]
    geometry = op_args(case)
    grad_output = None

    def run(function, dtype):
        nonlocal grad_output
        leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]
        # Copies: each run updates its own running statistics (t.to(dtype) alone would hand
        # every run of the case's dtype the same tensors, and compare them with themselves).
        stats = [t.to(dtype, copy=True) for t in running] if running else [None, None]
        output = function(
            leaves[0], leaves[1], leaves[2], stats[0], stats[1], leaves[3], leaves[4],
            training=case["training"], momentum=case["momentum"], eps=1e-5, **geometry
        )
        if grad_output is None:
            grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(device)
        grads = torch.autograd.grad(output, [leaves[i] for i in present], grad_output.to(dtype))
        return output, stats, grads

    fused, fused_stats, fused_grads = run(fused_op, case["dtype"])
    native, native_stats, native_grads = run(native_block, case["dtype"])
    assert fused.shape == native.shape and fused.dtype == case["dtype"]
    assert_same_layout(fused, native)
    if case["values"] == "nan":
        # NaN spreads through the batch statistics to whole channels: compare the NaN pattern
        # and the rest with native in the same dtype.
        for ours, theirs in zip([fused, *fused_stats, *fused_grads], [native, *native_stats, *native_grads]):
            if ours is not None:
                torch.testing.assert_close(ours, theirs, equal_nan=True, **tolerances(case["dtype"]))
        return
    exact, exact_stats, exact_grads = run(exact_block, torch.float64)
    tolerance = dict(rtol=1e-5, atol=1e-5) if case["dtype"] == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    assert_no_worse_than_native(fused, native, exact, "output", **tolerance)
    for name, ours, theirs, reference in zip(("running_mean", "running_var"), fused_stats, native_stats, exact_stats):
        if ours is not None:
            assert_no_worse_than_native(ours, theirs, reference, name, **tolerance)
    terms = conv_gradient_term_scales(input, weight, geometry, exact_grad_conv(tensors, running, case, grad_output))
    names = ["input", "weight", "bias", "bn_weight", "bn_bias"]
    rounding_bound = rounding_bound or (lambda name, terms: 1e-5 * terms)
    for i, ours, theirs, reference in zip(present, fused_grads, native_grads, exact_grads):
        if i < 3 and case["dtype"] == torch.float32:
            assert torch.equal(ours.isnan(), reference.isnan()), f"grad {names[i]}: NaN pattern differs"
            error = (ours.double() - reference).abs().nan_to_num()
            # Or no worse than native in float32, which in degenerate batches (a few values per
            # channel, most of them padding) misses the first bound too.
            native_error = (theirs.double() - reference).abs().nan_to_num().max()
            bound = rounding_bound(names[i], terms[i].nan_to_num())
            assert (error <= bound + 1e-6 + 4 * native_error).all(), (
                f"grad {names[i]}: error {error.max().item():.3g} exceeds the rounding bound on "
                f"its summed terms and 4x native's {native_error.item():.3g}"
            )
        else:
            assert_no_worse_than_native(ours, theirs, reference, f"grad {names[i]}", **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "wrong_update",
    [
        pytest.param(lambda mean, var: mean.add_(1e-3), id="mean-off-by-1e-3"),
        pytest.param(lambda mean, var: var.mul_(1.001), id="var-off-by-0.1%"),
    ],
)
def test_running_stats_check_catches_a_wrong_update(dtype, wrong_update):
    """The property test's check fails for an op whose running statistics are slightly off."""

    def wrong_op(*args, **kwargs):
        output = conv2d_batch_norm_relu_max_pool2d(*args, **kwargs)
        with torch.no_grad():
            wrong_update(args[3], args[4])
        return output

    case = dict(
        batch=3, in_channels=2, out_channels=3, size=(8, 7), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
        pool_size=(2, 2), pool_stride=None, ceil_mode=False, pool_padding=(0, 0), bias=True, input_channels_last=False,
        weight_channels_last=False, dtype=dtype, values="normal", seed=7, training=True, running_stats=True,
        bn_affine=True, momentum=0.1,
    )
    check_block_against_native(case, "cpu", conv2d_batch_norm_relu_max_pool2d)  # the case itself passes
    with pytest.raises(AssertionError, match="running_(mean|var)"):
        check_block_against_native(case, "cpu", wrong_op)


def test_a_nan_in_a_channel_makes_its_running_stats_nan_as_native():
    """The smallest case the property test finds once each run has its own running statistics."""
    input = torch.tensor([[[[float("nan")]]], [[[1.0]]]])
    weight = torch.ones(1, 1, 1, 1)
    ours = [torch.zeros(1), torch.ones(1)]
    native = [t.clone() for t in ours]
    conv2d_batch_norm_relu_max_pool2d(input, weight, None, *ours, None, None, training=True, pool_size=(1, 1))
    native_block(input, weight, None, *native, None, None, True, 0.1, 1e-5, stride=1, padding=0, pool_size=1, pool_stride=None, ceil_mode=False)
    for name, mine, theirs in zip(("running_mean", "running_var"), ours, native):
        torch.testing.assert_close(mine, theirs, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")


def exact_grad_conv(tensors, running, case, grad_output):
    """The float64 gradient of the block with respect to the convolution output."""
    input, weight, bias, bn_weight, bn_bias = (t.double() if t is not None else None for t in tensors)
    geometry = op_args(case)
    conv = F.conv2d(input, weight, bias, geometry["stride"], geometry["padding"]).requires_grad_()
    stats = [t.to(torch.float64, copy=True) for t in running] if running else [None, None]
    # exact_block from the convolution output on (a 1x1 identity convolution)
    identity = torch.eye(conv.shape[1], dtype=torch.float64, device=conv.device)[:, :, None, None]
    output = exact_block(
        conv, identity, None, stats[0], stats[1], bn_weight, bn_bias, case["training"], case["momentum"], 1e-5,
        **{**geometry, "stride": 1, "padding": 0},
    )
    return torch.autograd.grad(output, conv, grad_output)[0]


def conv_gradient_term_scales(input, weight, geometry, grad_conv):
    """Per element of the input, weight and bias gradients: the sum of the absolute values of
    the products they add up (the gradient of |input|, |weight| and |grad_conv|)."""
    x, w, g = input.double().abs(), weight.double().abs(), grad_conv.abs()
    stride, padding = geometry["stride"], geometry["padding"]
    return [
        torch.nn.grad.conv2d_input(x.shape, w, g, stride, padding),
        torch.nn.grad.conv2d_weight(x, w.shape, g, stride, padding),
        g.sum((0, 2, 3)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "batch, in_channels, out_channels, size, ceil_mode, pool",
    # the study's layers (floor pools tile the output; 7x7 with ceil mode clips the last
    # window), an odd size whose floor pool leaves a row and column uncovered, and padded pools
    # (a ResNet stem's, and 2x2 windows that would tile but for the padding)
    [
        (32, 3, 32, 32, False, {}),
        (16, 32, 64, 16, False, {}),
        (16, 64, 64, 7, True, {}),
        (8, 16, 32, 9, False, {}),
        (8, 3, 64, 16, False, dict(pool_size=3, pool_stride=2, pool_padding=1)),
        (8, 16, 32, 9, True, dict(pool_padding=1)),
    ],
)
def test_study_shapes_match_native(device, dtype, batch, in_channels, out_channels, size, ceil_mode, pool):
    generator = torch.Generator().manual_seed(size)

    def draw(*shape, scale=1.0, offset=0.0):
        return (offset + scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(device)

    tensors = [draw(batch, in_channels, size, size), draw(out_channels, in_channels, 5, 5, scale=0.1), draw(out_channels), draw(out_channels, offset=1.0, scale=0.3), draw(out_channels)]
    geometry = dict(dict(stride=1, padding=2, pool_size=2, pool_stride=None, ceil_mode=ceil_mode), **pool)
    grad_output = None
    results = []
    for function, run_dtype in ((conv2d_batch_norm_relu_max_pool2d, dtype), (native_block, dtype), (native_block, torch.float64)):
        leaves = [t.to(run_dtype).requires_grad_() for t in tensors]
        running_mean = torch.zeros(out_channels, dtype=run_dtype, device=device)
        running_var = torch.ones(out_channels, dtype=run_dtype, device=device)
        output = function(leaves[0], leaves[1], leaves[2], running_mean, running_var, leaves[3], leaves[4], True, 0.1, 1e-5, **geometry)
        if grad_output is None:
            grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64).to(device)
        results.append([output, running_mean, running_var, *torch.autograd.grad(output, leaves, grad_output.to(run_dtype))])
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    names = ["output", "running_mean", "running_var", "grad input", "grad weight", "grad bias", "grad bn_weight", "grad bn_bias"]
    for name, ours, native, exact in zip(names, *results):
        assert_no_worse_than_native(ours, native, exact, name, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "pool",
    [dict(pool_size=(2, 3), pool_stride=(2, 1), ceil_mode=True), dict(pool_size=3, pool_stride=2, ceil_mode=True, pool_padding=1)],
    ids=["pool", "padded_pool"],
)
def test_gradcheck_float64(device, training, pool):
    generator = torch.Generator().manual_seed(5)

    def draw(*shape, offset=0.0):
        return (offset + torch.randn(shape, dtype=torch.float64, generator=generator)).to(device)

    tensors = (draw(3, 2, 7, 6), draw(4, 2, 3, 3), draw(4), draw(4, offset=1.0), draw(4))
    running_mean, running_var = draw(4), draw(4).abs() + 0.5

    def fn(input, weight, bias, bn_weight, bn_bias):
        return conv2d_batch_norm_relu_max_pool2d(
            input, weight, bias, running_mean.clone(), running_var.clone(), bn_weight, bn_bias,
            training=training, padding=1, **pool,
        )

    # gradcheck runs the backward twice and wants bitwise-equal results; cuDNN's convolution
    # backward may pick non-deterministic (atomic) algorithms unless told not to. (Seen on an
    # H200 with torch 2.11: "Backward is not reentrant" in training mode.)
    cudnn = torch.backends.cudnn
    with cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True, allow_tf32=False):
        assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in tensors), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    generator = torch.Generator().manual_seed(6)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64):
            input = torch.randn(3, 4, 9, 8, dtype=dtype, generator=generator).to(device).contiguous(memory_format=memory_format)
            weight = torch.randn(6, 4, 3, 3, dtype=dtype, generator=generator).to(device)
            bias, bn_weight, bn_bias = (torch.randn(6, dtype=dtype, generator=generator).to(device) for _ in range(3))
            for geometry in (
                [[1, 1], [1, 1], [2, 2], [], False, [0, 0]],
                [[2, 1], [0, 1], [3, 2], [2, 1], True, [0, 0]],
                [[1, 1], [1, 1], [3, 2], [2, 2], True, [1, 1]],
            ):
                args = (input.requires_grad_(), weight.requires_grad_(), bias, bn_weight.requires_grad_(), None, 1e-5, *geometry)
                torch.library.opcheck(TRAINING_OP, args)
                output, argmax, conv_output, save_mean, save_var = TRAINING_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
                backward_args = (torch.randn_like(output), input.detach(), weight.detach(), conv_output, save_mean, save_var, bn_weight.detach(), argmax, 1e-5, *geometry)
                torch.library.opcheck(TRAINING_BACKWARD_OP, (*backward_args, [True, True, True, True, True]))
                torch.library.opcheck(TRAINING_BACKWARD_OP, (*backward_args, [False, True, False, True, False]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(device, dynamic):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Conv2dBatchNormReLUMaxPool2d(3, 8, 3, padding=1, pool_size=3, pool_stride=2, pool_padding=1).to(device)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, dynamic=dynamic)
    for mode in ("train", "eval"):
        eager.train(mode == "train"), compiled_module.train(mode == "train")
        for batch in (4, 6):
            input = torch.randn(batch, 3, 11, 11, device=device, requires_grad=True)
            expected, actual = eager(input), compiled(input)
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(torch.autograd.grad(actual.sum(), input)[0], torch.autograd.grad(expected.sum(), input)[0])
    torch.testing.assert_close(compiled_module.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(compiled_module.bn.running_var, eager.bn.running_var)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_input_conv_output_statistics_and_one_byte_argmax(device):
    layer = Conv2dBatchNormReLUMaxPool2d(3, 8, 5, padding=2).to(device)
    input = torch.randn(4, 3, 16, 16, device=device, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        output = layer(input)
    conv_sized = [t for t in saved if t.numel() == 4 * 8 * 16 * 16]
    assert len(conv_sized) == 1 and conv_sized[0].dtype == torch.float32, "exactly one activation-sized tensor: the convolution output"
    assert [t.dtype for t in saved if t.shape == output.shape] == [torch.uint8], "the argmax, one byte per output"
    # Per channel: the mean and variance, and the three parameters (the module's own tensors).
    assert sum(t.numel() for t in saved) == input.numel() + layer.weight.numel() + conv_sized[0].numel() + 5 * 8 + output.numel()


def _bad_cases():
    return [
        ("bn_weight size", dict(bn_weight=torch.ones(5)), "bn_weight should contain 4 elements", RuntimeError),
        ("running_var size", dict(running_var=torch.ones(3)), "running_var should contain 4 elements", RuntimeError),
        ("eval without stats", dict(training=False, running_mean=None, running_var=None), "must be defined in evaluation mode", RuntimeError),
        ("one value per channel", dict(input=torch.randn(1, 3, 3, 3), pool_size=1), "Expected more than 1 value per channel when training", ValueError),
        ("channel mismatch", dict(input=torch.randn(2, 5, 8, 8)), "input has 5 channels", RuntimeError),
        # (in training an input without elements is the native chain's, whose max_pool2d refuses it)
        ("no input channels in evaluation", dict(input=torch.randn(2, 0, 8, 8), weight=torch.randn(4, 0, 3, 3), training=False),
         "weight must have at least one input channel", RuntimeError),
        ("eps zero in training", dict(eps=0.0), TRAINING_EPS_MESSAGE, ValueError),
        ("eps negative in evaluation", dict(eps=-1.0, training=False), EVALUATION_EPS_MESSAGE, ValueError),
        ("eps zero in an empty batch", dict(eps=0.0, input=torch.randn(0, 3, 8, 8)), "eps must be positive", ValueError),
        ("pool padding over half the window", dict(pool_padding=2), "pool_padding should be at most half of pool_size", RuntimeError),
        ("pool padding over half in evaluation", dict(pool_padding=(0, 2), training=False), "pool_padding should be at most half", RuntimeError),
        # the convolution's refusal, as in the native chain, before any parameter's dtype is blamed
        ("integer input", dict(input=torch.randint(0, 5, (2, 3, 8, 8)), weight=torch.randint(0, 5, (4, 3, 3, 3))),
         "input must be float32, float64, float16 or bfloat16, got Long", RuntimeError),
        ("running_mean requiring grad in evaluation", dict(running_mean=torch.zeros(4, requires_grad=True), training=False),
         "running_mean cannot have requires_grad=True", RuntimeError),
        # evaluation folds the bias into another: it is checked first, as conv2d checks it
        ("bias of one element in evaluation", dict(bias=torch.randn(1), training=False), "bias should contain 4 elements", RuntimeError),
        ("0-d bias in evaluation", dict(bias=torch.tensor(0.5), training=False), "bias should contain 4 elements", RuntimeError),
        ("(4, 1) bias in evaluation", dict(bias=torch.randn(4, 1), training=False), "got shape [4, 1]", RuntimeError),
        ("float64 bias in evaluation", dict(bias=torch.randn(4, dtype=torch.float64), training=False), "bias dtype Double does not match weight dtype Float", RuntimeError),
        ("integer bias in evaluation", dict(bias=torch.arange(4), training=False), "bias dtype Long does not match weight dtype Float", RuntimeError),
    ]


@pytest.mark.parametrize("name, overrides, message, error", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input_raises_a_clear_error(name, overrides, message, error):
    args = dict(
        input=torch.randn(2, 3, 8, 8), weight=torch.randn(4, 3, 3, 3), bias=None, running_mean=torch.zeros(4),
        running_var=torch.ones(4), bn_weight=None, bn_bias=None, training=True,
    )
    args.update(overrides)
    with pytest.raises(error) as info:
        conv2d_batch_norm_relu_max_pool2d(**args)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_module_matches_native_sequential_over_training_then_eval(device, momentum):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 8, 3, padding=1).double(), nn.BatchNorm2d(8, momentum=momentum).double()
    native = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2)).to(device)
    fused = Conv2dBatchNormReLUMaxPool2d(3, 8, 3, padding=1, momentum=momentum).double().to(device)
    fused.load_state_dict({"weight": conv.weight, "bias": conv.bias, **{f"bn.{k}": v for k, v in bn.state_dict().items()}})
    for step in range(4):
        input = torch.randn(5, 3, 10, 10, dtype=torch.float64, device=device)
        torch.testing.assert_close(fused(input), native(input))
    for key, value in bn.state_dict().items():
        torch.testing.assert_close(fused.bn.state_dict()[key], value)
    fused.eval(), native.eval()
    input = torch.randn(5, 3, 10, 10, dtype=torch.float64, device=device)
    torch.testing.assert_close(fused(input), native(input))


def test_from_modules_shares_parameters_and_maps_state_dict_keys():
    conv, bn, pool = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)
    fused = Conv2dBatchNormReLUMaxPool2d.from_modules(conv, bn, pool)
    assert fused.weight is conv.weight and fused.bn is bn
    expected = [k for k in conv.state_dict()] + [f"bn.{k}" for k in bn.state_dict()]
    assert list(fused.state_dict()) == expected
    with pytest.raises(ValueError, match="num_features"):
        Conv2dBatchNormReLUMaxPool2d.from_modules(conv, nn.BatchNorm2d(5), pool)
    assert "ceil_mode=False" in repr(fused) and isinstance(fused.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("conv_training", [True, False])
def test_from_modules_takes_the_conv_mode_and_leaves_the_batch_norm_its_own(conv_training):
    conv, bn, pool = nn.Conv2d(3, 4, 3).train(conv_training), nn.BatchNorm2d(4).train(not conv_training), nn.MaxPool2d(2)
    fused = Conv2dBatchNormReLUMaxPool2d.from_modules(conv, bn, pool)
    assert fused.training is conv_training and bn.training is not conv_training
    sync = SyncConv2dBatchNormReLUMaxPool2d.from_layer(fused)
    assert sync.training is conv_training and sync.bn.training is not conv_training


def test_same_seed_gives_the_native_pair_initialisation():
    torch.manual_seed(3)
    conv, bn = nn.Conv2d(3, 6, 5), nn.BatchNorm2d(6)
    torch.manual_seed(3)
    fused = Conv2dBatchNormReLUMaxPool2d(3, 6, 5)
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)
    assert torch.equal(fused.bn.weight, bn.weight) and torch.equal(fused.bn.running_var, bn.running_var)
    assert isinstance(fused.bn, cifarnet.nn.BatchNorm2d)
