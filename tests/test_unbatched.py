"""Unbatched and other non-4-D inputs: the fused ops and modules take what the native ones take.

The cases are PyTorch's own OpInfo samples for ``F.conv2d``, ``F.max_pool2d`` and
``F.batch_norm`` (``op_cases.opinfo_samples``), kept where the fused ops compute them (no
dilation, no groups, no indices), each against native torch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import cifarnet
from cifarnet import ops
from cifarnet.nn import BatchNorm1d, BatchNorm2d, Conv2dBatchNormReLUMaxPool2d, Conv2dReLUMaxPool2d
from conftest import native_conv2d_relu_max_pool2d
from op_cases import assert_same_layout, opinfo_samples

FLOAT64 = {"rtol": 1e-9, "atol": 1e-9}


def two(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def conv_samples() -> list[dict]:
    """OpInfo's conv2d samples without dilation or groups, as conv arguments."""
    cases = []
    for sample in opinfo_samples("nn.functional.conv2d"):
        weight, bias = (*sample.args, None)[:2]
        kwargs = sample.kwargs
        if kwargs.get("groups", 1) != 1 or two(kwargs.get("dilation", 1)) != (1, 1):
            continue
        padding = kwargs.get("padding", 0)
        if padding == "same":
            if any(k % 2 == 0 for k in weight.shape[2:]):
                continue
            padding = (weight.shape[2] // 2, weight.shape[3] // 2)
        padding = 0 if padding == "valid" else padding
        cases.append(dict(input=sample.input, weight=weight, bias=bias, stride=kwargs.get("stride", 1), padding=padding))
    return cases


def max_pool_samples() -> list[dict]:
    """OpInfo's max_pool2d samples without dilation or indices, as pool arguments."""
    cases = []
    for sample in opinfo_samples("nn.functional.max_pool2d"):
        kwargs = {**dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode"), sample.args)), **sample.kwargs}
        if two(kwargs.get("dilation", 1)) != (1, 1):
            continue
        if kwargs.get("return_indices", False):
            continue
        cases.append(
            dict(
                input=sample.input,
                pool_size=kwargs["kernel_size"],
                pool_stride=kwargs.get("stride"),
                ceil_mode=kwargs.get("ceil_mode", False),
                pool_padding=kwargs.get("padding", 0),
            )
        )
    return cases


def batch_norm_samples() -> list[dict]:
    cases = []
    for sample in opinfo_samples("nn.functional.batch_norm"):
        names = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        cases.append({"input": sample.input, **dict(zip(names, sample.args)), **sample.kwargs})
    return cases


def describe(case: dict) -> str:
    return " ".join(f"{k}={tuple(v.shape) if isinstance(v, torch.Tensor) else v}" for k, v in case.items())


def distinct(cases: list[dict]) -> list[dict]:
    """One case per description (OpInfo repeats shapes and arguments with other values)."""
    return list({describe(case): case for case in cases}.values())


CONV_SAMPLES = distinct(conv_samples())
MAX_POOL_SAMPLES = distinct(max_pool_samples())
BATCH_NORM_SAMPLES = distinct(batch_norm_samples())


def test_opinfo_samples_include_unbatched_inputs():
    # The samples this file relies on: if torch's OpInfos change, say so here.
    assert {case["input"].dim() for case in CONV_SAMPLES} == {3, 4}
    assert {case["input"].dim() for case in MAX_POOL_SAMPLES} == {3, 4}
    assert {case["input"].dim() for case in BATCH_NORM_SAMPLES} >= {2, 3, 4}


def pool_for(conv_output_size) -> tuple[int, int]:
    """A 2x2 pool where the convolution output allows it (OpInfo's outputs can be 1 wide)."""
    return tuple(min(2, size) for size in conv_output_size)


def run(function, tensors: dict, grad_seed: int = 0):
    """Output and the gradients of a seeded projection of it w.r.t. ``tensors`` (by name)."""
    leaves = {name: tensor.detach().clone().requires_grad_(True) for name, tensor in tensors.items() if tensor is not None}
    output = function(**{**tensors, **leaves})
    projection = torch.randn(output.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=output.dtype)
    grads = torch.autograd.grad(output, list(leaves.values()), projection, allow_unused=True) if output.numel() else ()
    return output, dict(zip(leaves, grads))


def assert_same_results(ours, native) -> None:
    (output, grads), (expected, expected_grads) = ours, native
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, **FLOAT64)
    assert_same_layout(output, expected)
    for name, expected_grad in expected_grads.items():
        torch.testing.assert_close(grads[name], expected_grad, **FLOAT64, msg=lambda m: f"grad {name}: {m}")


# --------------------------------------------------------------------------------------------
# Functional ops


@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("case", CONV_SAMPLES, ids=describe)
def test_conv2d_relu_max_pool2d_takes_opinfo_conv2d_samples(case, ceil_mode):
    conv = F.conv2d(case["input"], case["weight"], case["bias"], case["stride"], case["padding"])
    args = dict(stride=case["stride"], padding=case["padding"], pool_size=pool_for(conv.shape[-2:]), ceil_mode=ceil_mode)
    tensors = dict(input=case["input"], weight=case["weight"], bias=case["bias"])
    ours = run(lambda **t: ops.conv2d_relu_max_pool2d(**t, **args), tensors)
    assert_same_results(ours, run(lambda **t: native_conv2d_relu_max_pool2d(**t, **args), tensors))


@pytest.mark.parametrize("case", MAX_POOL_SAMPLES, ids=describe)
def test_conv2d_relu_max_pool2d_takes_opinfo_max_pool2d_samples(case):
    # A 1x1 convolution in front of each of torch's pooling cases.
    channels = case["input"].shape[-3]
    generator = torch.Generator().manual_seed(channels)
    tensors = dict(
        input=case["input"],
        weight=torch.randn(channels, channels, 1, 1, generator=generator, dtype=torch.float64),
        bias=torch.randn(channels, generator=generator, dtype=torch.float64),
    )
    args = dict(
        pool_size=case["pool_size"], pool_stride=case["pool_stride"], ceil_mode=case["ceil_mode"], pool_padding=case["pool_padding"]
    )
    ours = run(lambda **t: ops.conv2d_relu_max_pool2d(**t, **args), tensors)
    assert_same_results(ours, run(lambda **t: native_conv2d_relu_max_pool2d(**t, **args), tensors))


def native_conv_batch_norm_relu_max_pool2d(input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training, **args):
    """The native chain; an unbatched input as the batch of one it stands for (F.batch_norm
    itself would read an unbatched conv output's rows as channels)."""
    if input.dim() == 3:
        batched = native_conv_batch_norm_relu_max_pool2d(
            input.unsqueeze(0), weight, bias, running_mean, running_var, bn_weight, bn_bias, training, **args
        )
        return batched.squeeze(0)
    conv = F.conv2d(input, weight, bias, args["stride"], args["padding"])
    normalised = F.batch_norm(conv, running_mean, running_var, bn_weight, bn_bias, training, 0.1, 1e-5)
    return F.max_pool2d(F.relu(normalised), args["pool_size"], ceil_mode=args["ceil_mode"])


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("case", CONV_SAMPLES, ids=describe)
def test_conv2d_batch_norm_relu_max_pool2d_takes_opinfo_conv2d_samples(case, training):
    conv = F.conv2d(case["input"], case["weight"], case["bias"], case["stride"], case["padding"])
    channels = conv.shape[-3]
    generator = torch.Generator().manual_seed(channels)
    statistics = dict(
        running_mean=torch.randn(channels, generator=generator, dtype=torch.float64),
        running_var=torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5,
    )
    tensors = dict(
        input=case["input"],
        weight=case["weight"],
        bias=case["bias"],
        bn_weight=torch.randn(channels, generator=generator, dtype=torch.float64),
        bn_bias=torch.randn(channels, generator=generator, dtype=torch.float64),
    )
    args = dict(stride=case["stride"], padding=case["padding"], pool_size=pool_for(conv.shape[-2:]), ceil_mode=False)
    our_statistics, native_statistics = copy.deepcopy(statistics), copy.deepcopy(statistics)
    ours = run(lambda **t: ops.conv2d_batch_norm_relu_max_pool2d(**t, **our_statistics, training=training, **args), tensors)
    native = run(
        lambda **t: native_conv_batch_norm_relu_max_pool2d(**t, **native_statistics, training=training, **args), tensors
    )
    assert_same_results(ours, native)
    for name in statistics:
        torch.testing.assert_close(our_statistics[name], native_statistics[name], **FLOAT64)


@pytest.mark.parametrize("case", BATCH_NORM_SAMPLES, ids=describe)
def test_batch_norm_takes_opinfo_batch_norm_samples(case):
    statistics = {name: case[name] for name in ("running_mean", "running_var")}
    arguments = {name: case[name] for name in ("training", "momentum", "eps") if name in case}
    tensors = {name: case[name] for name in ("input", "weight", "bias")}
    our_statistics, native_statistics = copy.deepcopy(statistics), copy.deepcopy(statistics)
    ours = run(lambda **t: ops.batch_norm(**t, **our_statistics, **arguments), tensors)
    native = run(lambda **t: F.batch_norm(**t, **native_statistics, **arguments), tensors)
    assert_same_results(ours, native)
    for name, expected in native_statistics.items():
        if expected is not None:
            torch.testing.assert_close(our_statistics[name], expected, **FLOAT64)


@pytest.mark.parametrize("dims", [2, 5])
def test_conv_ops_reject_other_ranks_naming_them(dims):
    input = torch.randn((2, 3, 8, 8, 1)[:dims] if dims == 5 else (8, 8))
    weight = torch.randn(4, 3, 3, 3)
    with pytest.raises(RuntimeError) as native:
        F.conv2d(input, weight)
    message = f"input must be a 3-D (unbatched) or 4-D (batched) tensor, got {dims}-D tensor of shape {list(input.shape)}"
    with pytest.raises(type(native.value)) as raised:
        ops.conv2d_relu_max_pool2d(input, weight)
    assert str(raised.value) == message
    with pytest.raises(type(native.value)) as raised:
        ops.conv2d_batch_norm_relu_max_pool2d(input, weight, None, None, None, None, None, training=True)
    assert str(raised.value) == message


# --------------------------------------------------------------------------------------------
# Modules, fused models, torch.fx and torch.compile


def conv_and_pool() -> tuple[nn.Conv2d, nn.MaxPool2d]:
    torch.manual_seed(0)
    return nn.Conv2d(3, 6, 3, padding=1).double(), nn.MaxPool2d(2, ceil_mode=True)


def test_conv2d_relu_max_pool2d_module_takes_unbatched_input_as_nn_conv2d_does():
    conv, pool = conv_and_pool()
    fused, native = Conv2dReLUMaxPool2d.from_modules(conv, pool), nn.Sequential(conv, nn.ReLU(), pool)
    for input in (torch.randn(3, 9, 7, dtype=torch.float64), torch.randn(2, 3, 9, 7, dtype=torch.float64)):
        tensors = dict(input=input)
        assert_same_results(run(lambda input: fused(input), tensors), run(lambda input: native(input), tensors))


def test_batch_norm_modules_take_and_refuse_what_torch_nn_does():
    # Conv2dBatchNormReLUMaxPool2d stands for Conv2d -> BatchNorm2d -> ReLU -> MaxPool2d, whose
    # batch norm refuses unbatched input; BatchNorm1d/2d keep torch.nn's rank rules.
    conv, pool = conv_and_pool()
    bn = nn.BatchNorm2d(6).double()
    pairs = [
        (Conv2dBatchNormReLUMaxPool2d.from_modules(conv, bn, pool), nn.Sequential(conv, bn, nn.ReLU(), pool), (3, 9, 7)),
        (BatchNorm2d(3), nn.BatchNorm2d(3), (3, 9, 7)),
        (BatchNorm1d(3), nn.BatchNorm1d(3), (2, 3, 4, 4)),
        (BatchNorm1d(3), nn.BatchNorm1d(3), (3,)),
    ]
    for ours, native, shape in pairs:
        input = torch.randn(shape, dtype=torch.float64)
        with pytest.raises(Exception) as expected:
            native.double()(input)
        with pytest.raises(type(expected.value)) as raised:
            ours.double()(input)
        assert str(raised.value) == str(expected.value)
    for shape in [(4, 3), (4, 3, 5)]:
        input = torch.randn(shape, dtype=torch.float64)
        torch.testing.assert_close(BatchNorm1d(3).double()(input), nn.BatchNorm1d(3).double()(input), **FLOAT64)


def test_fused_model_takes_unbatched_input():
    conv, pool = conv_and_pool()
    model = nn.Sequential(conv, nn.ReLU(), pool)
    fused = cifarnet.fuse(model)
    assert isinstance(fused[0], Conv2dReLUMaxPool2d)
    input = torch.randn(3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)


def test_functional_ops_stay_calls_in_torch_fx_graphs():
    # The unbatched handling branches on the input's rank in Python: torch.fx records the
    # functional call instead of tracing into it (as it records torch's own functionals).
    conv, pool = conv_and_pool()
    layer = Conv2dReLUMaxPool2d.from_modules(conv, pool)
    traced = torch.fx.symbolic_trace(nn.Sequential(layer))
    assert [node.target for node in traced.graph.nodes if node.op == "call_function"] == [ops.conv2d_relu_max_pool2d]
    for input in (torch.randn(3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)):
        torch.testing.assert_close(traced(input), layer(input), **FLOAT64)


def test_torch_compile_fullgraph_takes_unbatched_input():
    conv, pool = conv_and_pool()
    layer = Conv2dReLUMaxPool2d.from_modules(conv, pool)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    input = torch.randn(3, 8, 8, dtype=torch.float64)
    tensors = dict(input=input)
    assert_same_results(run(lambda input: compiled(input), tensors), run(lambda input: layer(input), tensors))
