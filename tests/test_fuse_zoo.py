"""cifarnet.fuse over torchvision's classification models that hold a conv -> [batch norm ->]
ReLU -> max-pool chain: the chains each model holds (those and its batch norm -> ReLU -> conv
chains), written out from its architecture and found again by walking its torch.fx graph back
from the pools and the convolutions; what fuse fused and left; and the fused model against the
original in float64. docs/library.md's table of the zoo comes from benchmarks/fuse_zoo.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cifarnet
from cifarnet.fuse import FusedBatchNormReLUConv2d, FusedConv2dBatchNormReLUMaxPool2d, FusedConv2dReLUMaxPool2d
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


def resnet_bn_relu_convs(blocks: list[int], bottleneck: bool) -> list[tuple[str, ...]]:
    """Each residual block's bn1 -> relu -> conv2 (and a bottleneck's bn2 -> relu -> conv3): the
    block's ReLU module, called after each batch norm but the last (whose ReLU follows the
    residual add)."""
    chains = []
    for layer, count in enumerate(blocks, 1):
        for block in (f"layer{layer}.{index}" for index in range(count)):
            chains.append((f"{block}.bn1", f"{block}.relu", f"{block}.conv2"))
            if bottleneck:
                chains.append((f"{block}.bn2", f"{block}.relu", f"{block}.conv3"))
    return chains


def densenet_bn_relu_convs(blocks: list[int]) -> list[tuple[str, ...]]:
    """Each dense layer's norm1 -> relu1 -> conv1 and norm2 -> relu2 -> conv2, and each
    transition's norm -> relu -> conv (its pool averages)."""
    chains = []
    for index, count in enumerate(blocks, 1):
        for layer in (f"features.denseblock{index}.denselayer{j}" for j in range(1, count + 1)):
            chains += [(f"{layer}.norm1", f"{layer}.relu1", f"{layer}.conv1"), (f"{layer}.norm2", f"{layer}.relu2", f"{layer}.conv2")]
        if index < len(blocks):
            transition = f"features.transition{index}"
            chains.append((f"{transition}.norm", f"{transition}.relu", f"{transition}.conv"))
    return chains


