"""The table of tests/test_modules.py: every cifarnet module and functional op with its native
twin (the torch.nn module or composition it replaces, made from the same arguments), the cases
its checks run over, and the bad calls whose errors are compared with native's."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import cifarnet.nn as cnn
from cifarnet import ops
from conftest import DEVICES, native_conv2d_relu_max_pool2d


# --------------------------------------------------------------------------------------------
# The native twins


def native_conv2d_relu_max_pool2d_module(
    in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, pool_size=2, pool_stride=None,
    ceil_mode=False, pool_padding=0,
) -> nn.Sequential:  # fmt: skip
    """``nn.Conv2d -> nn.ReLU -> nn.MaxPool2d``: what ``Conv2dReLUMaxPool2d`` replaces."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias),
        nn.ReLU(),
        nn.MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode),
    )


def native_conv2d_batch_norm_relu_max_pool2d_module(
    in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, pool_size=2, pool_stride=None, ceil_mode=False, pool_padding=0,
) -> nn.Sequential:  # fmt: skip
    """``nn.Conv2d -> nn.BatchNorm2d -> nn.ReLU -> nn.MaxPool2d``: what
    ``Conv2dBatchNormReLUMaxPool2d`` (and, in one process, its synchronized variant) replaces."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias),
        nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode),
    )


def native_conv2d_batch_norm_relu_max_pool2d(
    input, weight, bias, running_mean, running_var, bn_weight, bn_bias, training=False, momentum=0.1, eps=1e-5,
    stride=1, padding=0, pool_size=2, pool_stride=None, ceil_mode=False, pool_padding=0,
):  # fmt: skip
    """The composition of native ops that ``ops.conv2d_batch_norm_relu_max_pool2d`` replaces."""
    conv = F.conv2d(input, weight, bias, stride, padding)
    normalized = F.batch_norm(conv, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.max_pool2d(F.relu(normalized), pool_size, pool_stride, pool_padding, ceil_mode=ceil_mode)


def native_batch_norm_relu_conv2d_module(
    in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True,
) -> nn.Sequential:  # fmt: skip
    """``nn.BatchNorm2d -> nn.ReLU -> nn.Conv2d``: what ``BatchNormReLUConv2d`` replaces."""
    return nn.Sequential(
        nn.BatchNorm2d(in_channels, eps, momentum, affine, track_running_stats),
        nn.ReLU(),
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias),
    )


def native_batch_norm_relu_conv2d(
    input, running_mean, running_var, bn_weight, bn_bias, weight, bias=None, training=False, momentum=0.1, eps=1e-5,
    stride=1, padding=0,
):  # fmt: skip
    """The composition of native ops that ``ops.batch_norm_relu_conv2d`` replaces."""
    normalized = F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return F.conv2d(F.relu(normalized), weight, bias, stride, padding)


def same_key(name: str) -> str:
    return name


def sequential_key(name: str) -> str:
    """A fused layer's state_dict key as its ``nn.Sequential`` twin names it: the conv's
    ``weight`` and ``bias`` are ``0.*``, the batch norm's ``bn.*`` are ``1.*``."""
    return "1." + name.removeprefix("bn.") if name.startswith("bn.") else "0." + name


def bn_relu_conv_sequential_key(name: str) -> str:
    """``BatchNormReLUConv2d``'s state_dict key as its ``nn.Sequential`` twin names it: the
    batch norm's ``bn.*`` are ``0.*``, the conv's ``weight`` and ``bias`` are ``2.*``."""
    return "0." + name.removeprefix("bn.") if name.startswith("bn.") else "2." + name


@dataclass(frozen=True)
class Twin:
    """A cifarnet module class or op and the native one it replaces, which take the same
    arguments; ``native_key`` maps the module's state_dict keys to its twin's."""

    ours: Callable
    native: Callable
    native_key: Callable[[str], str] = same_key


