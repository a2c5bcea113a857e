"""The torch-only counterparts of a fused conv layer: its ``to_native()`` (a GraphModule with the
layer's state_dict keys) and its ``to_sequential()`` (an ``nn.Sequential`` of torch.nn layers)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def _relu_and_pool(layer: nn.Module) -> tuple[nn.ReLU, nn.MaxPool2d]:
    pool = nn.MaxPool2d(layer.pool_size, layer.pool_stride, layer.pool_padding, ceil_mode=layer.ceil_mode)
    return nn.ReLU().train(layer.training), pool.train(layer.training)


def _native_chain(layer: nn.Module, bn: nn.BatchNorm2d | None) -> torch.fx.GraphModule:
    """The GraphModule of ``layer.to_native()`` (``layer`` a :class:`Conv2dReLUMaxPool2d` or
    :class:`Conv2dBatchNormReLUMaxPool2d`, ``bn`` the torch batch norm over its batch norm's
    tensors): ``F.conv2d`` on the layer's own ``weight`` and ``bias``, then the children
    ``bn``, ``relu`` (``nn.ReLU``) and ``pool`` (``nn.MaxPool2d``).

    NB: the convolution is a call, not an ``nn.Conv2d`` child: its parameters must stay the
    module's own ``weight`` and ``bias`` (the layer's state_dict keys), where a child would
    name them ``conv.weight``; an ``nn.Sequential`` would name them ``0.weight``. Only torch
    classes, so it runs, pickles and loads without cifarnet.
    """
    root = nn.Module()
    root.weight = layer.weight
    root.bias = layer.bias
    graph = torch.fx.Graph()
    output = graph.placeholder("input")
    weight = graph.get_attr("weight")  # first: GraphModule registers in this order, the state_dict's
    bias = None if layer.bias is None else graph.get_attr("bias")
    output = graph.call_function(F.conv2d, (output, weight, bias, layer.stride, layer.padding))
    if bn is not None:
        root.bn = bn
        output = graph.call_module("bn", (output,))
    root.relu, root.pool = _relu_and_pool(layer)
    output = graph.call_module("pool", (graph.call_module("relu", (output,)),))
    graph.output(output)
    native = torch.fx.GraphModule(root, graph)
    if layer.bias is None:
        native.register_parameter("bias", None)  # as nn.Conv2d(bias=False) has it
    native.training = layer.training  # not .train(): bn keeps its own mode, as in the layer
    return native


def _native_sequential(layer: nn.Module, bn: nn.BatchNorm2d | None) -> nn.Sequential:
    """``layer.to_sequential()``: ``nn.Sequential(nn.Conv2d, [bn,] nn.ReLU, nn.MaxPool2d)``
    holding the layer's own ``weight`` and ``bias`` ``Parameter`` objects (and ``bn``), in the
    layer's mode (``bn`` keeps its own)."""
    # Built on the meta device: its own initial tensors are thrown away at once.
    conv = nn.Conv2d(
        layer.in_channels,
        layer.out_channels,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        bias=layer.bias is not None,
        device="meta",
    )
    conv.weight = layer.weight
    if layer.bias is not None:
        conv.bias = layer.bias
    relu, pool = _relu_and_pool(layer)
    modules = [conv.train(layer.training), *([] if bn is None else [bn]), relu, pool]
    sequential = nn.Sequential(*modules)
    sequential.training = layer.training  # not .train(): bn keeps its own mode, as in the layer
    return sequential
