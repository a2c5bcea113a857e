"""The phase ops of synchronized batch norm against the fused ops they split (bit for bit),
opcheck, empty batches and bad input."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import DEVICES, EVALUATION_EPS_MESSAGE
from op_cases import conv_out, layer_cases, make_tensors

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))
OPS = torch.ops.cifarnet
TRAINING_OP = OPS._conv2d_batch_norm_relu_max_pool2d_training.default
TRAINING_BACKWARD_OP = OPS._conv2d_batch_norm_relu_max_pool2d_training_backward.default
STATS_OP = OPS._conv2d_batch_norm_relu_max_pool2d_stats.default
EPILOGUE_OP = OPS._conv2d_batch_norm_relu_max_pool2d_epilogue.default
REDUCE_OP = OPS._conv2d_batch_norm_relu_max_pool2d_backward_reduce.default
ELEMENTWISE_OP = OPS._conv2d_batch_norm_relu_max_pool2d_backward_elementwise.default
BN_FORWARD_OP = OPS._batch_norm_forward.default
BN_BACKWARD_OP = OPS._batch_norm_backward.default
BN_STATS_OP = OPS._batch_norm_stats.default
BN_REDUCE_OP = OPS._batch_norm_backward_reduce.default
BN_ELEMENTWISE_OP = OPS._batch_norm_backward_elementwise.default
EPS = 1e-5


def geometry(case):
    return [
        list(case["stride"]), list(case["padding"]), list(case["pool_size"]), list(case["pool_stride"] or []),
        case["ceil_mode"], list(case["pool_padding"]),
    ]  # fmt: skip


def conv_pixels(case):
    height = conv_out(case["size"][0], case["kernel"][0], case["stride"][0], case["padding"][0])
    width = conv_out(case["size"][1], case["kernel"][1], case["stride"][1], case["padding"][1])
    return case["batch"] * height * width


def assert_identical(actual, expected, name):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, name
    assert actual.stride() == expected.stride() or actual.numel() <= 1, f"{name}: strides {actual.stride()} != {expected.stride()}"
    assert torch.equal(actual.nan_to_num(7.0), expected.nan_to_num(7.0)), f"{name} differs"


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=layer_cases(), bn_affine=st.booleans())
def test_phase_ops_compose_to_the_fused_op_exactly(case, bn_affine, device):
    """stats -> epilogue is the fused training op, and backward_reduce -> backward_elementwise
    (with this batch's count) its backward, bit for bit: the same loops in the same order."""
    assume(conv_pixels(case) > 1)
    input, weight, bias, generator = make_tensors(case, device)
    channels = case["out_channels"]
    bn_weight = (torch.rand(channels, generator=generator, dtype=case["dtype"]) * 2 - 0.5).to(device) if bn_affine else None
    bn_bias = torch.randn(channels, generator=generator, dtype=case["dtype"]).to(device) if bn_affine else None
    geo = geometry(case)

    output, argmax, conv_output, mean, var = TRAINING_OP(input, weight, bias, bn_weight, bn_bias, EPS, *geo)
    phase_conv, phase_mean, phase_var = STATS_OP(input, weight, bias, *geo)
    phase_output, phase_argmax = EPILOGUE_OP(input, weight, phase_conv, phase_mean, phase_var, bn_weight, bn_bias, EPS, *geo)
    for name, actual, expected in [
        ("conv_output", phase_conv, conv_output),
        ("mean", phase_mean, mean),
        ("var", phase_var, var),
        ("output", phase_output, output),
        ("argmax", phase_argmax, argmax),
    ]:
        assert_identical(actual, expected, name)

    grad = torch.randn(output.shape, generator=generator, dtype=case["dtype"]).to(device)
    expected = TRAINING_BACKWARD_OP(grad, input, weight, conv_output, mean, var, bn_weight, argmax, EPS, *geo, [True] * 5)
    sum_dy, sum_dy_xmu = REDUCE_OP(grad, input, weight, conv_output, mean, argmax, *geo)
    grads = ELEMENTWISE_OP(
        grad, input, weight, conv_output, mean, var, bn_weight, argmax, sum_dy, sum_dy_xmu, conv_pixels(case), EPS, *geo, [True] * 3
    )
    for name, actual, wanted in zip(("grad_input", "grad_weight", "grad_bias"), grads, expected[:3]):
        assert_identical(actual, wanted, name)
    # The batch-norm parameters' gradients are the sums themselves (times invstd).
    torch.testing.assert_close(sum_dy.to(expected[4].dtype), expected[4], rtol=1e-12, atol=0, equal_nan=True)
    grad_bn_weight = (sum_dy_xmu * torch.rsqrt(var + EPS)).to(expected[3].dtype)
    torch.testing.assert_close(grad_bn_weight, expected[3], rtol=1e-12, atol=1e-300, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(
    shape=st.sampled_from([(4, 3), (3, 5, 7), (2, 19, 3, 4), (5, 8, 2, 3)]),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    affine=st.booleans(),
    offset=st.sampled_from([0.0, 1e3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_norm_phase_ops_compose_to_the_batch_norm_ops_exactly(shape, channels_last, dtype, affine, offset, seed, device):
    """_batch_norm_stats -> _batch_norm_forward in evaluation mode is the training forward, and
    backward_reduce -> backward_elementwise the training backward, bit for bit."""
    generator = torch.Generator().manual_seed(seed)
    input = (torch.randn(shape, generator=generator, dtype=torch.float64) + offset).to(dtype).to(device)
    if channels_last and input.dim() == 4:
        input = input.contiguous(memory_format=torch.channels_last)
    channels = shape[1]
    weight = torch.randn(channels, generator=generator, dtype=dtype).to(device) if affine else None
    bias = torch.randn(channels, generator=generator, dtype=dtype).to(device) if affine else None

    output, mean, var = BN_FORWARD_OP(input, None, None, weight, bias, True, EPS)
    phase_mean, phase_var = BN_STATS_OP(input)
    phase_output, _, _ = BN_FORWARD_OP(input, phase_mean, phase_var, weight, bias, False, EPS)
    for name, actual, expected in [("mean", phase_mean, mean), ("var", phase_var, var), ("output", phase_output, output)]:
        assert_identical(actual, expected, name)

    grad = torch.randn(shape, generator=generator, dtype=dtype).to(device)
    expected = BN_BACKWARD_OP(grad, input, mean, var, weight, True, EPS, [True, True, True])
    sum_dy, sum_dy_xmu = BN_REDUCE_OP(grad, input, mean)
    count = input.numel() // channels
    grad_input = BN_ELEMENTWISE_OP(grad, input, mean, var, weight, sum_dy, sum_dy_xmu, count, EPS)
    assert_identical(grad_input, expected[0], "grad_input")
    # The parameters' gradients are the sums themselves (times invstd), in the statistics dtype.
    torch.testing.assert_close(sum_dy, expected[2], rtol=1e-12, atol=0)
    torch.testing.assert_close(sum_dy_xmu * torch.rsqrt(var + EPS), expected[1], rtol=1e-12, atol=1e-300)


def test_phase_ops_take_an_empty_batch():
    """A process of a synchronized batch may get no samples: zero statistics and sums, empty
    outputs, zero parameter gradients."""
    input, weight, bias = torch.randn(0, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    geo = [[1, 1], [1, 1], [2, 2], [], False, [0, 0]]
    conv, mean, var = STATS_OP(input, weight, bias, *geo)
    assert conv.shape == (0, 5, 8, 8) and mean.tolist() == [0.0] * 5 and var.tolist() == [0.0] * 5
    output, argmax = EPILOGUE_OP(input, weight, conv, mean + 1, var + 1, None, None, EPS, *geo)
    assert output.shape == argmax.shape == (0, 5, 4, 4)
    grad = torch.empty_like(output)
    sum_dy, sum_dy_xmu = REDUCE_OP(grad, input, weight, conv, mean, argmax, *geo)
    assert sum_dy.tolist() == sum_dy_xmu.tolist() == [0.0] * 5
    grad_input, grad_weight, grad_bias = ELEMENTWISE_OP(
        grad, input, weight, conv, mean, var + 1, None, argmax, sum_dy + 1, sum_dy_xmu + 1, 64, EPS, *geo, [True, True, True]
    )
    assert grad_input.shape == input.shape
    assert torch.equal(grad_weight, torch.zeros_like(weight)) and torch.equal(grad_bias, torch.zeros_like(bias))

    bn_input = torch.randn(0, 4, 3, 3)
    bn_mean, bn_var = BN_STATS_OP(bn_input)
    assert bn_mean.tolist() == bn_var.tolist() == [0.0] * 4
    assert BN_REDUCE_OP(bn_input, bn_input, bn_mean)[0].tolist() == [0.0] * 4
    assert BN_ELEMENTWISE_OP(bn_input, bn_input, bn_mean, bn_var + 1, None, bn_mean, bn_mean, 10, EPS).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    generator = torch.Generator().manual_seed(14)
    geometries = ([[1, 1], [1, 1], [2, 2], [], False, [0, 0]], [[2, 1], [0, 1], [3, 2], [2, 1], True, [1, 1]])
    for memory_format in (torch.contiguous_format, torch.channels_last):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            input = torch.randn(3, 4, 9, 8, generator=generator).to(dtype).to(device).contiguous(memory_format=memory_format)
            weight = torch.randn(6, 4, 3, 3, generator=generator).to(dtype).to(device)
            bias, bn_weight, bn_bias = (torch.randn(6, generator=generator).to(dtype).to(device) for _ in range(3))
            for geo in geometries:
                conv, mean, var = STATS_OP(input, weight, bias, *geo)
                output, argmax = EPILOGUE_OP(input, weight, conv, mean, var, bn_weight, bn_bias, EPS, *geo)
                grad = torch.randn(output.shape, generator=generator).to(dtype).to(device)
                sum_dy, sum_dy_xmu = REDUCE_OP(grad, input, weight, conv, mean, argmax, *geo)
                count = conv.shape[0] * conv.shape[2] * conv.shape[3]
                torch.library.opcheck(STATS_OP, (input, weight, bias, *geo))
                torch.library.opcheck(EPILOGUE_OP, (input, weight, conv, mean, var, bn_weight, bn_bias, EPS, *geo))
                torch.library.opcheck(REDUCE_OP, (grad, input, weight, conv, mean, argmax, *geo))
                for mask in ([True, True, True], [False, True, False]):
                    torch.library.opcheck(
                        ELEMENTWISE_OP,
                        (grad, input, weight, conv, mean, var, bn_weight, argmax, sum_dy, sum_dy_xmu, 2 * count, EPS, *geo, mask),
                    )
            channels = input.shape[1]
            bn_mean, bn_var = BN_STATS_OP(input)
            bn_grad = torch.randn(input.shape, generator=generator).to(dtype).to(device)
            bn_sums = BN_REDUCE_OP(bn_grad, input, bn_mean)
            torch.library.opcheck(BN_STATS_OP, (input,))
            torch.library.opcheck(BN_REDUCE_OP, (bn_grad, input, bn_mean))
            torch.library.opcheck(
                BN_ELEMENTWISE_OP, (bn_grad, input, bn_mean, bn_var, bn_weight[:channels], *bn_sums, 3 * 9 * 8 * 2, EPS)
            )


@pytest.mark.parametrize(
    "op, overrides, message",
    [
        ("epilogue", dict(mean=torch.zeros(5, dtype=torch.float64)), "mean should contain 6 elements"),
        ("epilogue", dict(conv_output=torch.zeros(3, 6, 4, 4)), "conv_output must have shape [3, 6, 9, 8]"),
        ("epilogue", dict(eps=-1.0), f"{EVALUATION_EPS_MESSAGE}, but got -1"),
        ("elementwise", dict(count=10), "at least this process's 216 and positive, got 10"),
        ("elementwise", dict(sum_dy=torch.zeros(6, 1, dtype=torch.float64)), "sum_dy must have shape [6]"),
        ("reduce", dict(argmax=torch.zeros(3, 6, 4, 4, dtype=torch.int64)), "argmax must be uint8"),
        ("bn_elementwise", dict(count=0), "positive, got 0"),
        ("bn_reduce", dict(mean=torch.zeros(3)), "mean should contain 4 elements"),
    ],
)
def test_phase_ops_bad_input_raises_a_clear_error(op, overrides, message):
    input, weight = torch.randn(3, 4, 9, 8), torch.randn(6, 4, 3, 3)
    geo = dict(stride=[1, 1], padding=[1, 1], pool_size=[2, 2], pool_stride=[], ceil_mode=False, pool_padding=[0, 0])
    conv, mean, var = STATS_OP(input, weight, None, *geo.values())
    output, argmax = EPILOGUE_OP(input, weight, conv, mean, var, None, None, EPS, *geo.values())
    grad = torch.randn_like(output)
    sums = dict(sum_dy=torch.zeros(6, dtype=torch.float64), sum_dy_xmu=torch.zeros(6, dtype=torch.float64))
    calls = {
        "epilogue": (EPILOGUE_OP, dict(input=input, weight=weight, conv_output=conv, mean=mean, var=var, bn_weight=None, bn_bias=None, eps=EPS, **geo)),
        "reduce": (REDUCE_OP, dict(grad_output=grad, input=input, weight=weight, conv_output=conv, save_mean=mean, argmax=argmax, **geo)),
        "elementwise": (
            ELEMENTWISE_OP,
            dict(
                grad_output=grad, input=input, weight=weight, conv_output=conv, save_mean=mean, save_var=var, bn_weight=None,
                argmax=argmax, **sums, count=3 * 9 * 8, eps=EPS, **geo, output_mask=[True, True, True],
            ),
        ),
        "bn_reduce": (BN_REDUCE_OP, dict(grad_output=input, input=input, mean=torch.zeros(4))),
        "bn_elementwise": (
            BN_ELEMENTWISE_OP,
            dict(grad_output=input, input=input, mean=torch.zeros(4), var=torch.ones(4), weight=None,
                 sum_dy=torch.zeros(4), sum_dy_xmu=torch.zeros(4), count=216, eps=EPS),
        ),
    }  # fmt: skip
    fn, arguments = calls[op]
    # eps raises F.batch_norm's ValueError, the rest RuntimeErrors
    with pytest.raises(ValueError if "eps" in overrides else RuntimeError, match=None) as error:
        fn(**{**arguments, **overrides})
    assert message in str(error.value)
