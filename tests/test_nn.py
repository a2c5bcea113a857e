"""cifarnet.nn modules against the torch.nn layers they replace."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import cifarnet
from cifarnet.nn import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2dBatchNormReLUMaxPool2d,
    Conv2dReLUMaxPool2d,
    SyncConv2dBatchNormReLUMaxPool2d,
)
from conftest import DEVICES


def native_block(conv: nn.Conv2d, pool: nn.MaxPool2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.ReLU(), pool)


def test_same_seed_gives_nn_conv2d_initialisation():
    torch.manual_seed(7)
    conv = nn.Conv2d(3, 16, (5, 3), padding=2)
    torch.manual_seed(7)
    fused = Conv2dReLUMaxPool2d(3, 16, (5, 3), padding=2)
    assert torch.equal(fused.weight, conv.weight) and torch.equal(fused.bias, conv.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_state_dicts_load_both_ways(bias):
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    fused = Conv2dReLUMaxPool2d(4, 6, 3, padding=1, bias=bias)
    fused.load_state_dict(conv.state_dict())
    assert torch.equal(fused.weight, conv.weight)
    back = nn.Conv2d(4, 6, 3, padding=1, bias=bias)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, conv.weight)
    assert list(fused.state_dict()) == list(conv.state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "conv_args, pool_args",
    [
        (dict(kernel_size=5, padding=2), dict(kernel_size=2)),
        (dict(kernel_size=3, stride=2, padding=1, bias=False), dict(kernel_size=3, stride=2, ceil_mode=True)),
        (dict(kernel_size=(3, 1), padding="same"), dict(kernel_size=(2, 1))),
        (dict(kernel_size=2, padding="valid"), dict(kernel_size=2, stride=1)),
        # a ResNet stem: conv 7x7/2, max pool 3x3/2 padding 1
        (dict(kernel_size=7, stride=2, padding=3, bias=False), dict(kernel_size=3, stride=2, padding=1)),
        (dict(kernel_size=3, padding=1), dict(kernel_size=(2, 4), stride=(2, 3), padding=(1, 2), ceil_mode=True)),
    ],
)
def test_matches_native_sequential_in_float64(device, conv_args, pool_args):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, **conv_args).double().to(device)
    pool = nn.MaxPool2d(**pool_args)
    fused = Conv2dReLUMaxPool2d.from_modules(conv, pool)
    reference = native_block(conv, pool)
    input = torch.randn(5, 3, 12, 10, dtype=torch.float64, device=device, requires_grad=True)
    out, expected = fused(input), reference(input)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(expected)
    params = [input] + list(conv.parameters())
    for ours, theirs in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def test_constructor_arguments_match_native_modules():
    torch.manual_seed(1)
    fused = Conv2dReLUMaxPool2d(3, 4, 3, stride=(2, 1), padding=1, pool_size=3, pool_stride=2, ceil_mode=True, pool_padding=1)
    conv = nn.Conv2d(3, 4, 3, stride=(2, 1), padding=1)
    conv.load_state_dict(fused.state_dict())
    input = torch.randn(2, 3, 15, 13)
    reference = native_block(conv, nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    torch.testing.assert_close(fused(input), reference(input))


def test_from_modules_refuses_a_legacy_weight_norm_conv():
    # nn.utils.weight_norm recomputes conv.weight (a plain tensor) in a pre-hook: one value of
    # it frozen in the fused layer would drop weight_g and weight_v.
    conv = nn.utils.weight_norm(nn.Conv2d(2, 3, 3, padding=1))
    with pytest.raises(ValueError, match="conv.weight is not a Parameter"):
        Conv2dReLUMaxPool2d.from_modules(conv, nn.MaxPool2d(2))
    with pytest.raises(ValueError, match="conv.weight is not a Parameter"):
        cifarnet.nn.BatchNormReLUConv2d.from_modules(nn.BatchNorm2d(2), conv)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Conv2dReLUMaxPool2d(3, 4, 3),
        lambda: Conv2dBatchNormReLUMaxPool2d(3, 4, 3),
        lambda: cifarnet.nn.BatchNormReLUConv2d(3, 4, 3),
    ],
    ids=["conv_relu_pool", "conv_bn_relu_pool", "bn_relu_conv"],
)
def test_layers_built_on_the_meta_device_initialise_with_reset_parameters(make):
    # The usual materialisation: to_empty(), then every module's reset_parameters().
    with torch.device("meta"):
        layer = make()
    layer = layer.to_empty(device="cpu")
    for parameter in layer.parameters():
        nn.init.constant_(parameter, float("nan"))
    for module in layer.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert not any(parameter.isnan().any() for parameter in layer.parameters())
    torch.manual_seed(0)
    layer.reset_parameters()
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)


def test_a_call_failing_in_the_convolution_does_not_count_a_batch():
    # The native chain's conv2d raises before its batch norm counts the batch (momentum=None
    # then averages over the wrong count).
    layer = Conv2dBatchNormReLUMaxPool2d(2, 3, 3, momentum=None)
    native = layer.to_native()
    for model in (layer, native):
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 4, 6, 6))  # 4 channels where the weight takes 2
        assert int(model.bn.num_batches_tracked) == 0
    layer(torch.randn(2, 2, 6, 6))
    assert int(layer.bn.num_batches_tracked) == 1


def test_from_modules_shares_parameters_and_mode():
    conv, pool = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)
    conv.eval()
    fused = Conv2dReLUMaxPool2d.from_modules(conv, pool)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert not fused.training


@pytest.mark.parametrize(
    "conv, pool, reason",
    [
        (nn.Conv2d(3, 4, 3, dilation=2), nn.MaxPool2d(2), "dilation"),
        (nn.Conv2d(4, 4, 3, groups=2), nn.MaxPool2d(2), "groups"),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2), "padding_mode"),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, padding=2), "pool.padding=2 is not between 0 and half"),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, padding=(1, -1)), "pool.padding"),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, dilation=2), "pool.dilation"),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, return_indices=True), "return_indices"),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(16), "256 elements"),
        (nn.Conv1d(3, 4, 3), nn.MaxPool2d(2), "not an nn.Conv2d"),
        (nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), "not an nn.MaxPool2d"),
    ],
)
def test_from_modules_refuses_what_it_cannot_fuse(conv, pool, reason):
    with pytest.raises(ValueError, match=reason):
        Conv2dReLUMaxPool2d.from_modules(conv, pool)


@pytest.mark.parametrize(
    "conv, pool",
    [
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d((2,))),
        (nn.Conv2d(3, 4, 3, stride=(2,), padding=(1,), dilation=(1,)), nn.MaxPool2d(2, stride=[], padding=(1,))),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d([3], stride=(2,), dilation=[1])),
    ],
    ids=["one-element pool size", "one-element conv sizes, empty pool stride", "one-element pool stride"],
)
def test_one_element_sizes_and_an_empty_pool_stride_fuse_as_native_reads_them(conv, pool):
    """F.conv2d and F.max_pool2d take a one-element size for both sides, and max pooling an
    empty stride for the window's."""
    native = nn.Sequential(conv, nn.ReLU(), pool)
    fused = Conv2dReLUMaxPool2d.from_modules(conv, pool)
    input = torch.randn(2, 3, 9, 9, requires_grad=True)
    expected, actual = native(input), fused(input)
    torch.testing.assert_close(actual, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(actual, input, grad)[0], torch.autograd.grad(expected, input, grad)[0])