TWINS = {
    "BatchNorm1d": Twin(cnn.BatchNorm1d, nn.BatchNorm1d),
    "BatchNorm2d": Twin(cnn.BatchNorm2d, nn.BatchNorm2d),
    "SyncBatchNorm2d": Twin(cnn.SyncBatchNorm2d, nn.BatchNorm2d),
    "Conv2dReLUMaxPool2d": Twin(cnn.Conv2dReLUMaxPool2d, native_conv2d_relu_max_pool2d_module, sequential_key),
    "Conv2dBatchNormReLUMaxPool2d": Twin(
        cnn.Conv2dBatchNormReLUMaxPool2d, native_conv2d_batch_norm_relu_max_pool2d_module, sequential_key
    ),
    "SyncConv2dBatchNormReLUMaxPool2d": Twin(
        cnn.SyncConv2dBatchNormReLUMaxPool2d, native_conv2d_batch_norm_relu_max_pool2d_module, sequential_key
    ),
    "BatchNormReLUConv2d": Twin(
        cnn.BatchNormReLUConv2d, native_batch_norm_relu_conv2d_module, bn_relu_conv_sequential_key
    ),
    "Dropout": Twin(cnn.Dropout, nn.Dropout),
    "ops.batch_norm": Twin(ops.batch_norm, F.batch_norm),
    "ops.batch_norm_relu_conv2d": Twin(ops.batch_norm_relu_conv2d, native_batch_norm_relu_conv2d),
    "ops.conv2d_relu_max_pool2d": Twin(ops.conv2d_relu_max_pool2d, native_conv2d_relu_max_pool2d),
    "ops.conv2d_batch_norm_relu_max_pool2d": Twin(
        ops.conv2d_batch_norm_relu_max_pool2d, native_conv2d_batch_norm_relu_max_pool2d
    ),
    "ops.dropout": Twin(ops.dropout, F.dropout),
}


class NativeDropoutWithMask(nn.Dropout):
    """``nn.Dropout``'s arithmetic with a given mask: in training ``input * (mask / (1 - p))``
    in the input's dtype, as native dropout scales its Bernoulli draws, then multiplies.

    cifarnet's masks differ from native's for the same seed, so the mask is read off cifarnet's
    output (:func:`dropout_mask`); for everything else native is the oracle.
    """

    def __init__(self, p: float, mask: torch.Tensor) -> None:
        super().__init__(p)
        self.mask = mask

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.dropout(input, self.p, False)
        return input * self.mask.to(input.dtype).div_(1 - self.p)


class OpCall(nn.Module):
    """A functional op as a module, so that every check here applies to it: ``forward`` calls
    ``function(self, input)``, which passes the op this module's tensors (randomly initialised
    parameters of the given shapes, and the given buffers)."""

    def __init__(self, function: Callable, parameters: dict[str, tuple], buffers: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.function = function
        for name, shape in parameters.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape)))
        for name, value in buffers.items():
            self.register_buffer(name, value.clone())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.function(self, input)


