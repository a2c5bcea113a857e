"""cifarnet.fuse and cifarnet.unfuse against the unfused models they rewrite."""

from __future__ import annotations

import copy
import io
import json
import operator
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cifarnet
from cifarnet import benchmark
from cifarnet.fuse import (
    FusedBatchNorm2d,
    FusedConv2dBatchNormReLUMaxPool2d,
    FusedConv2dReLUMaxPool2d,
    FusedIdentity,
    FusionReport,
)
from cifarnet.study.models import ConvNet
from cifarnet.nn import conv_relu_pool_unfusable_reason
from cifarnet.study.variants import VARIANTS, recipe
from fuse_cases import (
    EXACT,
    FLOAT32,
    FLOAT64,
    assert_close,
    assert_same_function,
    assert_same_tensors,
    assert_state_dicts_load_both_ways,
    assert_unfuses_to,
    fuse_quietly,
    module_types,
    run,
)
from op_cases import assert_no_worse_than_native
from conftest import recorded_op_calls

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_as_accurate_as_native(fused, original, input) -> None:
    """In eval mode, the float32 ``fused`` model's output and gradients are no further from a
    float64 copy of ``original`` than the float32 ``original``'s own (see op_cases)."""
    reference = copy.deepcopy(original).double()
    for model in (fused, original, reference):
        model.eval()
    mine, native, exact = run(fused, input), run(original, input), run(reference, input.double())
    names = ["output", "input gradient", *(f"grad {name}" for name in exact[2])]
    flat = lambda result: [result[0], result[1], *result[2].values()]
    for name, ours, theirs, truth in zip(names, flat(mine), flat(native), flat(exact)):
        assert_no_worse_than_native(ours, theirs, truth, name, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# The study's ConvNet: functional ReLU in forward, an input check, BN in `full`


def convnet_input(variant, batch=2, dtype=torch.float64):
    size = 28 if recipe(variant).augment else 32
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def convnet_chains(variant) -> list[tuple[str, ...]]:
    relus = ["relu", "relu_1", "relu_2"]  # torch.fx's names of the three F.relu calls
    if recipe(variant).batch_norm:
        return [(f"conv{i}", f"bn{i}", relus[i - 1], f"pool{i}") for i in (1, 2, 3)]
    return [(f"conv{i}", relus[i - 1], f"pool{i}") for i in (1, 2, 3)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_convnet_fuses_every_stage_and_computes_the_same(variant):
    torch.manual_seed(0)
    model = ConvNet(variant, "native").double()
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == convnet_chains(variant)
    assert report.unfused == [] and report.untraced == {}
    assert report.checks  # the input check of ConvNet.forward is kept
    layer = FusedConv2dBatchNormReLUMaxPool2d if recipe(variant).batch_norm else FusedConv2dReLUMaxPool2d
    assert all(isinstance(getattr(fused, f"conv{i}"), layer) for i in (1, 2, 3))
    assert not any(isinstance(m, (FusedConv2dReLUMaxPool2d, FusedConv2dBatchNormReLUMaxPool2d)) for m in model.modules())
    assert fused.variant == variant  # plain attributes come along
    assert_same_function(fused, model, convnet_input(variant), FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, convnet_input(variant), FLOAT64)


def test_convnet_full_training_keeps_running_statistics_in_step():
    torch.manual_seed(0)
    model = ConvNet("full", "native").double()
    fused = fuse_quietly(model)
    assert fused.conv1.bn is fused.bn1  # reads the registered batch norm, which holds the keys
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, fused)]
    for step in range(3):
        input = convnet_input("full", batch=4) + step
        target = torch.tensor([0, 1, 2, 3])
        for m, optimizer in zip((model, fused), optimizers):
            m.train()
            optimizer.zero_grad()
            torch.manual_seed(step)
            F.cross_entropy(m(input), target).backward()
            optimizer.step()
    assert int(fused.bn2.num_batches_tracked) == 3
    assert_same_tensors(fused.state_dict(), model.state_dict(), FLOAT64)
    assert_same_function(fused, model, convnet_input("full"), FLOAT64, modes=(False,))


def test_convnet_dtype_and_copies_follow_the_model():
    torch.manual_seed(0)
    model = ConvNet("full", "native")  # float32
    fused = fuse_quietly(model).double()
    assert fused.conv1.weight.dtype == fused.bn1.running_var.dtype == torch.float64
    assert_same_function(fused, model.double(), convnet_input("full"), FLOAT64)
    copied = copy.deepcopy(fused)
    assert copied.conv3.bn is copied.bn3 and copied.bn3 is not fused.bn3
    assert type(copied).__name__ == "ConvNet"
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.conv2.bn is loaded.bn2
    assert_same_function(loaded, model, convnet_input("full"), FLOAT64)


def assert_raises_as(model, fused, input) -> None:
    """``fused(input)`` raises the very exception type and message that ``model(input)`` raises."""
    with pytest.raises(Exception) as expected:
        model(input)
    with pytest.raises(type(expected.value)) as raised:
        fused(input)
    assert type(raised.value) is type(expected.value) and str(raised.value) == str(expected.value)


def test_fused_convnet_keeps_its_input_check():
    model = ConvNet("baseline", "native")
    fused, report = fuse_quietly(model, report=True)
    assert any("models.py:" in check for check in report.checks)
    for bad in (torch.randn(2, 1, 32, 32), torch.randn(3, 32, 32)):
        assert_raises_as(model, fused, bad)  # ValueError, not the graph's AssertionError
        assert_raises_as(model, copy.deepcopy(fused), bad)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    assert_raises_as(model, torch.load(buffer, weights_only=False), torch.randn(2, 1, 32, 32))


class UnresolvableAnnotationNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: NotDefinedAnywhere) -> Tensor:  # noqa: F821
        return F.max_pool2d(F.relu(self.conv(x)), 2)


def test_string_annotations_become_the_types_they_name():
    # models.py annotates with `from __future__ import annotations`: torch.fx keeps those as
    # strings, and torch 2.11 cannot pickle a GraphModule holding one.
    fused = fuse_quietly(ConvNet("baseline", "native"))
    assert isinstance(fused, torch.fx.GraphModule)
    assert [node.type for node in fused.graph.nodes if node.op in ("placeholder", "output")] == [torch.Tensor, torch.Tensor]
    fused = fuse_quietly(UnresolvableAnnotationNet())
    assert [node.type for node in fused.graph.nodes if node.op in ("placeholder", "output")] == [None, None]
    torch.save(fused, io.BytesIO())


def test_fused_ops_convnet_is_left_alone_without_baking_its_tensors():
    # ops="fused" full calls the functional op, which counts num_batches_tracked in Python:
    # tracing would bake that away, so fuse must refuse to trace it (and say so).
    model = ConvNet("full", "fused")
    with pytest.warns(UserWarning, match="buffer bn1.num_batches_tracked"):
        fused, report = cifarnet.fuse(model, report=True)
    assert report.fused == [] and "" in report.untraced
    assert int(fused.bn1.num_batches_tracked) == 0
    assert_same_function(fused, model, convnet_input("full", dtype=torch.float32), FLOAT32)


# --------------------------------------------------------------------------------------------
# torchvision models: chains as nn.Sequential children, rewritten by position (the whole zoo,
# in float64: tests/test_fuse_zoo.py)


def torchvision_chains(features: nn.Sequential, prefix: str = "features") -> list[tuple[str, ...]]:
    """Every [Conv2d, (BatchNorm2d,) ReLU, MaxPool2d] run of ``features``, read off directly."""
    children = list(features.named_children())
    chains = []
    for index, (name, module) in enumerate(children):
        if isinstance(module, nn.MaxPool2d) and isinstance(children[index - 1][1], nn.ReLU):
            start = index - 3 if isinstance(children[index - 2][1], nn.BatchNorm2d) else index - 2
            chains.append(tuple(f"{prefix}.{n}" for n, _ in children[start : index + 1]))
    return chains


def torchvision_bn_relu_convs(features: nn.Sequential, prefix: str = "features") -> list[tuple[str, ...]]:
    """Every [BatchNorm2d, ReLU, Conv2d] run of ``features``, read off directly."""
    children = list(features.named_children())
    kinds = [nn.BatchNorm2d, nn.ReLU, nn.Conv2d]
    return [
        tuple(f"{prefix}.{name}" for name, _ in children[index : index + 3])
        for index in range(len(children) - 2)
        if all(isinstance(module, kind) for (_, module), kind in zip(children[index : index + 3], kinds))
    ]


@pytest.mark.parametrize("name, size", [("vgg11", 32), ("vgg11_bn", 32), ("alexnet", 64)])
def test_torchvision_model_fuses_by_position_and_computes_the_same(name, size):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    fused, report = fuse_quietly(model, report=True)
    assert type(fused) is type(model)  # rewritten by position: no GraphModule
    assert [chain.names for chain in report.fused] == torchvision_chains(model.features)
    assert len(report.fused) == (3 if name == "alexnet" else 5)
    # VGG11-bn's batch norm -> ReLU -> conv runs (3) end in convolutions that head pool chains,
    # which fuse with their pools instead.
    pairs = torchvision_bn_relu_convs(model.features)
    assert len(pairs) == (3 if name == "vgg11_bn" else 0)
    pooled = {chain[0]: chain for chain in torchvision_chains(model.features)}
    assert [(chain.names, chain.reason) for chain in report.unfused] == [
        (pair, f"{pair[-1]} heads the fused chain {' -> '.join(pooled[pair[-1]])}") for pair in pairs
    ]
    first = report.fused[0].names
    assert isinstance(fused.get_submodule(first[-1]), FusedIdentity)
    if name == "vgg11_bn":
        assert isinstance(fused.get_submodule(first[1]), FusedBatchNorm2d)
        assert fused.get_submodule(first[0]).bn is fused.get_submodule(first[1])
    input = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    if name == "vgg11_bn":
        # NB: after a training step, VGG11-bn's eval-mode gradient here runs through pool
        # windows whose two largest values are within float32 rounding: any two float32
        # convolution algorithms may pick different maxima (native float32 and float64 differ
        # by 1e-2 of the gradient's scale). Eval is judged against float64 instead.
        assert_same_function(fused, model, input, FLOAT32, modes=(True,))
        assert_as_accurate_as_native(fused, model, input)
    else:
        assert_same_function(fused, model, input, FLOAT32)
    features = copy.deepcopy(model.features).double()
    assert_same_function(fuse_quietly(features), features, input.double(), FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, input, FLOAT32)