def test_a_malformed_size_is_left_for_native_to_refuse():
    """A chain native cannot run either is not fused (nor does fusing it raise): the model
    raises native's own error when it runs."""
    pool = nn.MaxPool2d((2, 2, 2))
    with pytest.raises(ValueError, match=r"pool.kernel_size must be an int or a pair of ints"):
        Conv2dReLUMaxPool2d.from_modules(nn.Conv2d(3, 4, 3), pool)
    model = cifarnet.fuse(nn.Sequential(nn.Conv2d(3, 4, 3, stride=(1, 1, 1)), nn.ReLU(), nn.MaxPool2d(2)))
    assert type(model[0]) is nn.Conv2d
    with pytest.raises(RuntimeError, match="stride"):
        model(torch.randn(1, 3, 8, 8))


def test_extra_repr_names_every_hyperparameter():
    text = repr(Conv2dReLUMaxPool2d(3, 32, 5, padding=2, ceil_mode=True, pool_padding=(1, 0)))
    parts = ("3, 32", "kernel_size=(5, 5)", "stride=(1, 1)", "padding=(2, 2)", "pool_size=(2, 2)", "ceil_mode=True", "pool_padding=(1, 0)")
    for part in parts:
        assert part in text


# --------------------------------------------------------------------------------------------
# to_native: every layer back to torch alone


