"""cifarnet.nn's layers whose forward depends on train/eval mode, under torch.fx, torch.export and
torch.compile: each follows ``.train()`` / ``.eval()`` as the torch.nn layer it replaces does."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cifarnet.nn as cnn
from conftest import DEVICES  # noqa: F401  (conftest first: it imports cifarnet)

pytestmark = pytest.mark.usefixtures("one_thread")

P = 0.4


def dropout_models() -> tuple[nn.Sequential, nn.Sequential]:
    """The same model with nn.Dropout and with cifarnet.nn.Dropout, sharing one Linear."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 64).double()
    return nn.Sequential(linear, nn.ReLU(), nn.Dropout(P)), nn.Sequential(linear, nn.ReLU(), cnn.Dropout(P))


def dropout_input() -> torch.Tensor:
    return torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def assert_dropped_as_native_drops(output: torch.Tensor, undropped: torch.Tensor) -> None:
    """``output`` is ``undropped`` with dropout applied: each element 0 or scaled by 1 / (1 - p),
    as native dropout computes it, with a kept fraction within 6 sigma of 1 - p."""
    positive = undropped > 0  # the ReLU's zeros say nothing about the mask
    kept = (output != 0) & positive
    scale = torch.tensor(1 / (1 - P), dtype=undropped.dtype)
    torch.testing.assert_close(output[kept], undropped[kept] * scale, rtol=0, atol=0)
    assert torch.equal(output[~positive], undropped[~positive])
    fraction = kept.sum().item() / positive.sum().item()
    assert abs(fraction - (1 - P)) < 6 * math.sqrt(P * (1 - P) / positive.sum().item()), fraction
    assert kept.sum() < positive.sum()  # some element dropped


def node_kinds(graph_module: torch.fx.GraphModule) -> list[tuple[str, object]]:
    """Each node's op and, for calls of modules, the called module's torch.nn base class."""
    kinds = []
    for node in graph_module.graph.nodes:
        target = node.target
        if node.op == "call_module":
            module = graph_module.get_submodule(node.target)
            target = next(base for base in type(module).__mro__ if base.__module__.startswith("torch.nn"))
        kinds.append((node.op, target))
    return kinds


# --------------------------------------------------------------------------------------------
# torch.fx.symbolic_trace


def test_symbolic_trace_records_dropout_as_a_call_of_the_module_as_for_nn_dropout():
    native, ours = dropout_models()
    native_traced, traced = torch.fx.symbolic_trace(native), torch.fx.symbolic_trace(ours)
    assert node_kinds(traced) == node_kinds(native_traced)
    assert isinstance(traced.get_submodule("2"), cnn.Dropout)  # the layer itself, not a copy of its code


def test_symbolically_traced_dropout_follows_train_and_eval():
    native, ours = dropout_models()
    traced = torch.fx.symbolic_trace(ours)  # traced in training mode
    input = dropout_input()
    undropped = native[:2](input)
    traced.eval()
    assert torch.equal(traced(input), native.eval()(input))
    traced.train()
    assert_dropped_as_native_drops(traced(input), undropped)
    ours.eval()
    traced = torch.fx.symbolic_trace(ours)  # traced in evaluation mode
    traced.train()
    assert_dropped_as_native_drops(traced(input), undropped)


def test_a_dropout_traced_as_the_root_is_traced_into_as_nn_dropout_is():
    # torch.fx traces into its root whatever its class; native's root dropout keeps the mode of
    # the trace too.
    for mode in (True, False):
        native, ours = nn.Dropout(P).train(mode), cnn.Dropout(P).train(mode)
        input = dropout_input().abs() + 1
        traced_native, traced = torch.fx.symbolic_trace(native), torch.fx.symbolic_trace(ours)
        assert [node.op for node in traced.graph.nodes] == [node.op for node in traced_native.graph.nodes]
        traced.train(not mode)
        assert (traced(input) is input) == (traced_native(input) is input) == (not mode)