# The ops' calls, each with a combination of optional tensors that no module passes.
OP_CALLS = {
    "ops.batch_norm": (
        lambda batch_norm, m, x: batch_norm(x, m.running_mean, m.running_var, m.weight, None, m.training, 0.2, 1e-3),
        {"weight": (3,)},
        {"running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5},
    ),
    "ops.conv2d_relu_max_pool2d": (
        lambda conv, m, x: conv(
            x, m.weight, m.bias, stride=(1, 2), padding=(1, 0), pool_size=(3, 2), pool_stride=2, pool_padding=(1, 1)
        ),
        {"weight": (4, 3, 3, 2), "bias": (4,)},
        {},
    ),
    # NB: a batch-norm weight without its bias, not the reverse: native batch norm's double
    # backward leaves out the second derivative of a bias without a weight (torch 2.14).
    "ops.conv2d_batch_norm_relu_max_pool2d": (
        lambda conv, m, x: conv(
            x, m.weight, None, m.running_mean, m.running_var, m.bn_weight, None, m.training, 0.3, 1e-4, padding=1
        ),
        {"weight": (4, 3, 3, 3), "bn_weight": (4,)},
        {"running_mean": torch.randn(4), "running_var": torch.rand(4) + 0.5},
    ),
    "ops.batch_norm_relu_conv2d": (
        lambda op, m, x: op(
            x, m.running_mean, m.running_var, m.bn_weight, None, m.weight, m.bias, m.training, 0.3, 1e-4, (2, 1), 1
        ),
        {"bn_weight": (3,), "weight": (4, 3, 3, 2), "bias": (4,)},
        {"running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5},
    ),
    "ops.dropout": (lambda dropout, m, x: dropout(x, 0.4, m.training), {}, {}),
}


def op_module(function: Callable, name: str) -> Callable[[], OpCall]:
    call, parameters, buffers = OP_CALLS[name]
    return lambda: OpCall(lambda m, x: call(function, m, x), parameters, buffers)


# --------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class ModuleCase:
    """A cifarnet module (or functional op) with its constructor arguments, an input shape, and
    its native twin built from the same arguments."""

    name: str
    ours: Callable[..., nn.Module]
    native: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    kwargs: dict = field(default_factory=dict)
    native_key: Callable[[str], str] = same_key
    dropout_p: float | None = None  # dropout: the twin takes cifarnet's mask
    functional: bool = False  # an op in an OpCall: not a module of the library to pickle

    @property
    def batched(self) -> bool:
        return not self.name.endswith("unbatched")

    @property
    def small_input_shape(self) -> tuple[int, ...]:
        """The input shape for numerical second derivatives: a batch of at most 2, dimensions
        after the channels' at most 4."""
        if not self.batched:
            return (self.input_shape[0], *(min(size, 4) for size in self.input_shape[1:]))
        return (min(self.input_shape[0], 2), self.input_shape[1], *(min(size, 4) for size in self.input_shape[2:]))

    @property
    def weights_4d(self) -> bool:
        return "conv2d" in self.name.lower()


def module_case(twin: str, input_shape, kwargs, description: str = "", dropout_p=None) -> ModuleCase:
    ours, native, key = TWINS[twin].ours, TWINS[twin].native, TWINS[twin].native_key
    name = f"{twin}-{description}" if description else twin
    return ModuleCase(name, ours, native, input_shape, kwargs, key, dropout_p)


def op_case(twin: str, input_shape, dropout_p=None) -> ModuleCase:
    ours, native = op_module(TWINS[twin].ours, twin), op_module(TWINS[twin].native, twin)
    return ModuleCase(twin, ours, native, input_shape, dropout_p=dropout_p, functional=True)


CONV = dict(in_channels=3, out_channels=4, kernel_size=3, padding=1)
STRIDED = dict(
    in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), bias=False,
    pool_size=(2, 3), pool_stride=(1, 2), ceil_mode=True,
)  # fmt: skip
# A ResNet stem's pool: 3x3, stride 2, padding 1.
PADDED_POOL = dict(CONV, stride=2, pool_size=3, pool_stride=2, pool_padding=1)
CASES = [
    module_case("BatchNorm1d", (3, 4), dict(num_features=4), "2d_input"),
    module_case("BatchNorm1d", (2, 3, 5), dict(num_features=3), "3d_input"),
    module_case("BatchNorm2d", (2, 3, 6, 6), dict(num_features=3)),
    module_case("BatchNorm2d", (2, 3, 6, 6), dict(num_features=3, eps=1e-3, momentum=None), "cumulative_average"),
    module_case("BatchNorm2d", (2, 3, 6, 6), dict(num_features=3, affine=False), "not_affine"),
    module_case("BatchNorm2d", (2, 3, 6, 6), dict(num_features=3, track_running_stats=False), "no_running_stats"),
    module_case("SyncBatchNorm2d", (2, 3, 6, 6), dict(num_features=3)),
    module_case("Conv2dReLUMaxPool2d", (2, 3, 6, 6), CONV),
    module_case("Conv2dReLUMaxPool2d", (2, 3, 7, 6), STRIDED, "strided_no_bias_ceil_mode"),
    module_case("Conv2dReLUMaxPool2d", (3, 6, 6), CONV, "unbatched"),
    module_case("Conv2dReLUMaxPool2d", (2, 3, 9, 8), PADDED_POOL, "padded_pool"),
    module_case("Conv2dBatchNormReLUMaxPool2d", (2, 3, 6, 6), CONV),
    module_case(
        "Conv2dBatchNormReLUMaxPool2d", (3, 3, 5, 6), dict(CONV, bias=False, momentum=None, eps=1e-3, ceil_mode=True),
        "cumulative_average_ceil_mode",
    ),  # fmt: skip
    module_case(
        "Conv2dBatchNormReLUMaxPool2d", (2, 3, 6, 6), dict(CONV, affine=False, track_running_stats=False),
        "not_affine_no_running_stats",
    ),  # fmt: skip
    module_case(
        "Conv2dBatchNormReLUMaxPool2d", (2, 3, 9, 8), dict(PADDED_POOL, bias=False, ceil_mode=True), "padded_pool_ceil_mode"
    ),
    module_case("SyncConv2dBatchNormReLUMaxPool2d", (2, 3, 6, 6), CONV),
    module_case("BatchNormReLUConv2d", (2, 3, 6, 6), CONV),
    module_case(
        "BatchNormReLUConv2d", (3, 3, 7, 6),
        dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), bias=False, momentum=None, eps=1e-3),
        "strided_no_bias_cumulative_average",
    ),  # fmt: skip
    module_case(
        "BatchNormReLUConv2d", (2, 3, 6, 6), dict(CONV, affine=False, track_running_stats=False),
        "not_affine_no_running_stats",
    ),  # fmt: skip
    module_case("Dropout", (2, 3, 4, 5), dict(p=0.3), dropout_p=0.3),
    op_case("ops.batch_norm", (2, 3, 4, 5)),
    op_case("ops.batch_norm_relu_conv2d", (2, 3, 6, 6)),
    op_case("ops.conv2d_relu_max_pool2d", (2, 3, 6, 7)),
    op_case("ops.conv2d_batch_norm_relu_max_pool2d", (2, 3, 6, 6)),
    op_case("ops.dropout", (3, 4, 5), dropout_p=0.4),
]


