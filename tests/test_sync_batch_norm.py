"""Synchronized batch norm modules in one process: cifarnet.nn.convert_sync_batchnorm, the
Sync* layers and cifarnet.fuse without torch.distributed (or, in
tests/test_sync_batch_norm_distributed.py, over two processes)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cifarnet
from cifarnet.fuse import FusedBatchNorm2d, FusedConv2dBatchNormReLUMaxPool2d
from cifarnet.nn import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2dBatchNormReLUMaxPool2d,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncConv2dBatchNormReLUMaxPool2d,
    convert_sync_batchnorm,
)
from conftest import recorded_op_calls


def model_with_every_batch_norm() -> nn.Sequential:
    torch.manual_seed(3)
    model = nn.Sequential(
        Conv2dBatchNormReLUMaxPool2d(3, 4, 3, padding=1),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        BatchNorm2d(6),
        nn.MaxPool2d(2),
    ).double()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5), nn.init.uniform_(module.bias, -0.5, 0.5)
    return model


def training_step(model, seed=0):
    """One training step's output, input gradient, parameter gradients and buffers, and the
    ops it called."""
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator, requires_grad=True)
    model.zero_grad()
    with recorded_op_calls() as calls:
        output = model(input)
        output.backward(torch.randn(output.shape, dtype=torch.float64, generator=generator))
    state = [output, input.grad, *(p.grad for p in model.parameters()), *model.buffers()]
    return state, calls.calls


def test_convert_sync_batchnorm_shares_tensors_and_keeps_keys():
    model = model_with_every_batch_norm()
    parameters, buffers, keys = list(model.parameters()), list(model.buffers()), list(model.state_dict())
    group = object()  # any group: nothing communicates here
    converted = convert_sync_batchnorm(model, process_group=group)
    assert converted is model  # containers change in place, as in torch's converter
    assert [type(m) for m in converted] == [
        SyncConv2dBatchNormReLUMaxPool2d, nn.Conv2d, SyncBatchNorm2d, nn.ReLU, SyncBatchNorm2d, nn.MaxPool2d
    ]  # fmt: skip
    assert converted[0].process_group is group and converted[2].process_group is group
    assert list(converted.state_dict()) == keys
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))
    assert all(a is b for a, b in zip(converted.buffers(), buffers, strict=True))
    bn = nn.BatchNorm2d(3)
    assert isinstance(convert_sync_batchnorm(bn), SyncBatchNorm2d)
    with pytest.raises(TypeError, match="module must be an nn.Module, got int"):
        convert_sync_batchnorm(3)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_without_torch_distributed_the_converted_model_computes_exactly_the_same(mode):
    """torch.distributed not initialised: the same ops, the same numbers, bit for bit."""
    assert not torch.distributed.is_initialized()
    model = model_with_every_batch_norm().train(mode == "train")
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    for seed in range(2):
        (expected, expected_calls), (actual, actual_calls) = training_step(model, seed), training_step(converted, seed)
        assert actual_calls == expected_calls
        for a, b in zip(actual, expected, strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("batch_norm_class", [nn.BatchNorm1d, BatchNorm1d])
def test_batch_norm1d_converts_and_computes_as_before_without_torch_distributed(batch_norm_class):
    torch.manual_seed(4)
    head = nn.Sequential(nn.Flatten(), nn.Linear(12, 5), batch_norm_class(5, momentum=None)).double()
    keys, parameters = list(head.state_dict()), list(head.parameters())
    expected = copy.deepcopy(head)
    group = object()
    converted = convert_sync_batchnorm(head, process_group=group)
    assert type(converted[2]) is SyncBatchNorm1d and converted[2].process_group is group
    assert converted[2].fallback_class is batch_norm_class  # the same op calls as before
    assert list(converted.state_dict()) == keys
    assert all(a is b for a, b in zip(converted.parameters(), parameters, strict=True))
    for mode in (True, False):
        input = torch.randn(6, 3, 2, 2, dtype=torch.float64)
        converted.train(mode), expected.train(mode)
        assert torch.equal(converted(input), expected(input))
    native = converted[2].to_native()
    assert type(native) is nn.SyncBatchNorm and native.process_group is group
    assert native.running_mean is converted[2].running_mean
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        SyncBatchNorm1d(5)(torch.randn(2, 5, 3, 3))


def test_sync_layers_built_directly_match_the_unsynchronized_ones():
    torch.manual_seed(5)
    layer = Conv2dBatchNormReLUMaxPool2d(3, 4, 3, padding=1, pool_size=3, pool_stride=2, ceil_mode=True).double()
    torch.manual_seed(5)
    sync = SyncConv2dBatchNormReLUMaxPool2d(3, 4, 3, padding=1, pool_size=3, pool_stride=2, ceil_mode=True, process_group=None).double()
    assert list(sync.state_dict()) == list(layer.state_dict()) and isinstance(sync.bn, SyncBatchNorm2d)
    assert sync.process_group is None
    input = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    assert torch.equal(sync(input), layer(input))
    assert isinstance(sync.to_native().bn, nn.SyncBatchNorm)
    bn = SyncBatchNorm2d(4, momentum=None, dtype=torch.float64)
    assert torch.equal(bn(sync(input)), BatchNorm2d(4, momentum=None, dtype=torch.float64)(layer(input)))


def test_native_forms_of_layers_with_a_synchronized_batch_norm_synchronize():
    # A model converted, then unfused: its batch norms must still synchronize over the group.
    group = object()  # any process group; it is only carried over here
    bn_first = nn.Sequential(cifarnet.nn.BatchNormReLUConv2d(3, 4, 3))
    convert_sync_batchnorm(bn_first, process_group=group)
    pooled = Conv2dBatchNormReLUMaxPool2d.from_modules(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4, process_group=group), nn.MaxPool2d(2))
    for native_bn in (
        bn_first[0].to_native().bn,
        pooled.to_native().bn,
        pooled.to_sequential()[1],
        cifarnet.unfuse(bn_first, inplace=True)[0].bn,  # in place: a deep copy would copy the group
    ):
        assert type(native_bn) is nn.SyncBatchNorm and native_bn.process_group is group


def test_sync_batch_norm2d_takes_batch_norm2d_s_keywords():
    # torch 2.14's nn.BatchNorm2d(..., bias=False): an affine weight and no bias
    if "bias" not in nn.BatchNorm2d.__init__.__code__.co_varnames:
        pytest.skip("this torch's nn.BatchNorm2d has no bias keyword")
    bn, native = SyncBatchNorm2d(3, bias=False), nn.SyncBatchNorm(3, bias=False)
    assert bn.bias is None and list(bn.state_dict()) == list(native.state_dict())


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_of_a_converted_model_without_torch_distributed(dynamic):
    torch._dynamo.reset()
    model = model_with_every_batch_norm().float()
    converted = convert_sync_batchnorm(copy.deepcopy(model))
    compiled = torch.compile(convert_sync_batchnorm(copy.deepcopy(model)), fullgraph=True, dynamic=dynamic)
    for mode in ("train", "eval"):
        for module in (converted, compiled):
            module.train(mode == "train")
        for batch in (4, 6):
            input = torch.randn(batch, 3, 8, 8, requires_grad=True)
            expected, actual = converted(input), compiled(input)
            torch.testing.assert_close(actual, expected)
            torch.testing.assert_close(torch.autograd.grad(actual.sum(), input)[0], torch.autograd.grad(expected.sum(), input)[0])
    for a, b in zip(compiled.buffers(), converted.buffers(), strict=True):
        torch.testing.assert_close(a, b)


class FunctionalNet(nn.Module):
    """Chains written in forward: fuse rewrites them in the graph."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        return F.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2, 1, ceil_mode=True)