GOOGLENET_BLOCKS = ["inception3a", "inception3b", "inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "inception5a", "inception5b"]


def googlenet_bn_relu_convs() -> list[tuple[str, ...]]:
    """Each Inception block's branch2 and branch3: BasicConv2d 1x1 -> BasicConv2d 3x3. BasicConv2d
    calls F.relu, which torch.fx names relu, relu_1, ... in call order: conv1, conv2, conv3, then
    each block's branch1, branch2 (two), branch3 (two) and branch4 (after its max pool)."""
    chains = []
    for index, block in enumerate(GOOGLENET_BLOCKS):
        first = 3 + 6 * index  # branch1's relu
        chains.append((f"{block}.branch2.0.bn", f"relu_{first + 1}", f"{block}.branch2.1.conv"))
        chains.append((f"{block}.branch3.0.bn", f"relu_{first + 3}", f"{block}.branch3.1.conv"))
    return chains


def heads(pool_chain: tuple[str, ...]) -> str:
    return f"{pool_chain[0]} heads the fused chain {' -> '.join(pool_chain)}"


# name: (bn -> relu -> conv chains fused, those left with their reasons), from the architecture;
# models not named have none. Inception v3's are counted: stem Conv2d_1a -> 2a (2a -> 2b and
# 3b -> 4a end in convolutions that head pool chains), 3 per InceptionA (x3), 2 in InceptionB,
# 6 per InceptionC (x4), 4 in InceptionD and 1 per InceptionE (x2): 42. Each InceptionE also
# splits two rectified tensors between a 1x3 and a 3x1 convolution: 4 left. ShuffleNet v2's
# 16 blocks each hold one, whose depthwise convolution (groups) the op cannot compute.
BN_RELU_CONVS = {
    "resnet18": (resnet_bn_relu_convs([2, 2, 2, 2], bottleneck=False), []),
    "resnet50": (resnet_bn_relu_convs([3, 4, 6, 3], bottleneck=True), []),
    "densenet121": (densenet_bn_relu_convs([6, 12, 24, 16]), []),
    # (conv, bn, relu) x2 before three pools: the second conv heads the pool chain
    "vgg11_bn": ([], [(pair, heads(chain)) for pair, chain in zip(runs("features", (9, 11), (16, 18), (23, 25)), runs("features", (11, 14), (18, 21), (25, 28)))]),
    "googlenet": (googlenet_bn_relu_convs(), [(("conv2.bn", "relu_1", "conv3.conv"), heads(ZOO["googlenet"][1][1]))]),
    "inception_v3": (42, 6),
    "shufflenet_v2_x1_0": (0, 16),
}


def traced_graph(model: nn.Module) -> torch.fx.Graph:
    return torch.fx.symbolic_trace(model).graph


def bn_relu_convs_into_convs(model: nn.Module) -> list[tuple[tuple[str, ...], bool]]:
    """Every batch norm -> ReLU -> conv chain of ``model``'s torch.fx graph, found from each
    convolution back to its batch norm, in forward order, with whether the batch norm's or the
    ReLU's output is also read elsewhere (a tensor read twice is found from each reader)."""
    modules = dict(model.named_modules())

    def calls(node, module_type, function=None) -> bool:
        if node.op == "call_module":
            return isinstance(modules[node.target], module_type)
        return function is not None and node.op == "call_function" and node.target is function

    chains = []
    for conv in traced_graph(model).nodes:
        if not calls(conv, nn.Conv2d) or not isinstance(relu := conv.args[0], torch.fx.Node):
            continue
        if calls(relu, nn.ReLU, F.relu) and calls(bn := relu.args[0], nn.BatchNorm2d):
            names = tuple(node.target if node.op == "call_module" else node.name for node in (bn, relu, conv))
            chains.append((names, len(bn.users) > 1 or len(relu.users) > 1))
    return chains


def expected_chains(name: str, model: nn.Module) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The chains fuse must fuse (pool chains and bn -> relu -> conv, in forward order) and
    the bn -> relu -> conv chains it must leave, from the architecture, checked against the
    graph walked back from the pools and the convolutions."""
    pool_chains = ZOO[name][1]
    assert chains_into_max_pools(model) == pool_chains
    fused_pairs, left = BN_RELU_CONVS.get(name, ([], []))
    found = bn_relu_convs_into_convs(model)
    pooled = {chain[0] for chain in pool_chains}
    depthwise = {name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module.groups > 1}
    fusable = [names for names, reused in found if not reused and names[-1] not in pooled | depthwise]
    if isinstance(fused_pairs, int):  # counted from the architecture, named by the graph
        assert len(fusable) == fused_pairs
    else:
        assert fusable == fused_pairs
    order = {node.target if node.op == "call_module" else node.name: index for index, node in enumerate(traced_graph(model).nodes)}
    return sorted([*pool_chains, *fusable], key=lambda chain: order[chain[0]]), left


def zoo_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=10, **ZOO[name][2])


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_fuses_the_chains_of_its_architecture_and_computes_the_same(name):
    size = ZOO[name][0]
    model = zoo_model(name).double()
    chains, left = expected_chains(name, model)
    fused, report = fuse_quietly(model, report=True)
    assert [chain.names for chain in report.fused] == chains
    if isinstance(left, int):
        assert len(report.unfused) == left and all(chain.kind == "bn_relu_conv" for chain in report.unfused)
    else:
        assert [(chain.names, chain.reason) for chain in report.unfused] == left
    assert report.untraced == {}
    for chain in report.fused:
        layer = fused.get_submodule(chain.names[-1] if chain.kind == "bn_relu_conv" else chain.names[0])
        expected = FusedBatchNormReLUConv2d if chain.kind == "bn_relu_conv" else (FusedConv2dReLUMaxPool2d, FusedConv2dBatchNormReLUMaxPool2d)
        assert isinstance(layer, expected)
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
    assert [chain.names for chain in report.fused if chain.kind == "pool"] == ZOO[name][1]
    # Inception v3's auxiliary classifier adds one bn -> relu -> conv: its conv0 -> conv1
    pairs = len(googlenet_bn_relu_convs()) if name == "googlenet" else BN_RELU_CONVS[name][0] + 1
    assert len([chain for chain in report.fused if chain.kind == "bn_relu_conv"]) == pairs
    assert all(chain.kind == "bn_relu_conv" for chain in report.unfused) and report.untraced == {}
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
    assert [chain.names for chain in report.fused] == BN_RELU_CONVS["resnet18"][0]  # the blocks' own ReLUs
    assert [(chain.names, chain.reason) for chain in report.unfused] == [
        (RESNET_STEM[0], "relu has hooks, which the fused layer would not call")
    ]
    input = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(fused(input), model(input), **FLOAT64)
    assert outputs == [torch.Size([2, 64, 16, 16])] * 2  # once in each model