def batch_norm_models() -> list[tuple[nn.Module, nn.Module, tuple[int, ...]]]:
    """(native, cifarnet) pairs of batch-norm layers holding the same initial tensors, and an
    input shape."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    native_bn = nn.BatchNorm2d(4, momentum=0.3).double()
    layer = cnn.Conv2dBatchNormReLUMaxPool2d.from_modules(
        conv, cnn.BatchNorm2d(4, momentum=0.3).double(), nn.MaxPool2d(2)
    )
    layer.bn.load_state_dict(native_bn.state_dict())
    return [
        (nn.BatchNorm2d(4).double(), cnn.BatchNorm2d(4).double(), (3, 4, 5, 5)),
        (nn.BatchNorm1d(4).double(), cnn.BatchNorm1d(4).double(), (6, 4)),
        # Without torch.distributed, nothing to synchronize: nn.BatchNorm2d's computation.
        (nn.BatchNorm2d(4).double(), cnn.SyncBatchNorm2d(4).double(), (3, 4, 5, 5)),
        (nn.Sequential(conv, native_bn, nn.ReLU(), nn.MaxPool2d(2)), layer, (3, 3, 6, 6)),
    ]


@pytest.mark.parametrize(
    "index", range(4), ids=["BatchNorm2d", "BatchNorm1d", "SyncBatchNorm2d", "Conv2dBatchNormReLUMaxPool2d"]
)
def test_symbolically_traced_batch_norm_layers_follow_train_and_eval(index):
    native, ours, shape = batch_norm_models()[index]
    model, reference = nn.Sequential(nn.Identity(), ours), nn.Sequential(nn.Identity(), native)
    traced = torch.fx.symbolic_trace(model)  # in training mode
    assert any(node.op == "call_module" and traced.get_submodule(node.target) is ours for node in traced.graph.nodes)
    input = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for mode in (True, False, True):
        traced.train(mode)
        reference.train(mode)
        torch.testing.assert_close(traced(input), reference(input), rtol=1e-10, atol=1e-10)
    for (name, theirs), ours_tensor in zip(reference.state_dict().items(), traced.state_dict().values()):
        torch.testing.assert_close(ours_tensor, theirs, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name}: {m}")


def test_fuse_still_treats_cifarnet_layers_as_leaves():
    from cifarnet.fuse.tracing import _trace

    _, ours = dropout_models()
    graph, _, mode, _ = _trace(ours)
    assert mode is None  # a leaf layer: one graph for training and evaluation
    assert [node.op for node in graph.nodes] == ["placeholder", "call_module", "call_module", "call_module", "output"]


# --------------------------------------------------------------------------------------------
# torch.export and torch.compile


def test_torch_export_specializes_on_the_mode_as_for_nn_dropout():
    native, ours = dropout_models()
    input = dropout_input()
    undropped = native[:2](input)
    for model in (native, ours):
        model.eval()
        exported = torch.export.export(model, (input,)).module()
        assert torch.equal(exported(input), undropped)  # nn.Dropout in evaluation: the identity
        model.train()
        exported = torch.export.export(model, (input,)).module()
        first, second = exported(input), exported(input)
        assert_dropped_as_native_drops(first, undropped)
        assert not torch.equal(first, second)  # a mask per call
        with pytest.raises(NotImplementedError):  # torch.export's modules refuse a change of mode, either way
            exported.eval()


def test_torch_compile_follows_train_and_eval_as_for_nn_dropout():
    native, ours = dropout_models()
    input = dropout_input()
    undropped = native[:2](input)  # nn.Dropout in evaluation: the identity
    for model in (native, ours):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        for mode in (True, False, True, False):
            compiled.train(mode)
            output = compiled(input)
            if mode:
                assert_dropped_as_native_drops(output, undropped)
            else:
                assert torch.equal(output, undropped)