def resnet_stem() -> nn.Sequential:
    """torchvision's ResNet stem: conv 7x7/2 (no bias) -> batch norm -> ReLU -> max pool 3x3/2
    with padding 1."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


@pytest.mark.parametrize("size", [32, 35])  # the pool's input 16x16 and 18x18: its last window clipped or whole
def test_resnet_stem_with_its_padded_pool_fuses_and_computes_the_same(size):
    torch.manual_seed(0)
    stem = resnet_stem().double()
    fused, report = fuse_quietly(stem, report=True)
    assert [chain.names for chain in report.fused] == [("0", "1", "2", "3")] and report.unfused == []
    assert isinstance(fused[0], FusedConv2dBatchNormReLUMaxPool2d) and fused[0].pool_padding == (1, 1)
    input = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert_same_function(fused, stem, input, FLOAT64)  # training, then evaluation
    assert_state_dicts_load_both_ways(fused, stem)
    assert_unfuses_to(stem, fused, input, FLOAT64)


def test_inplace_rewrites_the_model_itself_and_keeps_its_parameters():
    model = torchvision.models.vgg11_bn(num_classes=10).features
    weight, running_mean = model[0].weight, model[1].running_mean
    assert cifarnet.fuse(model, inplace=True) is model
    assert isinstance(model[0], FusedConv2dBatchNormReLUMaxPool2d)
    assert model[0].weight is weight and model[1].running_mean is running_mean  # optimisers keep working
    untouched = torchvision.models.vgg11_bn(num_classes=10).features
    cifarnet.fuse(untouched)
    assert type(untouched[0]) is nn.Conv2d


def test_fusing_twice_changes_nothing_more():
    model = ConvNet("full", "native").double()
    once = fuse_quietly(model)
    twice, report = fuse_quietly(once, report=True)
    assert report.fused == [] and report.unfused == []
    assert module_types(twice) == module_types(once)
    assert_same_function(twice, model, convnet_input("full"), FLOAT64)


# --------------------------------------------------------------------------------------------
# Chains written in forward, and chains that must not be fused


class FunctionalNet(nn.Module):
    """Conv modules with every spelling of ReLU and max pooling in forward."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6, momentum=None)  # cumulative average: counts batches
        self.conv2 = nn.Conv2d(6, 8, 3, padding="same", bias=False)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)  # shared by two chains
        self.conv4 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x)), inplace=True), 2)
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.max_pool2d(self.relu(self.bn3(self.conv3(x))), 3, 2, ceil_mode=True)  # 4x4 -> 2x2
        x = self.pool(self.conv4(x).relu_())
        return torch.flatten(x, 1)


def test_functional_chains_fuse_in_the_graph_and_compute_the_same():
    torch.manual_seed(0)
    model = FunctionalNet().double()
    fused, report = fuse_quietly(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule) and type(fused).__name__ == "FunctionalNet"
    assert [chain.names for chain in report.fused] == [
        ("conv1", "bn1", "relu", "max_pool2d"),
        ("conv2", "relu_1", "pool"),
        ("conv3", "bn3", "relu", "max_pool2d_1"),
        ("conv4", "relu_", "pool"),
    ]
    assert report.unfused == [] and report.checks == []
    input = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)
    assert int(fused.bn1.num_batches_tracked) == 1
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, input, FLOAT64)


class FunctionalPool(nn.Module):
    """conv -> batch norm -> ReLU -> a functional max pool written with ``pool``'s arguments."""

    def __init__(self, pool):
        super().__init__()
        self.conv, self.bn, self.pool = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), pool

    def forward(self, x):
        return self.pool(F.relu(self.bn(self.conv(x))))


@pytest.mark.parametrize(
    "pool, reason",
    [
        (lambda x: F.max_pool2d(x, 3, 2, 1), None),  # ResNet's stem, positionally
        (lambda x: torch.max_pool2d(x, 3, 2, 1, 1, True), None),  # positional dilation 1 and ceil mode
        (lambda x: F.max_pool2d(x, kernel_size=4, stride=1, padding=2), None),  # padding at half the window
        (lambda x: F.max_pool2d(x, (3, 2), padding=(1, 0), ceil_mode=True), None),
        (lambda x: F.max_pool2d(x, 2, dilation=2), "pool.dilation=2; the fused op pools without dilation"),
        (lambda x: torch.max_pool2d(x, 3, 1, 1, 2), "pool.dilation=2; the fused op pools without dilation"),
    ],
)
def test_functional_pools_keep_their_padding_ceil_mode_and_dilation(pool, reason):
    torch.manual_seed(0)
    model = FunctionalPool(pool).double()
    fused, report = fuse_quietly(model, report=True)
    if reason is None:
        assert len(report.fused) == 1 and report.unfused == [], report
    else:
        assert report.fused == [] and [chain.reason for chain in report.unfused] == [reason], report
    input = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)


def test_a_frozen_batch_norm_stays_frozen():
    # Each batch norm's own mode decides, as in torch: here bn2 normalises with its running
    # statistics (and leaves them alone) while the rest of the model trains.
    torch.manual_seed(0)
    model = ConvNet("full", "native").double()
    fused = fuse_quietly(model)
    for m in (model, fused):
        m.train()
        m.bn2.eval()
    out, _, grads = run(fused, convnet_input("full"))
    expected_out, _, expected_grads = run(model, convnet_input("full"))
    torch.testing.assert_close(out, expected_out, **FLOAT64)
    assert_same_tensors(grads, expected_grads, FLOAT64)
    assert int(fused.bn2.num_batches_tracked) == 0 and int(fused.bn1.num_batches_tracked) == 1
    assert_same_tensors(dict(fused.named_buffers()), dict(model.named_buffers()), FLOAT64)


def test_a_graph_module_given_to_fuse_unfuses_to_its_graph():
    torch.manual_seed(0)
    model = FunctionalNet().double()
    traced = torch.fx.symbolic_trace(model)
    fused = fuse_quietly(traced)
    assert isinstance(fused.conv2, FusedConv2dReLUMaxPool2d)
    unfused = cifarnet.unfuse(fused)
    assert isinstance(unfused, torch.fx.GraphModule) and module_types(unfused) == module_types(traced)
    functions = [node.target for node in unfused.graph.nodes if node.op == "call_function"]
    assert functions.count(F.max_pool2d) == 1 and functions.count(torch.max_pool2d) == 1
    input = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert_same_function(unfused, model, input, FLOAT64)