# --------------------------------------------------------------------------------------------
# Argument errors


@dataclass(frozen=True)
class BadCall:
    """A call made on cifarnet's module or op and on its native twin (``TWINS[twin]``): a module
    class is constructed with ``kwargs``, set to ``training`` and called on ``input()``; an op is
    called as ``op(input(), **kwargs)``."""

    name: str
    twin: str
    kwargs: dict
    input: Callable[[], torch.Tensor]
    training: bool = True


def randn(*shape, dtype=torch.float32, device="cpu") -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(shape, dtype=dtype, device=device)


def ones_int64(*shape) -> Callable[[], torch.Tensor]:
    return lambda: torch.ones(shape, dtype=torch.int64)


def in_both_modes(name: str, twin: str, kwargs: dict, input) -> list[BadCall]:
    return [BadCall(f"{name}-{mode}", twin, kwargs, input, mode == "train") for mode in ("train", "eval")]


def batch_norm_bad_calls(twin: str, input_shape, one_value_per_channel, wrong_rank, wrong_channels) -> list[BadCall]:
    three = dict(num_features=3)
    calls = [BadCall(f"{twin}(num_features=-1)", twin, dict(num_features=-1), randn(*input_shape))]
    for name, kwargs, input in [
        (f"{twin}(eps=0)", dict(three, eps=0.0), randn(*input_shape)),
        (f"{twin}(eps=-1)", dict(three, eps=-1.0), randn(*input_shape)),
        (f"{twin}-one_value_per_channel", three, randn(*one_value_per_channel)),
        (f"{twin}-wrong_rank_input", three, randn(*wrong_rank)),
        (f"{twin}-wrong_channels", three, randn(*wrong_channels)),
        (f"{twin}-float64_input_float32_module", three, randn(*input_shape, dtype=torch.float64)),
        (f"{twin}-int64_input", three, ones_int64(*input_shape)),
    ]:
        calls += in_both_modes(name, twin, kwargs, input)
    return calls


