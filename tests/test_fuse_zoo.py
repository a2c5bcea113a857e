"""cifarnet.fuse over torchvision's classification models that hold a conv -> [batch norm ->]
ReLU -> max-pool chain: the chains each model holds, written out from its architecture and
found again by walking its torch.fx graph back from the pools; what fuse fused and left; and
the fused model against the original in float64. docs/library.md's table of the zoo comes
from benchmarks/fuse_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cifarnet
from cifarnet.fuse import FusedConv2dBatchNormReLUMaxPool2d, FusedConv2dReLUMaxPool2d
from fuse_cases import FLOAT64, assert_same_function, assert_state_dicts_load_both_ways, fuse_quietly

pytestmark = pytest.mark.usefixtures("one_thread")


def runs(parent: str, *spans: tuple[int, int]) -> list[tuple[str, ...]]:
    """Chains that are runs of consecutive children of ``parent``: ``(first, last)`` index each."""
    return [tuple(f"{parent}.{index}" for index in range(first, last + 1)) for first, last in spans]


RESNET_STEM = [("conv1", "bn1", "relu", "maxpool")]  # its blocks downsample by stride
# torchvision's googlenet(weights=...) drops its auxiliary classifiers by default; inception_v3
# keeps them unless asked (test_auxiliary_classifiers_... below: with them, nothing fuses).
AUXILIARY_OFF = {"aux_logits": False, "init_weights": True}

# name: (input side, the chains, constructor arguments). Batch 2, and inputs as small as each
# model allows while its last batch norms still see 8 values or more per channel in training
# mode: over 2, float64 rounding grows so much that native disagrees with itself (Inception v3
# at 75x75; see docs/library.md#the-torchvision-zoo).
ZOO = {
    "resnet18": (64, RESNET_STEM, {}),
    "resnet50": (64, RESNET_STEM, {}),
    # the stem; the transitions between dense blocks pool by averaging
    "densenet121": (64, [("features.conv0", "features.norm0", "features.relu0", "features.pool0")], {}),
    # configuration "A": 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M (conv, bn, relu each)
    "vgg11_bn": (32, runs("features", (0, 3), (4, 7), (11, 14), (18, 21), (25, 28)), {}),
    # conv relu pool, conv relu pool, (conv relu) x3 pool
    "alexnet": (64, runs("features", (0, 2), (3, 5), (10, 12)), {}),
    # the first conv; the later pools follow Fire modules' concatenations
    "squeezenet1_0": (64, runs("features", (0, 2)), {}),
    "squeezenet1_1": (64, runs("features", (0, 2)), {}),
    # GoogLeNet and Inception v3: a BasicConv2d (conv, bn, then F.relu, which torch.fx names
    # relu, relu_1, ... in the order forward calls it), then the model's own max pool.
    # After conv1 and conv3; maxpool3, maxpool4 and the Inception blocks' pooling branches
    # take concatenations.
    "googlenet": (
        64,
        [("conv1.conv", "conv1.bn", "relu", "maxpool1"), ("conv3.conv", "conv3.bn", "relu_2", "maxpool2")],
        AUXILIARY_OFF,
    ),
    # After Conv2d_2b_3x3 (the third BasicConv2d) and Conv2d_4a_3x3 (the fifth); the Inception
    # blocks' max pools take concatenations.
    "inception_v3": (
        107,
        [
            ("Conv2d_2b_3x3.conv", "Conv2d_2b_3x3.bn", "relu_2", "maxpool1"),
            ("Conv2d_4a_3x3.conv", "Conv2d_4a_3x3.bn", "relu_4", "maxpool2"),
        ],
        AUXILIARY_OFF,
    ),
    # conv1 is Sequential(conv, bn, relu); the model's maxpool follows it
    "shufflenet_v2_x1_0": (64, [("conv1.0", "conv1.1", "conv1.2", "maxpool")], {}),
}


def chains_into_max_pools(model: nn.Module) -> list[tuple[str, ...]]:
    """Every conv -> [batch norm ->] ReLU -> max-pool chain of ``model``'s torch.fx graph, in
    forward order, found from each max pool back to its convolution (fuse walks forward from
    the convolutions)."""
    modules = dict(model.named_modules())

    def calls(node, module_type, function) -> bool:
        if node.op == "call_module":
            return isinstance(modules[node.target], module_type)
        return node.op == "call_function" and node.target is function

    chains = []
    for pool in torch.fx.symbolic_trace(model).graph.nodes:
        if not calls(pool, nn.MaxPool2d, F.max_pool2d) or not calls(relu := pool.args[0], nn.ReLU, F.relu):
            continue
        bn = relu.args[0] if calls(relu.args[0], nn.BatchNorm2d, None) else None
        conv = (bn or relu).args[0]
        if calls(conv, nn.Conv2d, None):
            nodes = [node for node in (conv, bn, relu, pool) if node is not None]
            chains.append(tuple(node.target if node.op == "call_module" else node.name for node in nodes))
    return chains


def zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **ZOO[name][2])


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_fuses_the_chains_of_its_architecture_and_computes_the_same(name):
    size, chains, _ = ZOO[name]
    model = zoo_model(name).double()
    assert chains_into_max_pools(model) == chains
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == chains
    assert report.unfused == [] and report.untraced == {}
    for first, *_ in chains:
        assert isinstance(fused.get_submodule(first), (FusedConv2dReLUMaxPool2d, FusedConv2dBatchNormReLUMaxPool2d))
    input = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # training, then evaluation: output, input and parameter gradients, running statistics
    assert_same_function(fused, model, input, FLOAT64)
    assert_state_dicts_load_both_ways(fused, model)


class Concatenated(nn.Module):
    """A model whose forward returns a tuple in training mode (the auxiliary classifiers'
    outputs too), as one tensor, for the checks that take one output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        output = self.model(x)
        return torch.cat(list(output), 1) if isinstance(output, tuple) else output


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_auxiliary_classifiers_fuse_in_training_mode_and_run_unfused_in_evaluation(name):
    # torchvision's default without weights: forward also returns the auxiliary classifiers'
    # outputs, in training mode only. Each chain ends in the model's own forward (the pool) and
    # starts in a BasicConv2d's (conv, bn, F.relu), so only the model's graph holds one: the
    # graph of training mode, the mode the model is in.
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, init_weights=True).double()
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == ZOO[name][1]
    assert report.unfused == [] and report.untraced == {}
    assert report.checks[0] == (
        f"{type(model).__name__}: forward branches on the mode: the graph holds training mode; "
        "in evaluation mode the module's own forward runs, unfused"
    )
    if name == "googlenet":  # Inception v3's auxiliary classifier needs 299x299 inputs
        input = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        assert_same_function(Concatenated(fused), Concatenated(model), input, FLOAT64)
        assert_state_dicts_load_both_ways(fused, model)


def test_a_hook_on_resnet18s_stem_relu_leaves_the_stem_unfused_and_still_runs():
    # A forward hook on the stem's ReLU (feature extraction, Grad-CAM): the fused layer would
    # not call it, so the stem stays as it is, in the traced graph as in a Sequential.
    model = zoo_model("resnet18").double().eval()
    outputs = []
    model.relu.register_forward_hook(lambda module, args, output: outputs.append(output.shape))
    fused, report = fuse_quietly(model, report=True)
    assert report.fused == []
    assert [(chain.names, chain.reason) for chain in report.unfused] == [
        (RESNET_STEM[0], "relu has hooks, which the fused layer would not call")
    ]
    input = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)
    assert outputs == [torch.Size([2, 64, 16, 16])] * 2  # once in each model