class ReusedOutputNet(nn.Module):
    """The convolution's output also feeds a second branch: fusing would lose it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = self.pool(F.relu(y))
        return self.pool(F.relu(self.conv2(z))).sum((1, 2, 3)) + y.mean((1, 2, 3))


def test_a_reused_output_is_not_fused_and_is_reported():
    torch.manual_seed(0)
    model = ReusedOutputNet().double()
    fused, report = fuse_quietly(model, report=True)
    assert [str(chain) for chain in report.unfused] == ["conv -> relu -> pool: the output of conv is also used by mean"]
    assert [chain.names for chain in report.fused] == [("conv2", "relu_1", "pool")]  # pool is called twice
    assert type(fused.conv) is nn.Conv2d
    input = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)


class AugmentedAssignmentNet(nn.Module):
    """``y += x`` and ``y *= 2`` change ``y`` in place, and ``z`` is ``y``: the output shows
    whether the fused graph still does them in place (torch.fx's own tracing does not)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        y = self.bn(x)
        z = y
        y += x
        y *= 2
        return torch.cat((y, z), 1)


def test_augmented_assignments_stay_in_place():
    torch.manual_seed(0)
    model = AugmentedAssignmentNet().double()
    fused = fuse_quietly(model)
    assert isinstance(fused.conv, FusedConv2dReLUMaxPool2d)
    input = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)
    assert_same_function(pickle.loads(pickle.dumps(fused)), model, input, FLOAT64)  # traced again on load


def test_resnet_blocks_add_into_their_batch_norm_output_as_torchvision_writes():
    # BasicBlock's `out += identity`: an out-of-place add would allocate a fresh activation
    # per block.
    fused = fuse_quietly(torchvision.models.resnet18(num_classes=10))
    adds = [node.target for module in fused.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes if node.op == "call_function" and "add" in node.target.__name__]
    assert adds == [operator.iadd] * 8


@pytest.mark.parametrize(
    "conv, pool",
    [
        (nn.Conv2d(3, 4, 3, dilation=2), nn.MaxPool2d(2)),
        (nn.Conv2d(4, 4, 3, groups=2), nn.MaxPool2d(2)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2)),
        (nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, dilation=2)),
        (nn.Conv2d(3, 4, 1), nn.MaxPool2d(16)),
    ],
    ids=["dilation", "groups", "reflect", "pool-dilation", "window-256"],
)
def test_unfusable_chains_are_left_alone_with_the_reason(conv, pool):
    model = nn.Sequential(conv, nn.ReLU(), pool).double()
    fused, report = fuse_quietly(model, report=True)
    reason = conv_relu_pool_unfusable_reason(conv, pool)
    assert reason is not None
    assert report.fused == [] and [(c.names, c.reason) for c in report.unfused] == [(("0", "1", "2"), reason)]
    assert module_types(fused) == module_types(model)
    input = torch.randn(2, conv.in_channels, 17, 17, dtype=torch.float64)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)