CONV_ARGUMENT_ERRORS = {
    "kernel_size=0": dict(kernel_size=0),
    "kernel_size=-1": dict(kernel_size=-1),
    "kernel_size=2.5": dict(kernel_size=2.5),
    "kernel_size=(3,3,3)": dict(kernel_size=(3, 3, 3)),
    "kernel_size=7_larger_than_input": dict(kernel_size=7, padding=0),
    "stride=0": dict(stride=0),
    "stride=-1": dict(stride=-1),
    "padding=-1": dict(padding=-1),
    "padding=same": dict(padding="same"),
    "padding=valid": dict(padding="valid"),
    "pool_size=0": dict(pool_size=0),
    "pool_size=-1": dict(pool_size=-1),
    "pool_size=7_larger_than_conv_output": dict(pool_size=7),
    "pool_stride=0": dict(pool_stride=0),
    "pool_stride=-1": dict(pool_stride=-1),
    "pool_padding=2_over_half_the_window": dict(pool_padding=2),
    "pool_padding=(0,-1)": dict(pool_size=3, pool_padding=(0, -1)),
    "pool_padding=(1,1,1)": dict(pool_size=3, pool_padding=(1, 1, 1)),
    "out_channels=-1": dict(out_channels=-1),
}
CONV_INPUT_ERRORS = {
    "2-D_input": randn(3, 6),
    "5-D_input": randn(1, 2, 3, 6, 6),
    "wrong_channels": randn(2, 4, 6, 6),
    "float64_input_float32_module": randn(2, 3, 6, 6, dtype=torch.float64),
    "int64_input": ones_int64(2, 3, 6, 6),
}


def conv_bad_calls(twin: str) -> list[BadCall]:
    x = randn(2, 3, 6, 6)
    calls = [BadCall(f"{twin}({name})", twin, dict(CONV, **kwargs), x) for name, kwargs in CONV_ARGUMENT_ERRORS.items()]
    calls += [BadCall(f"{twin}-{name}", twin, CONV, input) for name, input in CONV_INPUT_ERRORS.items()]
    if "BatchNorm" in twin:
        calls += in_both_modes(f"{twin}(eps=0)", twin, dict(CONV, eps=0.0), x)
        calls += in_both_modes(f"{twin}(eps=-1)", twin, dict(CONV, eps=-1.0), x)
        calls += in_both_modes(f"{twin}-unbatched_input", twin, CONV, randn(3, 6, 6))
        # A 1x1 convolution output: one value per channel for the batch norm.
        one_position = dict(CONV, padding=0, pool_size=1)
        calls += in_both_modes(f"{twin}-one_value_per_channel", twin, one_position, randn(1, 3, 3, 3))
    return calls


