"""cifarnet.fuse on batch norm -> ReLU -> conv chains (a ResNet block's, a DenseNet layer's):
in graphs and by position, against the unfused models, with the chains it must leave and why."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

import cifarnet
from cifarnet._timing import saved_tensor_bytes
from cifarnet.fuse import FusedBatchNorm2d, FusedBatchNormReLUConv2d, FusedConv2dBatchNormReLUMaxPool2d, FusedIdentity
from cifarnet.nn import BatchNorm2d, SyncBatchNorm2d, bn_relu_conv_unfusable_reason
from fuse_cases import (
    FLOAT64,
    assert_same_function,
    assert_state_dicts_load_both_ways,
    assert_unfuses_to,
    fuse_quietly,
    module_types,
    run,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def block_input(channels=8, size=9, batch=3):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def test_a_residual_block_fuses_its_bn_relu_conv_in_the_graph_and_computes_the_same():
    torch.manual_seed(0)
    block = BasicBlock(8, 8).double()  # conv1 -> bn1 -> relu -> conv2 -> bn2 (+ input) -> relu
    fused, report = fuse_quietly(block, report=True)
    assert [chain.names for chain in report.fused] == [("bn1", "relu", "conv2")]
    # the block's last ReLU follows the residual add, not a batch norm
    assert report.unfused == [] and report.checks == []
    assert isinstance(fused.conv2, FusedBatchNormReLUConv2d) and fused.conv2.bn is fused.bn1
    input = block_input()
    assert_same_function(fused, block, input, FLOAT64)  # training, then evaluation
    assert int(fused.bn1.num_batches_tracked) == int(block.bn1.num_batches_tracked) == 1
    assert_state_dicts_load_both_ways(fused, block)
    assert_unfuses_to(block, fused, input, FLOAT64)
    copied = pickle.loads(pickle.dumps(fused))
    torch.testing.assert_close(copied.eval()(input), fused.eval()(input), rtol=0, atol=0)


def test_the_fused_block_keeps_less_for_its_backward():
    # The rectified tensor (bn1 -> relu's output, conv2's input) is recomputed, not kept.
    torch.manual_seed(0)
    block = BasicBlock(8, 8)
    fused = fuse_quietly(block)
    input = block_input(batch=4, size=16).float().requires_grad_(True)
    native, ours = saved_tensor_bytes(lambda: block(input)), saved_tensor_bytes(lambda: fused(input))
    rectified = input.numel() * input.element_size()
    statistics = 2 * input.shape[1] * 8  # bn1's mean and variance, at most in double
    assert native - rectified <= ours <= native - rectified + statistics, (native, ours)


def test_bn_relu_conv_false_fuses_pool_chains_only():
    block = BasicBlock(8, 8)
    fused, report = fuse_quietly(block, report=True, bn_relu_conv=False)
    assert report.fused == [] and report.unfused == [] and type(fused.conv2) is nn.Conv2d


class PreActivationNet(nn.Module):
    """Batch norm -> ReLU -> conv spelt in forward: F.relu, Tensor.relu_, and one whose
    convolution heads a conv -> bn -> ReLU -> pool chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)  # cumulative average: counts batches
        self.conv3 = nn.Conv2d(6, 4, 3, stride=2, padding=1)
        self.bn3 = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        x = self.conv3(self.bn2(x).relu_())
        return F.max_pool2d(F.relu(self.bn3(x)), 2)


def test_bn_relu_conv_chains_in_forward_fuse_unless_their_conv_heads_a_pool_chain():
    torch.manual_seed(0)
    model = PreActivationNet().double()
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == [("bn1", "relu", "conv2"), ("conv3", "bn3", "relu_1", "max_pool2d")]
    assert [(chain.names, chain.reason) for chain in report.unfused] == [
        (("bn2", "relu_", "conv3"), "conv3 heads the fused chain conv3 -> bn3 -> relu_1 -> max_pool2d")
    ]
    assert isinstance(fused.conv2, FusedBatchNormReLUConv2d) and isinstance(fused.conv3, FusedConv2dBatchNormReLUMaxPool2d)
    twice, again = fuse_quietly(fused, report=True)
    assert again.fused == [] and again.unfused == []
    input = block_input(channels=3, size=12)
    assert_same_function(twice, copy.deepcopy(model), input, FLOAT64)
    assert_same_function(fused, model, input, FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, input, FLOAT64)


def pre_activation_sequential(bn=None, relu=None, conv=None) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        bn if bn is not None else nn.BatchNorm2d(8),
        relu if relu is not None else nn.ReLU(inplace=True),
        conv if conv is not None else nn.Conv2d(8, 4, 3, padding=1),
        nn.Flatten(),
    )


def test_a_sequential_bn_relu_conv_fuses_by_position():
    torch.manual_seed(0)
    model = pre_activation_sequential().double()
    fused, report = fuse_quietly(model, report=True)
    assert type(fused) is nn.Sequential and [chain.names for chain in report.fused] == [("1", "2", "3")]
    assert isinstance(fused[1], FusedBatchNorm2d) and isinstance(fused[2], FusedIdentity)
    assert isinstance(fused[3], FusedBatchNormReLUConv2d) and fused[3].bn is fused[1]
    assert fused[3].weight is fused[3].to_conv2d().weight
    input = block_input(channels=3)
    assert_same_function(fused, model, input, FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, input, FLOAT64)


