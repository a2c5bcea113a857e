"""The torch-only counterpart of a fused conv layer (its ``to_native()``)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn


def _native_chain(layer: nn.Module, bn: nn.BatchNorm2d | None) -> nn.Module:
    """The GraphModule of ``layer.to_native()`` (``layer`` a :class:`Conv2dReLUMaxPool2d` or
    :class:`Conv2dBatchNormReLUMaxPool2d`): conv -> [bn ->] ReLU -> max pool in torch calls.

    NB: a GraphModule rather than an ``nn.Sequential`` of torch layers, whose keys
    (``0.weight``) would differ from the layer's (``weight``): the convolution's parameters
    stay attributes of the module itself, read by ``F.conv2d``.
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
    output = graph.call_function(F.relu, (output,))
    output = graph.call_function(
        F.max_pool2d, (output, layer.pool_size, layer.pool_stride), {"ceil_mode": layer.ceil_mode}
    )
    graph.output(output)
    native = torch.fx.GraphModule(root, graph)
    native.training = layer.training  # not .train(): bn keeps its own mode, as in the layer
    return native