def native_layers():
    torch.manual_seed(3)
    conv_bn = Conv2dBatchNormReLUMaxPool2d(3, 5, 3, padding=1, momentum=None, pool_size=3, pool_stride=2, ceil_mode=True, pool_padding=1)
    frozen_bn = Conv2dBatchNormReLUMaxPool2d(3, 5, (3, 1), stride=(1, 2), bias=False, affine=False)
    frozen_bn.bn.eval()  # the batch norm's own mode decides, as in the native chain
    return [
        (Conv2dReLUMaxPool2d(3, 5, 3, padding=1), (2, 3, 9, 8)),
        (Conv2dReLUMaxPool2d(3, 5, (2, 3), stride=2, bias=False, pool_size=(1, 2), ceil_mode=True), (3, 11, 9)),
        (conv_bn, (2, 3, 9, 8)),
        (frozen_bn, (2, 3, 9, 8)),
        (Conv2dBatchNormReLUMaxPool2d(3, 5, 3, track_running_stats=False), (2, 3, 9, 8)),
        (BatchNorm1d(3, momentum=0.3), (4, 3, 6)),
        (BatchNorm2d(3, affine=False), (4, 3, 5, 5)),
    ]


def layer_id(value) -> str:
    return type(value).__name__ if isinstance(value, nn.Module) else str(value)


@pytest.mark.parametrize("layer, shape", native_layers(), ids=layer_id)
def test_to_native_computes_the_layer_with_torch_alone_on_its_own_tensors(layer, shape):
    layer = layer.double()
    native = layer.to_native()
    assert all(type(module).__module__.startswith("torch.") for module in native.modules())
    assert list(native.state_dict()) == list(layer.state_dict())
    for name, tensor in native.state_dict().items():
        assert tensor.data_ptr() == layer.state_dict()[name].data_ptr(), name  # the same tensors, not copies
    assert_computes_as(native, layer, shape)


def conv_layers():
    """The conv layers, each with an input shape: every way their geometry and batch norm vary."""
    torch.manual_seed(4)
    frozen_bn = Conv2dBatchNormReLUMaxPool2d(3, 5, (3, 1), stride=(1, 2), bias=False, affine=False)
    frozen_bn.bn.eval()  # the batch norm's own mode decides, as in the native chain
    return [
        (Conv2dReLUMaxPool2d(3, 5, 3, padding=1), (2, 3, 9, 8)),
        (
            Conv2dReLUMaxPool2d(3, 5, (2, 3), stride=2, bias=False, pool_size=(1, 2), pool_stride=(1, 1), ceil_mode=True),
            (3, 11, 9),
        ),
        (
            Conv2dBatchNormReLUMaxPool2d(3, 5, 3, padding=1, momentum=None, pool_size=3, pool_stride=2, ceil_mode=True),
            (2, 3, 9, 8),
        ),
        (frozen_bn, (2, 3, 9, 8)),
        (SyncConv2dBatchNormReLUMaxPool2d(3, 5, 3, padding=2), (2, 3, 7, 7)),
        (SyncConv2dBatchNormReLUMaxPool2d(3, 5, 3, stride=2, pool_size=3, pool_stride=2, pool_padding=1), (2, 3, 9, 9)),
        (Conv2dReLUMaxPool2d(3, 5, 3, pool_size=(3, 2), pool_padding=(1, 1), ceil_mode=True), (2, 3, 9, 8)),
    ]


# The batch norm class of each conv layer's torch counterpart (none for Conv2dReLUMaxPool2d).
NATIVE_BATCH_NORM = {SyncConv2dBatchNormReLUMaxPool2d: nn.SyncBatchNorm, Conv2dBatchNormReLUMaxPool2d: nn.BatchNorm2d}


