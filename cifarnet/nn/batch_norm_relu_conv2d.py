"""``BatchNormReLUConv2d``: ``nn.BatchNorm2d -> nn.ReLU -> nn.Conv2d`` (a ResNet bottleneck's
pre-convolution) as one layer, and the rule for which such chains it can replace."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from cifarnet import ops
from cifarnet.nn._fx import leaf_call
from cifarnet.nn.batch_norm import BatchNorm2d, batch_norm_arguments, batch_norm_sync_group, native_batch_norm2d
from cifarnet.nn.conv2d_relu_max_pool2d import conv_unfusable_reason, reset_conv_parameters


def bn_relu_conv_unfusable_reason(bn: nn.Module, conv: nn.Module) -> str | None:
    """Why ``(bn, ReLU, conv)`` cannot become a ``BatchNormReLUConv2d``, or None if it can."""
    if hasattr(bn, "process_group"):  # nn.SyncBatchNorm, SyncBatchNorm2d, fuse's stand-in for either
        return f"{type(bn).__name__} synchronizes its statistics over processes, which this op does not"
    if not isinstance(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} is not an nn.BatchNorm2d"
    reason = conv_unfusable_reason(conv)
    if reason is not None:
        return reason
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        return f"padding='same' with the even kernel {tuple(conv.kernel_size)} pads asymmetrically"
    if bn.num_features != conv.in_channels:
        return f"bn.num_features={bn.num_features} does not match conv.in_channels={conv.in_channels}"
    return None


@torch.fx.wrap  # a call in torch.fx graphs, not a branch on a traced value
def _check_batch_norm2d_input(input: Tensor) -> None:
    """``nn.BatchNorm2d``'s rank check, with its ``ValueError``."""
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormReLUConv2d(nn.Module):
    """``nn.BatchNorm2d`` -> ``nn.ReLU`` -> ``nn.Conv2d`` as one layer
    (:func:`cifarnet.ops.batch_norm_relu_conv2d`): in training its backward keeps the batch
    norm's input, not the rectified tensor, which it recomputes.

    The batch norm's parameters and buffers live in the child ``bn`` (a :class:`BatchNorm2d`
    over ``in_channels``); the convolution's are this module's ``weight`` and ``bias``
    (initialised as ``nn.Conv2d``'s), so the state_dict keys of an ``(nn.BatchNorm2d,
    nn.Conv2d)`` pair map as ``bn.* -> bn.*`` and ``conv.* -> *``. Training uses batch
    statistics and updates the running ones; evaluation normalises with the running ones, as
    torch.nn does. Where :func:`cifarnet.nn.convert_sync_batchnorm` has made ``bn`` a
    :class:`SyncBatchNorm2d`, training with more than one process runs ``bn``, ReLU and the
    convolution unfused (the op has no synchronized statistics).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as in ``nn.Conv2d``
            (no dilation or groups; ``padding='same'`` with odd kernels only).
        eps, momentum, affine, track_running_stats: as in ``nn.BatchNorm2d`` (of
            ``in_channels`` features).

    Shape:
        input ``[N, C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``; an unbatched input
        raises ``ValueError``, as ``nn.BatchNorm2d`` does. float32, float64, bfloat16 or
        float16.

    Under ``torch.fx.symbolic_trace`` it is a leaf, as ``nn.BatchNorm2d`` is: the traced model
    calls it and follows ``.train()`` / ``.eval()``.
    """

    # Whether torch.fx records a call of this layer (leaf_call) rather than tracing into it.
    _traced_as_leaf = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        bias: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        bn = BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats, device, dtype)
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias, device=device, dtype=dtype)
        reason = bn_relu_conv_unfusable_reason(bn, conv)
        if reason is not None:
            raise ValueError(reason)
        self._adopt(bn, conv)

    def reset_parameters(self) -> None:
        """The convolution's, as ``nn.Conv2d`` initialises them (``bn`` resets its own)."""
        reset_conv_parameters(self.weight, self.bias)

    def _adopt(self, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> None:
        self._set_batch_norm(bn)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding = conv.padding  # 'valid' and 'same' too, as the functional op takes them
        self.weight = conv.weight
        if conv.bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = conv.bias

    def _set_batch_norm(self, bn: nn.BatchNorm2d) -> None:
        self.bn = bn

    @classmethod
    def from_modules(cls, bn: nn.BatchNorm2d, conv: nn.Conv2d) -> BatchNormReLUConv2d:
        """The fused layer of an existing ``(bn, conv)`` pair (a ReLU between them implied).

        Uses ``bn`` itself as the child ``bn`` (its parameters, running statistics and
        ``num_batches_tracked`` keep counting) and shares ``conv``'s parameters (the same
        ``Parameter`` objects, so optimisers keep working), in ``conv``'s train/eval mode
        (``bn`` keeps its own). Raises ``ValueError`` when the pair cannot be fused.
        """
        reason = bn_relu_conv_unfusable_reason(bn, conv)
        if reason is not None:
            raise ValueError(f"cannot fuse {bn} and {conv}: {reason}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused._adopt(bn, conv)
        fused.training = conv.training  # not .train(): bn keeps its own mode
        return fused

    def forward(self, input: Tensor) -> Tensor:
        call = leaf_call(self, input) if self._traced_as_leaf else None
        if call is not None:
            return call
        _check_batch_norm2d_input(input)
        bn = self.bn
        if batch_norm_sync_group(bn) is not None:
            # NB: the op has no synchronized statistics (convert_sync_batchnorm made ``bn`` a
            # SyncBatchNorm2d): the batch norm module computes them, unfused, keeping the
            # rectified tensor as native does.
            return F.conv2d(F.relu(bn(input)), self.weight, self.bias, self.stride, self.padding)
        return ops.batch_norm_relu_conv2d(
            input, bn_weight=bn.weight, bn_bias=bn.bias, weight=self.weight, bias=self.bias, stride=self.stride,
            padding=self.padding, **batch_norm_arguments(bn),
        )  # fmt: skip

    def to_native(self) -> torch.fx.GraphModule:
        """This layer computed by torch alone, with the same state_dict keys.

        A ``torch.fx.GraphModule`` whose forward is ``F.conv2d(self.relu(self.bn(input)),
        self.weight, self.bias, stride, padding)``: ``bn`` an ``nn.BatchNorm2d`` (``nn.SyncBatchNorm``
        over the same group where it synchronizes) over this layer's batch norm's very tensors
        (its mode too), ``relu`` an ``nn.ReLU``, and this
        layer's own ``weight`` and ``bias`` ``Parameter`` objects, so checkpoints load both
        ways and it needs nothing of cifarnet to run, pickle or export.
        """
        root = nn.Module()
        root.weight, root.bias = self.weight, self.bias
        root.bn = native_batch_norm2d(self.bn)
        root.relu = nn.ReLU().train(self.training)
        graph = torch.fx.Graph()
        input = graph.placeholder("input")
        weight = graph.get_attr("weight")  # first: GraphModule registers in this order, the state_dict's
        bias = None if self.bias is None else graph.get_attr("bias")
        rectified = graph.call_module("relu", (graph.call_module("bn", (input,)),))
        graph.output(graph.call_function(F.conv2d, (rectified, weight, bias, self.stride, self.padding)))
        native = torch.fx.GraphModule(root, graph)
        if self.bias is None:
            native.register_parameter("bias", None)  # as nn.Conv2d(bias=False) has it
        native.training = self.training  # not .train(): bn keeps its own mode, as in the layer
        return native

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, bias={self.bias is not None}"
        )