def test_pool_padded_over_half_its_window_is_left_alone_and_raises_as_native():
    conv, pool = nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, padding=(1, 2))
    model = nn.Sequential(conv, nn.ReLU(), pool).double()
    fused, report = fuse_quietly(model, report=True)
    reason = conv_relu_pool_unfusable_reason(conv, pool)
    assert reason is not None and "pool.padding" in reason
    assert report.fused == [] and [(c.names, c.reason) for c in report.unfused] == [(("0", "1", "2"), reason)]
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        fused(torch.randn(2, 3, 9, 9, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("batch_norm", [False, True])
def test_same_padding_of_even_kernels_is_fused(batch_norm):
    """'same' with an even kernel pads one more row and column at the bottom and right, as
    native does it."""
    conv = nn.Conv2d(3, 4, (2, 4), padding="same")
    model = nn.Sequential(conv, *([nn.BatchNorm2d(4)] if batch_norm else []), nn.ReLU(), nn.MaxPool2d(2)).double()
    fused, report = fuse_quietly(model, report=True)
    assert len(report.fused) == 1 and report.unfused == []
    input = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    for training in (True, False):
        fused.train(training), model.train(training)
        torch.testing.assert_close(fused(input), model(input), **FLOAT64)


@pytest.mark.parametrize(
    "pool_with_indices",
    [
        lambda x: F.max_pool2d(x, 2, return_indices=True),
        lambda x: F.max_pool2d_with_indices(x, 2),  # returns indices without the argument
        lambda x: F.max_pool2d_with_indices(x, 2, return_indices=False),
    ],
    ids=["max_pool2d", "max_pool2d_with_indices", "max_pool2d_with_indices(return_indices=False)"],
)
def test_pool_returning_indices_and_hooked_modules_are_not_fused(pool_with_indices):
    class IndicesNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            values, indices = pool_with_indices(F.relu(self.conv(x)))
            return values * 2, indices

    model = IndicesNet()
    fused, report = fuse_quietly(model, report=True)
    assert [c.reason for c in report.unfused] == ["pool.return_indices=True; the fused op returns only the pooled values"]
    input = torch.randn(2, 3, 8, 8)
    for ours, native in zip(fused(input), model(input), strict=True):
        assert ours.dtype == native.dtype and torch.equal(ours, native)
    hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    hooked[1].register_forward_hook(lambda module, args, output: None)
    _, report = fuse_quietly(hooked, report=True)
    assert [c.reason for c in report.unfused] == ["1 has hooks, which the fused layer would not call"]


# --------------------------------------------------------------------------------------------
# Models torch.fx cannot trace: rewritten by position inside, with a warning


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class UntraceableNet(nn.Module):
    """forward branches on data; its Sequential and its traceable child can still be fused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.head = Head()

    def forward(self, x):
        x = self.stem(x)
        if x.sum() > 0:
            x = x * 2
        else:
            x = x - 1
        return self.head(x)


def test_untraceable_model_warns_and_fuses_its_parts():
    torch.manual_seed(0)
    model = UntraceableNet().double()
    with pytest.warns(UserWarning, match="cannot trace the model with torch.fx .*either branch at test_fuse.py"):
        fused, report = cifarnet.fuse(model, report=True)
    assert list(report.untraced) == [""]
    assert [chain.names for chain in report.fused] == [
        ("stem.0", "stem.1", "stem.2", "stem.3"),
        ("head.conv", "head.relu", "head.max_pool2d"),
    ]
    assert type(fused) is UntraceableNet and isinstance(fused.head, torch.fx.GraphModule)
    assert isinstance(fused.stem[1], FusedBatchNorm2d) and fused.stem[0].bn is fused.stem[1]
    for sign in (1, -1):  # both branches of forward
        input = sign * torch.rand(2, 3, 16, 16, dtype=torch.float64) + sign
        assert_same_function(fused, model, input, FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, torch.rand(2, 3, 16, 16, dtype=torch.float64), FLOAT64)


class ModeNet(Head):
    """forward branches on self.training: dropout only while training."""

    def forward(self, x):
        x = super().forward(x)
        return F.dropout(x, 0.5) if self.training else x


@pytest.mark.parametrize("mode", [True, False])
def test_forward_that_depends_on_the_mode_is_fused_in_the_mode_it_is_in(mode):
    torch.manual_seed(0)
    model = ModeNet().double().train(mode)
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == [("conv", "relu", "max_pool2d")]
    held, other = ("training", "evaluation") if mode else ("evaluation", "training")
    assert report.checks == [
        f"ModeNet: forward branches on the mode: the graph holds {held} mode; in {other} mode the module's own forward runs, unfused"
    ]
    input = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)  # the fused graph in one mode, the original forward in the other
    calls = []
    hook = fused.conv.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    for training in (mode, not mode):
        fused.train(training)(input)
    hook.remove()
    # hooked, the fused layer is an nn.Conv2d again in either mode (the original forward runs)
    assert calls == [torch.Size([2, 8, 6, 6])] * 2
    assert_same_function(copy.deepcopy(fused), model, input, FLOAT64)
    assert_same_function(pickle.loads(pickle.dumps(fused)), model, input, FLOAT64)


def test_fusing_again_in_the_other_mode_keeps_the_mode_its_graph_holds():
    model = ModeNet().double()
    fused = fuse_quietly(fuse_quietly(model).eval())
    assert fused._traced_from.mode is True
    input = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)


class ShapeError(Exception):
    """A user's own exception type, which fusing must not turn into another."""


class CheckedHead(Head):
    """Checks its input in forward, with its own exception type."""

    def forward(self, x):
        if x.shape[1] != self.conv.in_channels:
            raise ShapeError(f"expected {self.conv.in_channels} channels, got {x.shape[1]}")
        return super().forward(x)


class CheckingNet(nn.Module):
    """Checks in its own forward (ValueError) and in a submodule's that is traced into
    (ShapeError); an unbatched input takes a way through forward that torch.fx cannot trace
    (it iterates over the input), so only the batched way is in the graph."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = CheckedHead()

    def forward(self, x):
        if x.dim() == 3:
            return self(torch.stack(list(x)).unsqueeze(0))[0]  # list(x): torch.fx cannot iterate
        if x.dim() != 4:
            raise ValueError(f"x must be 3-D or 4-D, got {x.dim()}-D")
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return torch.flatten(self.head(x), 1)


def test_exceptions_raised_in_forward_keep_their_type_after_fusing():
    torch.manual_seed(0)
    model = CheckingNet().double().eval()
    fused, report = fuse_quietly(model, report=True)
    assert isinstance(fused, torch.fx.GraphModule) and len(report.fused) == 2 and len(report.checks) == 3
    assert_raises_as(model, fused, torch.randn(2, 3, 8, 8, 1, dtype=torch.float64))  # ValueError
    assert_raises_as(model, fused, torch.randn(2, 3, 8, 8, 1, 1, dtype=torch.float64))
    model.head.conv = nn.Conv2d(4, 8, 3, padding=1).double()  # head now rejects 8 channels: ShapeError
    fused = fuse_quietly(model)
    assert_raises_as(model, fused, torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert_raises_as(model, copy.deepcopy(fused), torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert_raises_as(model, fuse_quietly(fused), torch.randn(2, 3, 8, 8, dtype=torch.float64))


def test_inputs_the_graph_does_not_hold_get_the_original_forward():
    # The unbatched way through CheckingNet.forward is not in the graph: the model's own
    # forward computes it, on the same tensors (running statistics included).
    torch.manual_seed(0)
    model = CheckingNet().double()
    fused = fuse_quietly(model)
    unbatched = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_same_function(fused, model, unbatched, FLOAT64)
    assert_same_function(fused, model, unbatched.unsqueeze(0), FLOAT64)  # the graph's way
    assert isinstance(fused.conv, FusedConv2dBatchNormReLUMaxPool2d) and int(fused.bn.num_batches_tracked) == 2
    assert_unfuses_to(model, fused, unbatched, FLOAT64)


class LateBranchNet(nn.Module):
    """Branches after its batch norms (a module and a functional one on buffers of its own):
    a 1×1 map takes a way through forward that torch.fx cannot trace (it iterates over the
    tensor), so the graph holds only the other way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.register_buffer("mean", torch.zeros(8))
        self.register_buffer("var", torch.ones(8))

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        x = F.batch_norm(x, self.mean, self.var, training=True)
        if x.shape[-1] == 1:
            return torch.stack([row.sum() for row in x])
        return x.sum((1, 2, 3))


def test_a_branch_the_graph_does_not_hold_changes_running_statistics_once():
    torch.manual_seed(0)
    model = LateBranchNet().double()
    fused = fuse_quietly(model)
    assert isinstance(fused.conv, FusedConv2dBatchNormReLUMaxPool2d)
    assert fused._buffers_before_checks  # the check comes after the batch norm
    late = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    # The graph's batch norm runs, its check fails, the original forward runs from the start:
    # its running statistics must be updated once (num_batches_tracked 1, not 2).
    assert_same_function(fused, model, late, FLOAT64, modes=(True,))
    assert int(fused.bn.num_batches_tracked) == 1
    assert_same_function(fused, model, late.repeat(1, 1, 2, 2), FLOAT64, modes=(True,))  # the graph's way
    assert int(fused.bn.num_batches_tracked) == 2
    assert_same_function(copy.deepcopy(fused), copy.deepcopy(model), late, FLOAT64, modes=(True,))


def test_report_reads_as_a_summary():
    _, report = fuse_quietly(ReusedOutputNet(), report=True)
    assert isinstance(report, FusionReport)
    assert str(report).splitlines() == [
        "cifarnet.fuse: fused 1 chain(s), left 1 unfused",
        "  fused:      conv2 -> relu_1 -> pool",
        "  unfused:    conv -> relu -> pool: the output of conv is also used by mean",
    ]


def test_fused_layers_are_not_built_by_hand():
    with pytest.raises(TypeError, match="cifarnet.fuse"):
        FusedConv2dBatchNormReLUMaxPool2d(3, 4, 3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        cifarnet.fuse(lambda x: x)


# --------------------------------------------------------------------------------------------
# What a traced graph would lose: hooks, a train() of the model's own, grad mode and autocast
# switched in forward, attributes forward assigns, submodules in their own modes, shared modules


class Block(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        return self.second(self.first(x))


def block_input(batch=2, size=8):
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


@pytest.mark.parametrize("hook", ["forward", "forward_pre", "full_backward"])
def test_hooks_of_a_module_forward_calls_run_at_every_call(hook):
    # A Grad-CAM-style hook on a block: the graph calls the block, which is fused inside.
    torch.manual_seed(0)
    model = TwoBlocks().double()
    seen = []
    getattr(model.second, f"register_{hook}_hook")(lambda module, *tensors: seen.append(tensors[-1]))
    fused, report = fuse_quietly(model, report=True)
    assert seen == []  # fusing ran no hook
    assert [chain.names for chain in report.fused] == [
        ("first.conv", "relu", "max_pool2d"),  # traced into the model's graph
        ("second.conv", "second.relu", "second.max_pool2d"),  # in the hooked block's own
    ]
    assert isinstance(fused.second.conv, FusedConv2dReLUMaxPool2d)
    assert_same_function(fused, model, block_input(), FLOAT64)
    fused_calls, native_calls = seen[0::2], seen[1::2]
    assert len(fused_calls) == 2 and all(type(tensors[0]) is torch.Tensor for tensors in fused_calls)
    for ours, native in zip(fused_calls, native_calls):
        assert_close(ours[0], native[0], FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)
    assert_unfuses_to(model, fused, block_input(), FLOAT64)


class FrozenBatchNormNet(nn.Module):
    """Keeps its batch norm in evaluation mode, whatever train() asks (detection backbones do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def train(self, mode=True):
        super().train(mode)
        self.bn.eval()
        self.trained_last = mode  # an attribute train() sets, not forward: no reason not to trace
        return self

    def forward(self, x):
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)


def test_a_train_method_of_the_model_s_own_still_runs():
    torch.manual_seed(0)
    model = FrozenBatchNormNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    fused = fuse_quietly(model)
    assert isinstance(fused, torch.fx.GraphModule) and isinstance(fused.conv, FusedConv2dBatchNormReLUMaxPool2d)
    input = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_same_function(fused, model, input, FLOAT64)
    fused.train()
    assert fused.training and not fused.bn.training and int(fused.bn.num_batches_tracked) == 0
    assert fused.trained_last is True  # set by the class's train(), on the GraphModule


class GradModeNet(nn.Module):
    """Runs a frozen stem under no_grad (or autocast) before a chain."""

    def __init__(self, context):
        super().__init__()
        self.context = context
        self.frozen = nn.Conv2d(3, 3, 1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        with self.context():
            x = self.frozen(x)
        return F.max_pool2d(F.relu(self.conv(x.float())), 2)


@pytest.mark.parametrize(
    "context", [torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16)], ids=["no_grad", "autocast"]
)
def test_forward_switching_grad_mode_or_autocast_is_not_traced(context):
    torch.manual_seed(0)
    model = GradModeNet(context)
    with pytest.warns(UserWarning, match=r"cannot trace the model .*switches grad mode or autocast"):
        fused = cifarnet.fuse(model)
    assert type(fused) is GradModeNet and type(fused.conv) is nn.Conv2d
    input = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    output = fused(input)
    output.sum().backward()
    native = model(input)
    assert output.dtype == native.dtype and torch.equal(output, native)
    assert (fused.frozen.weight.grad is None) == (context is torch.no_grad)


class CountingNet(Block):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def test_forward_assigning_an_attribute_is_not_traced():
    model = CountingNet()
    with pytest.warns(UserWarning, match="forward changes the attribute calls outside the traced graph"):
        fused = cifarnet.fuse(model)
    assert fused.calls == 0  # as it was before tracing
    fused(block_input().float())
    assert type(fused) is CountingNet and fused.calls == 1


class TrainingOnlyDoubling(nn.Module):
    def forward(self, x):
        return x * 2 if self.training else x


class DoublingNet(Block):
    def __init__(self):
        super().__init__()
        self.doubling = TrainingOnlyDoubling()

    def forward(self, x):
        return self.doubling(super().forward(x))


@pytest.mark.parametrize("mode", [True, False])
def test_a_submodule_traced_into_in_another_mode_than_the_graph_s_gets_the_original_forward(mode):
    torch.manual_seed(0)
    model = DoublingNet().double().train(mode)
    fused = fuse_quietly(model)
    assert fused._traced_from.traced_into == ("doubling",)
    for copied in (fused, copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        for doubling_mode in (True, False):
            model.doubling.train(doubling_mode)
            copied.doubling.train(doubling_mode)
            assert_close(copied(block_input()), model(block_input()), FLOAT64)


def test_a_submodule_traced_into_and_deleted_after_fusing_fails_as_on_the_original():
    model = DoublingNet().double()
    fused = fuse_quietly(model)
    errors = []
    for network in (model, fused):
        del network.doubling
        with pytest.raises(AttributeError) as error:
            network(block_input())
        errors.append(str(error.value))
    assert errors[1] == errors[0]


def resnet18_fused_by_graph():
    """ResNet-18 in float64 evaluation mode beside its fused copy (the stem's chain and every
    bn -> ReLU -> conv chain fused in the graph of forward, traced into each block)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).double().eval()
    return model, fuse_quietly(copy.deepcopy(model))


def calls_fused_ops(model, input) -> bool:
    with recorded_op_calls() as recorded:
        model(input)
    return any(call.startswith("cifarnet.") for call in recorded.calls)


@pytest.mark.parametrize("where", ["layer4", "layer1.0", "maxpool", "relu", "layer1.0.bn1", "conv1"])
def test_hooks_registered_after_fusing_run_as_on_the_original(where):
    """On a block the graph traced into, a module of a fused chain or the fused layer itself,
    a hook registered after fusing makes the model run its own forward, where the hook sees
    what it sees unfused (a convolution's output, not the chain's); the graph runs again once
    the hook is removed."""
    model, fused = resnet18_fused_by_graph()
    input = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert calls_fused_ops(fused, input)
    results = {}
    for name, network in (("native", model), ("fused", fused)):
        seen = []
        handle = network.get_submodule(where).register_forward_hook(lambda module, args, output: seen.append(output.clone()))
        results[name] = network(input), seen
        handle.remove()
    (expected, expected_seen), (actual, actual_seen) = results["native"], results["fused"]
    assert len(actual_seen) == len(expected_seen) > 0
    for ours, theirs in zip(actual_seen, expected_seen):
        assert_close(ours, theirs, FLOAT64)
    assert_close(actual, expected, FLOAT64)
    assert calls_fused_ops(fused, input)


@pytest.mark.parametrize(
    "where, replacement",
    [
        ("maxpool", nn.Identity),  # the usual edit for CIFAR-sized inputs
        ("bn1", nn.Identity),
        ("conv1", lambda: nn.Conv2d(3, 64, 3, padding=1)),
        ("layer1", nn.Identity),
        ("layer2.0.bn1", lambda: nn.BatchNorm2d(128, eps=0.5)),
    ],
)
def test_modules_replaced_after_fusing_are_the_ones_that_run(where, replacement):
    """A fused layer holds its chain's batch norm and pool: replacing one of them, the fused
    layer, or a block the graph traced into sends the model to its own forward."""
    model, fused = resnet18_fused_by_graph()
    new = replacement().double().eval()
    model.set_submodule(where, new)
    fused.set_submodule(where, new)
    input = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_close(fused(input), model(input), FLOAT64)


class UntraceableBlocks(nn.Module):
    """One block twice (tied weights) in a forward torch.fx cannot trace."""

    def __init__(self):
        super().__init__()
        block = Block()
        self.blocks = nn.ModuleList([block, block])

    def forward(self, x):
        if x.sum() > 0:
            x = -x
        for block in self.blocks:
            x = block(x)
        return x


def test_a_module_held_twice_is_fused_once():
    torch.manual_seed(0)
    model = UntraceableBlocks().double()
    with pytest.warns(UserWarning, match="cannot trace the model"):
        fused, report = cifarnet.fuse(model, report=True)
    assert fused.blocks[0] is fused.blocks[1] and isinstance(fused.blocks[0].conv, FusedConv2dReLUMaxPool2d)
    assert [chain.names for chain in report.fused] == [("blocks.0.conv", "blocks.0.relu", "blocks.0.max_pool2d")]
    assert_same_function(fused, model, block_input(size=16), FLOAT64)


class SharedChainNet(nn.Module):
    """Two nn.Sequential holding the same convolution and batch norm, in a forward torch.fx
    cannot trace."""

    def __init__(self):
        super().__init__()
        conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.a = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2))
        self.b = nn.Sequential(conv, bn, nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        return self.a(x) + 2 * self.b(x + 1) if x.sum() > -1e9 else self.b(x)


class SharedChainHead(SharedChainNet):
    """Calls one of the two, in a forward torch.fx traces."""

    def forward(self, x):
        return self.a(x)


@pytest.mark.parametrize("model_class, left", [(SharedChainNet, ["a.0", "b.0"]), (SharedChainHead, ["a.0"])])
def test_shared_convolutions_and_batch_norms_are_left_with_the_reason(model_class, left):
    torch.manual_seed(0)
    model = model_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused, report = cifarnet.fuse(model, report=True)
    assert report.fused == []
    assert [chain.reason for chain in report.unfused] == [f"{conv} is shared: a child of 2 modules" for conv in left]
    fused, model = fused.double(), model.double()
    assert fused.a[1].running_mean is fused.b[1].running_mean
    assert_same_function(fused, model, torch.randn(2, 3, 8, 8, dtype=torch.float64), FLOAT64)


# --------------------------------------------------------------------------------------------
# Models written with cifarnet.nn layers: unfuse gives them back to torch


class LayersNet(nn.Module):
    """Every cifarnet.nn layer, written into a model by hand (not by fuse)."""

    def __init__(self):
        super().__init__()
        self.stage1 = cifarnet.nn.Conv2dReLUMaxPool2d(3, 6, 3, padding=1)
        self.stage2 = cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(6, 8, 3, padding=1, momentum=None)
        self.head = nn.Sequential(cifarnet.nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(32, 10), cifarnet.nn.BatchNorm1d(10))

    def forward(self, x):
        return self.head(self.stage2(self.stage1(x)))


def assert_torch_only(model) -> None:
    assert not [(n, type(m)) for n, m in model.named_modules() if type(m).__module__.startswith("cifarnet")]


def test_unfuse_turns_cifarnet_layers_into_torch_modules():
    torch.manual_seed(0)
    model = LayersNet().double()
    unfused = cifarnet.unfuse(model)
    assert type(unfused) is LayersNet and unfused is not model
    assert_torch_only(unfused.stage1)
    assert_torch_only(unfused.stage2)
    assert_torch_only(unfused.head)
    assert_same_tensors(unfused.state_dict(), model.state_dict(), EXACT)  # same keys, in order
    input = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_same_function(unfused, model, input, FLOAT64)
    assert_state_dicts_load_both_ways(unfused, model)
    layer = cifarnet.nn.Conv2dReLUMaxPool2d(3, 6, 3)
    assert_torch_only(cifarnet.unfuse(layer))  # a layer on its own too
    inplace = copy.deepcopy(model)
    assert cifarnet.unfuse(inplace, inplace=True) is inplace
    assert_torch_only(inplace.stage1)


@pytest.mark.parametrize(
    "layer",
    [
        cifarnet.nn.Conv2dReLUMaxPool2d(3, 4, 3),
        cifarnet.nn.Conv2dBatchNormReLUMaxPool2d(3, 4, 3),
        cifarnet.nn.BatchNormReLUConv2d(3, 4, 3),
        cifarnet.nn.BatchNorm2d(3),
        cifarnet.nn.Dropout(0.0),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_unfuse_keeps_the_hooks_of_the_layers_it_replaces(layer):
    model = nn.Sequential(layer)
    outputs = []
    handle = layer.register_forward_hook(lambda module, args, output: outputs.append(output))
    input = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    model.eval()(input)
    assert len(cifarnet.unfuse(model)[0]._forward_hooks) == 1  # a copy's own copy of it
    unfused = cifarnet.unfuse(model, inplace=True)
    assert not any(type(module).__module__.startswith("cifarnet") for module in unfused.modules())
    unfused(input)
    assert len(outputs) == 2
    torch.testing.assert_close(outputs[1], outputs[0])
    handle.remove()  # in place, the user's handle still removes it
    unfused(input)
    assert len(outputs) == 2


def test_unfuse_warns_that_hooks_registered_on_fused_positions_are_dropped():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)))
    fused = cifarnet.fuse(model)
    fused[0][0].register_forward_hook(lambda module, args, output: None)  # the pooled output
    fused[0][3].register_forward_pre_hook(lambda module, args: None)
    with pytest.warns(UserWarning, match=r"hooks registered after fusing on 0\.0, 0\.3 are dropped"):
        unfused = cifarnet.unfuse(fused)
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in unfused.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cifarnet.unfuse(cifarnet.fuse(model))  # nothing hooked, nothing said


def test_an_unfused_model_loads_without_cifarnet(tmp_path):
    torch.manual_seed(0)
    layers = LayersNet().double()
    model = nn.Sequential(layers.stage1, layers.stage2, layers.head)
    input = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.save({"model": cifarnet.unfuse(model).eval(), "input": input, "output": model.eval()(input)}, tmp_path / "model.pt")
    script = (
        "import sys; sys.modules['cifarnet'] = None  # any import of cifarnet fails\n"
        "import torch\n"
        f"saved = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "torch.testing.assert_close(saved['model'](saved['input']), saved['output'], rtol=1e-12, atol=1e-12)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# cifarnet-bench --model


def test_bench_model_compares_before_and_after_fuse(tmp_path, capsys):
    report = tmp_path / "bench.json"
    assert benchmark.main(["--model", "convnet", "--batch-size", "2", "--repeats", "1", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| convnet | model | 3x28x28 (N=2) | 3 |" in printed
    written = json.loads(report.read_text())
    assert written["model"] == "convnet" and written["config"]["repeats"] == 1
    (row,) = written["results"]
    assert row["forward_backward_ms"]["native"] > 0 and row["forward_backward_ms"]["fused"] > 0
    assert 0 < row["saved_bytes"]["fused"] < row["saved_bytes"]["native"]


def test_bench_model_times_vgg11_bn_features_alone(capsys):
    assert benchmark.main(["--model", "vgg11_bn", "--batch-size", "2", "--repeats", "1", "--warmup", "0"]) == 0
    printed = capsys.readouterr().out
    assert "| vgg11_bn | model | 3x32x32 (N=2) | 5 |" in printed
    assert "| vgg11_bn | features | 3x32x32 (N=2) | 5 |" in printed


def test_bench_model_refuses_plot(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--model", "alexnet", "--plot", "x.png"])
    assert "--plot" in capsys.readouterr().err