def sequential_net():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2, 1, ceil_mode=True),
    )  # fmt: skip


def convert_then_fuse(net, path, group=None):
    """``net`` synchronized by one of the converters and fused, in either order."""
    if path == "torch converter, then fuse":
        return cifarnet.fuse(nn.SyncBatchNorm.convert_sync_batchnorm(net, group))
    if path == "convert_sync_batchnorm, then fuse":
        return cifarnet.fuse(convert_sync_batchnorm(net, group))
    assert path == "fuse, then convert_sync_batchnorm"
    return convert_sync_batchnorm(cifarnet.fuse(net), group)


CONVERTER_PATHS = ["torch converter, then fuse", "convert_sync_batchnorm, then fuse", "fuse, then convert_sync_batchnorm"]


@pytest.mark.parametrize("path", CONVERTER_PATHS)
@pytest.mark.parametrize("net", [sequential_net, FunctionalNet])
def test_fuse_gives_synchronized_fused_layers_after_either_converter(path, net):
    torch.manual_seed(0)
    plain = net().double()
    keys = list(plain.state_dict())
    fused = convert_then_fuse(copy.deepcopy(plain), path)
    layers = [m for m in fused.modules() if isinstance(m, FusedConv2dBatchNormReLUMaxPool2d)]
    assert len(layers) == 2, f"{path}: {fused}"
    for layer in layers:
        assert hasattr(layer.bn, "process_group"), f"{path}: {type(layer.bn).__name__} is not synchronized"
        assert layer.bn in list(fused.modules()), "the fused layer reads a batch norm the model no longer holds"
    assert list(fused.state_dict()) == keys
    if net is sequential_net:
        assert all(isinstance(fused[i], FusedBatchNorm2d) for i in (1, 5))
    # Without torch.distributed: the unsynchronized fused computation, running statistics too.
    input = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    expected = cifarnet.fuse(copy.deepcopy(plain))(input)
    torch.testing.assert_close(fused(input), expected, rtol=0, atol=0)
    unfused = cifarnet.unfuse(fused)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in unfused.modules())
    assert list(unfused.state_dict()) == keys
