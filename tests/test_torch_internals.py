"""The private torch behaviour cifarnet relies on, one test per helper that wraps it.

Each helper (cifarnet/fuse/_torch_internals.py, and
cifarnet/ops/_layout.py's suggest_memory_format) says why no public API does the same. A
torch release that changes one of them fails here, with a message naming it, rather than as a
wrong answer or an obscure error deep inside fuse or torch.compile.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.fx
from torch import nn

from cifarnet.fuse._torch_internals import (
    _graph_module_class,
    _has_hooks,
    _keep_through_copies,
    _rename_graph_module,
    _set_module_state,
    _tensor_version,
    _with_hooks_of,
)
from cifarnet.ops import _layout, batch_norm, conv2d_relu_max_pool2d

TORCH = f"torch {torch.__version__}"


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, input):
        return self.bn(self.conv(input)).relu()


def test_tensor_version_counts_in_place_writes():
    tensor = torch.zeros(3)
    before = _tensor_version(tensor)
    tensor.clone().add_(1), tensor + 1  # neither writes tensor
    assert _tensor_version(tensor) == before, f"{TORCH} changed Tensor._version: it moves without an in-place write"
    tensor.add_(0)  # a write that leaves the values as they were
    assert _tensor_version(tensor) > before, (
        f"{TORCH} changed Tensor._version: cifarnet.fuse needs it to count in-place writes, to find a "
        "forward that changes a buffer outside the traced graph"
    )


def test_a_module_is_its_instance_dict():
    """_set_module_state: an nn.Module's whole state (parameters, buffers, children,
    hooks, mode) is its instance __dict__, under the names fuse reads."""
    needed = {"training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"}
    missing = needed - set(vars(nn.Module()))
    assert not missing, f"{TORCH} changed nn.Module's state: cifarnet.fuse needs nn.Module.__init__ to set {sorted(missing)}"
    model = TwoLayers()
    calls = []
    model.conv.register_forward_hook(lambda *args: calls.append("conv"))
    assert list(model.conv._forward_hooks.values()), f"{TORCH} changed nn.Module._forward_hooks: cifarnet.fuse reads hooks there"
    adopted = object.__new__(TwoLayers)
    _set_module_state(adopted, vars(model))
    input = torch.randn(2, 2, 5, 5)
    assert adopted.conv is model.conv and adopted.bn.running_mean is model.bn.running_mean, (
        f"{TORCH} changed nn.Module: a module made of another's __dict__ no longer holds the same children and buffers, "
        "which cifarnet.fuse needs to adopt a traced module's state"
    )
    assert list(adopted.state_dict()) == list(model.state_dict()) and torch.equal(adopted(input), model(input))
    assert calls == ["conv", "conv"], f"{TORCH} changed nn.Module: hooks did not come with the adopted __dict__"
    reference = nn.BatchNorm2d(3)
    holder = nn.Identity()
    _set_module_state(holder, {"reference": reference})
    assert holder.reference is reference and not list(holder.children()) and not holder.state_dict(), (
        f"{TORCH} changed nn.Module's attribute lookup: cifarnet.fuse needs a module in the instance __dict__ to be "
        "readable as an attribute without being a child (a fused layer's reference to its batch norm)"
    )


def test_graph_modules_have_a_class_each_holding_the_generated_forward():
    first = torch.fx.symbolic_trace(TwoLayers())
    second = torch.fx.symbolic_trace(TwoLayers())
    cls = _graph_module_class(first)
    assert cls is not torch.fx.GraphModule and issubclass(cls, torch.fx.GraphModule) and cls is not type(second), (
        f"{TORCH} changed torch.fx.GraphModule.__new__: cifarnet.fuse needs a class per GraphModule instance, "
        "which it renames and whose forward it wraps"
    )
    first.recompile()
    assert "forward" in vars(cls), (
        f"{TORCH} changed torch.fx.GraphModule.recompile: cifarnet.fuse needs it to put forward on the instance's class"
    )
    _rename_graph_module("Renamed", first)
    assert type(first).__name__ == "Renamed" and type(second).__name__ == "TwoLayers", (
        f"{TORCH} changed torch.fx.GraphModule: renaming one instance's class renamed another's"
    )
    assert torch.fx.GraphModule.__name__ == "GraphModule"


def test_graph_module_copies_keep_the_name_and_attributes_they_are_told_to():
    """_keep_through_copies: torch.fx's meta key of attributes deepcopy restores, its
    deepcopy hooks, and the class name unpickling reads."""
    graph_module = torch.fx.symbolic_trace(TwoLayers())
    assert hasattr(torch.fx.graph_module, "_USER_PRESERVED_ATTRIBUTES_KEY"), (
        f"{TORCH} removed torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY: cifarnet.fuse needs a way to make "
        "deepcopy keep a fused GraphModule's plain attributes"
    )
    assert hasattr(graph_module, "_register_deepcopy_hook"), (
        f"{TORCH} removed GraphModule._register_deepcopy_hook: cifarnet.fuse needs it to keep the class name in deepcopies"
    )
    graph_module.note = "kept"
    _rename_graph_module("TwoLayers", graph_module)
    _keep_through_copies(graph_module, "TwoLayers", {"note": "kept"})
    copied = copy.deepcopy(graph_module)
    assert getattr(copied, "note", None) == "kept", (
        f"{TORCH} changed GraphModule.__deepcopy__: it no longer restores the attributes under "
        "meta[_USER_PRESERVED_ATTRIBUTES_KEY], which cifarnet.fuse relies on"
    )
    assert type(copied).__name__ == "TwoLayers", (
        f"{TORCH} changed GraphModule.__deepcopy__: it no longer runs the hooks of _register_deepcopy_hook, "
        "which cifarnet.fuse relies on to keep the class name"
    )
    loaded = pickle.loads(pickle.dumps(graph_module))
    assert type(loaded).__name__ == "TwoLayers", (
        f"{TORCH} changed GraphModule pickling: it no longer names the class by '_graphmodule_cls_name' in the "
        "module's __dict__, which cifarnet.fuse relies on"
    )
    assert loaded.note == "kept"


def strided_cases():
    """4-D tensors of every kind of layout, dense or not, ambiguous ones included."""
    generator = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 4, 6), (2, 1, 4, 6), (2, 3, 1, 1), (1, 3, 4, 4), (2, 4, 1, 6)]:
        base = torch.randn(shape, generator=generator)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            dense = base.contiguous(memory_format=memory_format)
            yield dense
            yield dense[..., ::2]  # not dense
            yield dense[:, :, :, 1:]
            yield dense.transpose(2, 3)


@pytest.mark.parametrize(
    "register",
    [
        lambda module: module.register_forward_hook(lambda m, args, output: None),
        lambda module: module.register_forward_hook(lambda m, args, kwargs, output: None, with_kwargs=True),
        lambda module: module.register_forward_pre_hook(lambda m, args: None),
        lambda module: module.register_full_backward_hook(lambda m, grad_input, grad_output: None),
        lambda module: module.register_full_backward_pre_hook(lambda m, grad_output: None),
    ],
    ids=["forward", "forward with kwargs", "forward pre", "full backward", "full backward pre"],
)
def test_has_hooks_sees_every_call_hook_and_with_hooks_of_shares_them(register):
    conv = nn.Conv2d(2, 3, 3)
    assert not _has_hooks(conv), TORCH
    handle = register(conv)
    assert _has_hooks(conv), TORCH
    other = _with_hooks_of(conv, nn.Conv2d(2, 3, 3))
    assert _has_hooks(other), TORCH
    handle.remove()  # the user's handle removes it from both: the same dictionaries
    assert not _has_hooks(conv) and not _has_hooks(other), TORCH


def test_suggest_memory_format_agrees_with_the_cpp_rule():
    """_layout.suggest_memory_format (torch._prims_common's) against c10's
    TensorBase::suggest_memory_format, as the C++ kernels apply it: the CPU conv2d -> ReLU ->
    max_pool2d lays its output out channels_last exactly where c10 suggests channels_last for
    its input (its 1x1 weight suggests contiguous). Empty inputs, which native conv2d refuses,
    are left out."""
    assert hasattr(torch._prims_common, "suggest_memory_format"), (
        f"{TORCH} removed torch._prims_common.suggest_memory_format: cifarnet's fake kernels need a Python "
        "copy of c10's suggest_memory_format"
    )
    for input in strided_cases():
        if input.numel() == 0:
            continue
        ours = _layout.suggest_memory_format(input)
        channels = input.shape[1]
        weight = torch.eye(channels).reshape(channels, channels, 1, 1)
        output = conv2d_relu_max_pool2d(input, weight, pool_size=1)
        expected = torch.empty(input.shape, memory_format=ours).stride()
        assert output.stride() == expected, (
            f"{TORCH} changed torch._prims_common.suggest_memory_format: it says {ours} for a tensor of shape "
            f"{tuple(input.shape)} and strides {input.stride()}, where the C++ kernel (c10's rule) gives strides "
            f"{output.stride()}; cifarnet's fake kernels need c10's rule"
        )
    assert _layout.suggest_memory_format(torch.randn(2, 3)) == torch.contiguous_format


def test_peak_cpu_allocation_sees_the_largest_live_set():
    from conftest import peak_cpu_allocation

    def allocate():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(500_000)  # +2 MB live: the peak
        del a, b
        torch.ones(250_000)

    peak = peak_cpu_allocation(allocate)
    assert 6_000_000 <= peak < 6_100_000, f"{TORCH}: the profiler's allocation events gave a peak of {peak} bytes"


def test_recorded_op_calls_sees_the_ops_below_autograd():
    from conftest import recorded_op_calls

    input = torch.randn(4, 3, requires_grad=True)
    with recorded_op_calls() as recorder:
        batch_norm(input, None, None, training=True).sum().backward()
    assert "cifarnet._batch_norm_forward.default" in recorder.calls, f"{TORCH}: {recorder.calls}"
    assert "cifarnet._batch_norm_backward.default" in recorder.calls, f"{TORCH}: {recorder.calls}"