def assert_computes_as(native: nn.Module, layer: nn.Module, shape) -> None:
    """``native`` (holding ``layer``'s tensors) computes what a copy of ``layer`` computes, in
    float64: outputs, gradients of the input and of every parameter, and the buffers after,
    with the modes as built and in evaluation."""
    twin = copy.deepcopy(layer)
    for step in ("modes as built", "eval"):
        if step == "eval":
            native.eval()
            twin.eval()
        input = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5), requires_grad=True)
        out, expected = native(input), twin(input)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        grad = torch.randn(expected.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
        ours = torch.autograd.grad(out, [input, *native.parameters()], grad)
        theirs = torch.autograd.grad(expected, [input, *twin.parameters()], grad)
        assert len(ours) == len(theirs)
        for name, a, b in zip(["input", *dict(native.named_parameters())], ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{step}, grad of {name}: {m}")
        for (name, a), b in zip(native.state_dict().items(), twin.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m: f"{step}, {name}: {m}")


def assert_same_tensors_under(module: nn.Module, layer: nn.Module, keys: list[str]) -> None:
    assert list(module.state_dict()) == keys
    for key, tensor, theirs in zip(keys, module.state_dict().values(), layer.state_dict().values()):
        assert tensor.data_ptr() == theirs.data_ptr(), key  # the layer's own tensors, not copies


@pytest.mark.parametrize("layer, shape", conv_layers(), ids=layer_id)
def test_to_native_is_a_graph_module_of_conv2d_and_torch_layers_with_the_layers_keys(layer, shape):
    layer = layer.double()
    native = layer.to_native()
    assert isinstance(native, torch.fx.GraphModule)
    batch_norm = NATIVE_BATCH_NORM.get(type(layer))
    children = {"relu": nn.ReLU, "pool": nn.MaxPool2d} | ({} if batch_norm is None else {"bn": batch_norm})
    assert {name: type(child) for name, child in native.named_children()} == children
    pool = native.pool
    assert (pool.kernel_size, pool.stride, pool.ceil_mode) == (layer.pool_size, layer.pool_stride, layer.ceil_mode)
    assert [(node.op, node.target) for node in native.graph.nodes if node.op.startswith("call")] == [
        ("call_function", F.conv2d), *([] if batch_norm is None else [("call_module", "bn")]),
        ("call_module", "relu"), ("call_module", "pool"),
    ]  # fmt: skip
    assert native.weight is layer.weight and native.bias is layer.bias
    assert_same_tensors_under(native, layer, list(layer.state_dict()))
    assert list(cifarnet.unfuse(nn.Sequential(layer)).state_dict()) == [f"0.{key}" for key in layer.state_dict()]
    if batch_norm is nn.SyncBatchNorm:
        return  # nn.SyncBatchNorm refuses CPU tensors in training
    assert_computes_as(native, layer, shape)


@pytest.mark.parametrize("layer, shape", conv_layers(), ids=layer_id)
def test_to_sequential_is_torch_nn_layers_holding_the_layers_tensors(layer, shape):
    layer = layer.double()
    sequential = layer.to_sequential()
    batch_norm = NATIVE_BATCH_NORM.get(type(layer))
    assert type(sequential) is nn.Sequential
    bn = [] if batch_norm is None else [batch_norm]
    assert [type(module) for module in sequential] == [nn.Conv2d, *bn, nn.ReLU, nn.MaxPool2d]
    conv, pool = sequential[0], sequential[-1]
    assert (conv.kernel_size, conv.stride, conv.padding) == (layer.kernel_size, layer.stride, layer.padding)
    assert (pool.kernel_size, pool.stride, pool.ceil_mode) == (layer.pool_size, layer.pool_stride, layer.ceil_mode)
    assert conv.weight is layer.weight and conv.bias is layer.bias
    keys = [f"1.{key[3:]}" if key.startswith("bn.") else f"0.{key}" for key in layer.state_dict()]  # conv 0, bn 1
    assert_same_tensors_under(sequential, layer, keys)
    if batch_norm is not None:
        assert sequential[1].training == layer.bn.training  # its own mode, as in the layer
    if batch_norm is nn.SyncBatchNorm:
        return  # nn.SyncBatchNorm refuses CPU tensors in training
    assert_computes_as(sequential, layer, shape)
