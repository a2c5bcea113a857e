"""Output and gradient layouts against native torch's: batch norm, dropout and the fused conv
ops on contiguous, channels-last, non-standard channels-last, permuted, sliced and unbatched
inputs, each run twice: by the kernels, and by the fake kernels (under ``FakeTensorMode``),
which must give the kernels' strides (exactly, but for dropout's size-1 dimensions).

Native's layouts, which these tests pin (CPU):

- batch norm: the output takes the memory format the input is dense in (contiguous, else
  channels_last / channels_last_3d), else its suggested one; the input gradient takes the
  input's dense format where the output gradient is dense too and both suggest the same
  format, else the input's suggested format;
- dropout: output and input gradient as ``empty_like`` of the input and of the output gradient;
- conv2d -> [batch norm ->] ReLU -> max_pool2d: output, input gradient and weight gradient in
  the convolution's format (channels_last if the input or the weight suggests it), but a
  contiguous output for an unbatched input (native max_pool2d of a 3-D tensor) and where the
  convolution output is 1x1 (native's ReLU and batch norm read no order from it).

The CUDA kernels of batch norm and dropout follow the CPU's rules, so CUDA results are compared
with native's on the CPU: native CUDA batch norm's layout depends on its backend (cuDNN's is the
suggested format, its own kernel's empty_like's), and native CUDA dropout's gradient takes the
output gradient's suggested format.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import cifarnet
from cifarnet import ops
from conftest import DEVICES, native_conv2d_relu_max_pool2d

pytestmark = pytest.mark.usefixtures("one_thread")


def strided(shape, order, step=1, device="cpu", seed=0):
    """A tensor of ``shape`` whose dimensions lie in memory in ``order`` (outermost first),
    taking every ``step``-th element of the innermost one (``step`` > 1: not dense)."""
    stored = [shape[d] for d in order]
    stored[-1] *= step
    base = torch.randn(stored, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inverse = [order.index(d) for d in range(len(shape))]
    return base[..., ::step].permute(inverse).to(device)


def ones_in_order(like, order):
    """Ones of ``like``'s shape, dtype and device, laid out dense in ``order`` (also under
    FakeTensorMode: no generator)."""
    stored = [like.shape[d] for d in order]
    return torch.ones(stored, dtype=like.dtype, device=like.device).permute([order.index(d) for d in range(like.dim())])


def layouts(shape, orders=None, steps=(1, 2)):
    """(name, order, step) of every dimension order (or ``orders``), dense and sliced."""
    orders = orders or list(itertools.permutations(range(len(shape))))
    return [(f"{''.join(map(str, order))}{'/' + str(step) if step > 1 else ''}", order, step) for order in orders for step in steps]


# The brief's non-standard channels-last tensor: channels-last dense, as its size-1 dimensions
# allow, where suggest_memory_format says contiguous.
def non_standard_channels_last(device="cpu"):
    return torch.arange(6.0, dtype=torch.float64).reshape(1, 3, 2, 1).permute(0, 2, 1, 3).to(device)


def assert_same_strides(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.stride() == expected.stride(), f"{name}: strides {actual.stride()} differ from {expected.stride()}"


def assert_same_values_and_strides(actual, expected, name):
    """Native's layout and native's values (float64): a kernel that reads a stride wrong gives
    the right layout and the wrong numbers."""
    assert_same_strides(actual, expected, name)
    torch.testing.assert_close(actual.cpu(), expected.cpu(), rtol=1e-9, atol=1e-9, msg=lambda m: f"{name}: {m}")


def assert_same_order(actual, expected, name):
    """Same element order in memory: strides equal but where a dimension has size 1."""

    def significant(t):
        return [s for s, n in zip(t.stride(), t.shape) if n > 1]

    assert significant(actual) == significant(expected), f"{name}: layout {actual.stride()} differs from {expected.stride()}"


def real_and_fake(fn, *tensors):
    """``fn(*tensors)`` (a tuple of tensors) run by the kernels and by the fake kernels."""
    real = fn(*tensors)
    with FakeTensorMode() as mode:
        fake = fn(*(None if t is None else mode.from_tensor(t) for t in tensors))
    return real, fake


def assert_fakes_match(real, fake, names, exactly=True):
    for name, r, f in zip(names, real, fake):
        (assert_same_strides if exactly else assert_same_order)(f, r, f"fake {name}")


# --------------------------------------------------------------------------------------------
# Batch norm

BATCH_NORM_CASES = (
    [((2, 3, 4, 5), *layout) for layout in layouts((2, 3, 4, 5))]
    + [(shape, *layout) for shape in [(1, 2, 3, 1), (2, 3, 1, 1), (2, 3, 1, 5)] for layout in layouts(shape, steps=(1,))]
    + [((4, 3), *layout) for layout in layouts((4, 3))]
    + [((2, 3, 5), *layout) for layout in layouts((2, 3, 5))]
    + [((2, 3, 1), *layout) for layout in layouts((2, 3, 1), steps=(1,))]
    + [((2, 3, 2, 3, 2), *layout) for layout in layouts((2, 3, 2, 3, 2), [(0, 1, 2, 3, 4), (0, 2, 3, 4, 1), (0, 1, 3, 2, 4), (4, 3, 2, 1, 0)])]
)


def batch_norm_grads(batch_norm, training, grad_layouts):
    """A function of (input, weight, bias) giving the output and the input gradient for each
    output-gradient layout of ``grad_layouts`` (orders; None: the output's own layout)."""

    def run(input, weight, bias):
        channels = input.shape[1]
        input = input.detach().requires_grad_()
        running = (None, None) if training else (input.new_zeros(channels), input.new_ones(channels))
        output = batch_norm(input, *running, weight, bias, training)
        results = [output]
        for order in grad_layouts:
            grad = torch.ones_like(output) if order is None else ones_in_order(output, order)
            results.append(torch.autograd.grad(output, input, grad, retain_graph=True)[0])
        return tuple(results)

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, name, order, step", BATCH_NORM_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_batch_norm_layouts_are_natives(device, shape, name, order, step):
    input = strided(shape, order, step, device)
    channels = shape[1]
    weight, bias = torch.rand(channels, dtype=torch.float64, device=device), torch.randn(channels, dtype=torch.float64, device=device)
    contiguous_order = tuple(range(len(shape)))
    # Output gradients: the output's layout, contiguous, and the input's own dimension order.
    grad_layouts = [None, contiguous_order, order]
    for training in (True, False):
        expected = batch_norm_grads(F.batch_norm, training, grad_layouts)(input.cpu(), weight.cpu(), bias.cpu())
        real, fake = real_and_fake(batch_norm_grads(ops.batch_norm, training, grad_layouts), input, weight, bias)
        names = ["output"] + [f"grad_input (output gradient {o or 'like the output'})" for o in grad_layouts]
        for ours, native, what in zip(real, expected, names):
            assert_same_values_and_strides(ours, native, f"training={training} {what}")
        assert_fakes_match(real, fake, names)


def test_batch_norm2d_keeps_a_non_standard_channels_last_input_channels_last():
    input = non_standard_channels_last()
    native = nn.BatchNorm2d(2).double()
    ours = cifarnet.nn.BatchNorm2d(2).double()
    expected, output = native(input), ours(input)
    assert expected.is_contiguous(memory_format=torch.channels_last) and not expected.is_contiguous()
    assert_same_strides(output, expected, "output")


# --------------------------------------------------------------------------------------------
# Dropout

DROPOUT_INPUTS = (
    [((2, 3, 4, 5), *layout) for layout in layouts((2, 3, 4, 5))]
    + [((1, 3, 4, 1), *layout) for layout in layouts((1, 3, 4, 1), steps=(1,))]
    + [((5, 33), *layout) for layout in layouts((5, 33))]
    + [((2, 3, 5), *layout) for layout in layouts((2, 3, 5))]
    + [((2, 3, 2, 3, 2), *layout) for layout in layouts((2, 3, 2, 3, 2), [(0, 1, 2, 3, 4), (0, 2, 3, 4, 1), (4, 3, 2, 1, 0)])]
)


def dropout_and_grads(dropout, p, grad_layouts):
    def run(input):
        input = input.detach().requires_grad_()
        output = dropout(input, p)
        results = [output]
        for order in grad_layouts:
            grad = ones_in_order(output, order)
            results.append(torch.autograd.grad(output, input, grad, retain_graph=True)[0])
        return tuple(results)

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, name, order, step", DROPOUT_INPUTS, ids=lambda v: str(v).replace(" ", ""))
def test_dropout_layouts_are_natives(device, shape, name, order, step):
    """Output as empty_like(input), input gradient as empty_like(output gradient): strides and
    all, as native's (whose strides agree but where a dimension has size 1); the mask as the
    contiguous input's."""
    input = strided(shape, order, step, device)
    contiguous_order = tuple(range(len(shape)))
    grad_layouts = [contiguous_order, order, tuple(reversed(contiguous_order))]
    names = ["output"] + [f"grad_input (output gradient {o})" for o in grad_layouts]
    for p in (0.3, 1.0):
        expected = dropout_and_grads(lambda x, p: F.dropout(x, p, True), p, grad_layouts)(input.cpu())
        real, fake = real_and_fake(dropout_and_grads(ops.dropout, p, grad_layouts), input)
        assert_same_strides(real[0], torch.empty_like(input), f"p={p} output")
        for grad, order in zip(real[1:], grad_layouts):
            assert_same_strides(grad, torch.empty_like(ones_in_order(input, order)), f"p={p} grad_input")
        for ours, native, what in zip(real, expected, names):
            assert_same_order(ours, native, f"p={p} {what}")
        # NB: in the order only: torch's own fake empty_like (torch._refs.empty_like) strides
        # size-1 dimensions otherwise than c10's empty_like, which the kernels call.
        assert_fakes_match(real, fake, names, exactly=False)
        # The mask is a function of the seed and each element's row-major index, whatever the
        # layout.
        seed = torch.tensor([1234], dtype=torch.int64)
        output = torch.ops.cifarnet.dropout.default(input, seed, p)
        assert torch.equal(output, torch.ops.cifarnet.dropout.default(input.contiguous(), seed, p)), "another mask"


def test_dropout_module_keeps_a_permuted_input_in_its_order():
    input = strided((2, 3, 4, 5), (3, 1, 0, 2))
    output = cifarnet.nn.Dropout(0.5)(input)
    assert_same_strides(output, torch.empty_like(input), "output")
    assert_same_order(output, F.dropout(input, 0.5, True), "output")


# --------------------------------------------------------------------------------------------
# conv2d -> [batch norm ->] ReLU -> max_pool2d

# (input shape, weight shape, pool arguments): a square geometry, one whose size-1 dimensions let
# a tensor be channels-last dense with non-standard strides, a padded pool (a ResNet stem's),
# and a padded pool over a 1x1 convolution output, which the padding makes 2x2.
SQUARE = ((2, 3, 6, 6), (4, 3, 3, 3), dict(pool_size=(2, 2)))
NARROW = ((1, 3, 6, 1), (4, 3, 3, 1), dict(pool_size=(2, 1)))
PADDED_POOL = ((2, 3, 7, 6), (4, 3, 3, 3), dict(pool_size=3, pool_stride=2, pool_padding=1))
ONE_PIXEL = ((2, 3, 3, 3), (4, 3, 3, 3), dict(pool_size=2, pool_stride=1, pool_padding=1))
INPUT_ORDERS = [(0, 1, 2, 3), (0, 2, 3, 1), (0, 2, 1, 3), (1, 0, 2, 3), (3, 2, 1, 0)]
WEIGHT_ORDERS = [(0, 1, 2, 3), (0, 2, 3, 1), (1, 0, 3, 2)]
CONV_CASES = [
    (geometry, input_layout, weight_order, unbatched)
    for geometry in (SQUARE, NARROW, PADDED_POOL, ONE_PIXEL)
    for input_layout in layouts(geometry[0], INPUT_ORDERS)
    for weight_order in WEIGHT_ORDERS
    for unbatched in (False, True)
]


def conv_input(geometry, order, step, unbatched, device):
    """The input of the case: for an unbatched one, the first sample of a batch laid out in
    ``order`` (so its layout is that order's without the batch dimension)."""
    input = strided(geometry[0], order, step, device)
    return input[0] if unbatched else input


def conv_layer(kind):
    """The layer under test as fn(input, weight, bias, pool arguments) -> output, natively and
    fused."""
    if kind == "conv2d_relu_max_pool2d":
        return (
            lambda x, w, b, pool: native_conv2d_relu_max_pool2d(x, w, b, **pool),
            lambda x, w, b, pool: ops.conv2d_relu_max_pool2d(x, w, b, **pool),
        )

    def native(x, w, b, pool, training):
        conv = F.conv2d(x, w, b)
        batch = conv if conv.dim() == 4 else conv.unsqueeze(0)
        normalised = F.batch_norm(batch, *running_stats(w, training), None, None, training).reshape(conv.shape)
        return F.max_pool2d(F.relu(normalised), pool["pool_size"], pool.get("pool_stride"), pool.get("pool_padding", 0))

    def fused(x, w, b, pool, training):
        return ops.conv2d_batch_norm_relu_max_pool2d(x, w, b, *running_stats(w, training), None, None, training, **pool)

    training = kind.endswith("training")
    return (lambda x, w, b, pool: native(x, w, b, pool, training)), (lambda x, w, b, pool: fused(x, w, b, pool, training))


def running_stats(weight, training):
    channels = weight.shape[0]
    return (None, None) if training else (weight.new_zeros(channels), weight.new_ones(channels))


def conv_grads(layer, pool):
    def run(input, weight, bias):
        input, weight, bias = (t.detach().requires_grad_() for t in (input, weight, bias))
        output = layer(input, weight, bias, pool)
        grads = torch.autograd.grad(output, (input, weight), torch.ones_like(output))
        return (output, *grads)

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kind", ["conv2d_relu_max_pool2d", "conv2d_batch_norm_relu_max_pool2d/training", "conv2d_batch_norm_relu_max_pool2d/eval"]
)
def test_conv_layer_layouts_are_natives(device, kind):
    native, fused = conv_layer(kind)
    for geometry, (name, order, step), weight_order, unbatched in CONV_CASES:
        if kind.endswith("training") and unbatched and geometry is ONE_PIXEL:
            continue  # one value per channel, which batch norm refuses to train on
        input = conv_input(geometry, order, step, unbatched, device)
        weight = strided(geometry[1], weight_order, device=device, seed=1)
        bias = torch.randn(geometry[1][0], dtype=torch.float64, device=device)
        case = f"input {tuple(input.shape)} {name}{' unbatched' if unbatched else ''}, weight {weight.stride()}"
        expected = conv_grads(native, geometry[2])(input, weight, bias)
        real, fake = real_and_fake(conv_grads(fused, geometry[2]), input, weight, bias)
        names = ["output", "grad_input", "grad_weight"]
        for ours, theirs, what in zip(real, expected, names):
            assert_same_values_and_strides(ours, theirs, f"{case}: {what}")
        assert_fakes_match(real, fake, [f"{case}: {what}" for what in names])


def test_conv_module_gives_an_unbatched_input_a_contiguous_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).double().to(memory_format=torch.channels_last)
    pool = nn.MaxPool2d(2)
    input = torch.randn(3, 8, 8, dtype=torch.float64)
    output = cifarnet.nn.Conv2dReLUMaxPool2d.from_modules(conv, pool)(input)
    assert_same_strides(output, pool(F.relu(conv(input))), "output")
    assert output.is_contiguous(), f"strides {output.stride()}"