class Untraceable(nn.Module):
    """forward loops over the batch: torch.fx cannot trace it; its Sequential still fuses."""

    def __init__(self):
        super().__init__()
        self.body = pre_activation_sequential()

    def forward(self, x):
        return torch.cat([self.body(x[i : i + 1]) for i in range(x.shape[0])])


def test_an_untraced_modules_sequential_fuses_bn_relu_conv_by_position():
    torch.manual_seed(0)
    model = Untraceable().double().eval()  # per-sample calls: batch statistics would differ
    with pytest.warns(UserWarning, match="cannot trace the model"):
        fused, report = cifarnet.fuse(model, report=True)
    assert [chain.names for chain in report.fused] == [("body.1", "body.2", "body.3")]
    assert isinstance(fused.body[3], FusedBatchNormReLUConv2d)
    input = block_input(channels=3)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)


def hooked_relu() -> nn.ReLU:
    relu = nn.ReLU()
    relu.register_forward_hook(lambda module, args, output: None)
    return relu


@pytest.mark.parametrize(
    "parts, reason",
    [
        ({"bn": nn.SyncBatchNorm(8)}, None),
        ({"bn": SyncBatchNorm2d(8)}, None),
        ({"conv": nn.Conv2d(8, 4, 3, dilation=2)}, None),
        ({"conv": nn.Conv2d(8, 4, 3, groups=2)}, None),
        ({"relu": hooked_relu()}, "2 has hooks, which the fused layer would not call"),
    ],
    ids=["nn-sync", "cifarnet-sync", "dilation", "groups", "hooked"],
)
def test_bn_relu_conv_chains_the_op_cannot_compute_are_left_with_the_reason(parts, reason):
    model = pre_activation_sequential(**parts).double().eval()  # eval: nn.SyncBatchNorm runs on the CPU
    if reason is None:  # the op's own rule, not written here a second time
        reason = bn_relu_conv_unfusable_reason(model[1], model[3])
        assert reason is not None
    fused, report = fuse_quietly(model, report=True)
    assert report.fused == [] and [(chain.names, chain.reason) for chain in report.unfused] == [(("1", "2", "3"), reason)]
    assert module_types(fused) == module_types(model)
    input = block_input(channels=3)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)


def test_synchronized_batch_norm_is_refused_by_the_layer_too():
    with pytest.raises(ValueError, match="synchronizes its statistics"):
        cifarnet.nn.BatchNormReLUConv2d.from_modules(SyncBatchNorm2d(8), nn.Conv2d(8, 4, 3))
    assert bn_relu_conv_unfusable_reason(BatchNorm2d(8), nn.Conv2d(8, 4, 3)) is None


class ReusedRectifiedNet(nn.Module):
    """The rectified tensor feeds two convolutions (Inception's split branches)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.left = nn.Conv2d(3, 4, 1)
        self.right = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.bn(x))
        return torch.cat([self.left(x), self.right(x)], 1)


def test_a_rectified_tensor_read_twice_is_not_fused_and_is_reported():
    model = ReusedRectifiedNet().double()
    fused, report = fuse_quietly(model, report=True)
    assert report.fused == []
    assert [str(chain) for chain in report.unfused] == ["bn -> relu -> left: the output of relu is also used by right"]
    input = block_input(channels=3)
    assert_same_function(fused, model, input, FLOAT64)


def test_fused_bn_relu_conv_layers_are_not_built_by_hand():
    with pytest.raises(TypeError, match="made by cifarnet.fuse"):
        FusedBatchNormReLUConv2d(8, 4, 3)


def test_gradients_of_a_fused_block_under_a_frozen_batch_norm():
    # bn1 in evaluation while the block trains: the layer normalises with running statistics.
    torch.manual_seed(0)
    block = BasicBlock(8, 8).double()
    fused = fuse_quietly(block)
    for model in (block, fused):
        model.train()
        model.bn1.eval()
    ours, theirs = run(fused, block_input()), run(copy.deepcopy(block), block_input())
    torch.testing.assert_close(ours[0], theirs[0], **FLOAT64)
    torch.testing.assert_close(ours[1], theirs[1], **FLOAT64)
    assert int(fused.bn1.num_batches_tracked) == 0


def test_unfuse_turns_a_bn_relu_conv_layer_into_torch_modules():
    torch.manual_seed(0)
    model = nn.Sequential(cifarnet.nn.BatchNormReLUConv2d(3, 4, 3, padding=1, dtype=torch.float64))
    unfused = cifarnet.unfuse(model)
    assert isinstance(unfused[0], torch.fx.GraphModule) and type(unfused[0].bn) is nn.BatchNorm2d
    assert list(unfused.state_dict()) == list(model.state_dict())
    assert_same_function(unfused, model, block_input(channels=3), FLOAT64)