def op_bad_calls() -> list[BadCall]:
    """The functional ops, called as their torch.nn.functional twins are."""
    x, x_float64 = randn(2, 3, 6, 6), randn(2, 3, 6, 6, dtype=torch.float64)
    stats = lambda channels: dict(running_mean=torch.zeros(channels), running_var=torch.ones(channels))  # noqa: E731
    conv = dict(weight=torch.randn(4, 3, 3, 3), bias=torch.randn(4))
    no_stats = dict(running_mean=None, running_var=None, training=False)
    calls = [BadCall("ops.batch_norm-no_running_stats-eval", "ops.batch_norm", no_stats, x)]
    for mode in ("train", "eval"):
        bn = dict(stats(3), training=mode == "train")
        calls += [
            BadCall(f"ops.batch_norm(eps=0)-{mode}", "ops.batch_norm", dict(bn, eps=0.0), x),
            BadCall(f"ops.batch_norm(eps=-1)-{mode}", "ops.batch_norm", dict(bn, eps=-1.0), x),
            BadCall(f"ops.batch_norm-1-D_input-{mode}", "ops.batch_norm", bn, randn(3)),
            BadCall(f"ops.batch_norm-one_value_per_channel-{mode}", "ops.batch_norm", bn, randn(1, 3)),
            BadCall(f"ops.batch_norm-wrong_size_running_mean-{mode}", "ops.batch_norm", dict(bn, **stats(4)), x),
            BadCall(f"ops.batch_norm-wrong_size_weight-{mode}", "ops.batch_norm", dict(bn, weight=torch.ones(4)), x),
            BadCall(f"ops.batch_norm-float64_input-{mode}", "ops.batch_norm", bn, x_float64),
        ]
        conv_bn = dict(conv, **stats(4), bn_weight=None, bn_bias=None, training=mode == "train")
        twin = "ops.conv2d_batch_norm_relu_max_pool2d"
        calls += [
            BadCall(f"{twin}(eps=0)-{mode}", twin, dict(conv_bn, eps=0.0), x),
            BadCall(f"{twin}(eps=-1)-{mode}", twin, dict(conv_bn, eps=-1.0), x),
            BadCall(f"{twin}-wrong_size_running_var-{mode}", twin, dict(conv_bn, running_var=torch.ones(3)), x),
        ]
    for name, kwargs in {
        "stride=0": dict(stride=0),
        "padding=-1": dict(padding=-1),
        "pool_size=0": dict(pool_size=0),
        "pool_stride=0": dict(pool_stride=0),
        "pool_padding=(1,2)_over_half_the_window": dict(pool_size=3, pool_padding=(1, 2)),
        "pool_padding=-1": dict(pool_size=3, pool_padding=-1),
        "wrong_in_channels_weight": dict(weight=torch.randn(4, 4, 3, 3)),
        "wrong_size_bias": dict(bias=torch.randn(5)),
        "float64_weight": dict(weight=conv["weight"].double(), bias=conv["bias"].double()),
        "3-D_weight": dict(weight=torch.randn(4, 3, 3)),
    }.items():
        twin = "ops.conv2d_relu_max_pool2d"
        calls.append(BadCall(f"{twin}({name})", twin, dict(conv, **kwargs), x))
        twin = "ops.conv2d_batch_norm_relu_max_pool2d"
        conv_bn = dict(conv, **stats(4), bn_weight=None, bn_bias=None, training=True)
        calls.append(BadCall(f"{twin}({name})", twin, dict(conv_bn, **kwargs), x))
    calls += [BadCall(f"ops.dropout(p={p})", "ops.dropout", dict(p=p), x) for p in (-0.1, 1.1, math.nan)]
    calls.append(BadCall("ops.dropout-int64_input", "ops.dropout", dict(p=0.5), ones_int64(3, 4)))
    return calls


def bad_calls() -> list[BadCall]:
    calls = [
        *batch_norm_bad_calls("BatchNorm1d", (3, 3), (1, 3), (2, 3, 4, 4), (3, 4)),
        *batch_norm_bad_calls("BatchNorm2d", (2, 3, 6, 6), (1, 3, 1, 1), (3, 6, 6), (2, 4, 6, 6)),
        *batch_norm_bad_calls("SyncBatchNorm2d", (2, 3, 6, 6), (1, 3, 1, 1), (3, 6, 6), (2, 4, 6, 6)),
        *conv_bad_calls("Conv2dReLUMaxPool2d"),
        *conv_bad_calls("Conv2dBatchNormReLUMaxPool2d"),
        *conv_bad_calls("SyncConv2dBatchNormReLUMaxPool2d"),
        *[BadCall(f"Dropout(p={p})", "Dropout", dict(p=p), randn(2, 3, 6, 6)) for p in (-0.1, 1.1, math.nan, math.inf)],
        *in_both_modes("Dropout-int64_input", "Dropout", dict(p=0.5), ones_int64(3, 4)),
        *op_bad_calls(),
    ]
    for device in DEVICES[1:]:  # a device mismatch needs a second device
        calls += [
            BadCall(f"{twin}-input_on_{device}", twin, kwargs, randn(2, 3, 6, 6, device=device))
            for twin, kwargs in [
                ("BatchNorm2d", dict(num_features=3)),
                ("Conv2dReLUMaxPool2d", CONV),
                ("Conv2dBatchNormReLUMaxPool2d", CONV),
            ]
        ]
    return calls
