"""Shared hypothesis strategies and checks of the conv -> [batch norm] -> ReLU -> pool op tests."""

from __future__ import annotations

import functools
import math

import torch
from hypothesis import assume
from hypothesis import strategies as st


def conv_out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def pooled_out(size, window, stride, ceil_mode, padding=0):
    """The pooled size torch documents for max_pool2d (no dilation): in ceil mode the last
    window must start inside the input or its left padding."""
    rounding = math.ceil if ceil_mode else math.floor
    out = rounding((size + 2 * padding - window) / stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


@st.composite
def layer_cases(draw):
    """A valid conv -> ReLU -> max-pool geometry, memory formats, dtype and value pattern.

    Pool padding is drawn up to native max_pool2d's limit, half the window (4 wide windows
    pad up to 2)."""
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    pool_size = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    pool_stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    pool_padding = (draw(st.integers(0, pool_size[0] // 2)), draw(st.integers(0, pool_size[1] // 2)))
    ceil_mode = draw(st.booleans())
    height, width = draw(st.integers(1, 13)), draw(st.integers(1, 13))
    conv_h = conv_out(height, kernel[0], stride[0], padding[0])
    conv_w = conv_out(width, kernel[1], stride[1], padding[1])
    window_stride = pool_stride or pool_size
    assume(kernel[0] <= height + 2 * padding[0] and kernel[1] <= width + 2 * padding[1])
    assume(pooled_out(conv_h, pool_size[0], window_stride[0], ceil_mode, pool_padding[0]) > 0)
    assume(pooled_out(conv_w, pool_size[1], window_stride[1], ceil_mode, pool_padding[1]) > 0)
    return dict(
        batch=draw(st.integers(0, 4)),
        in_channels=draw(st.integers(1, 5)),
        out_channels=draw(st.sampled_from([1, 2, 3, 8, 16, 19])),
        size=(height, width),
        kernel=kernel,
        stride=stride,
        padding=padding,
        pool_size=pool_size,
        pool_stride=pool_stride,
        ceil_mode=ceil_mode,
        pool_padding=pool_padding,
        bias=draw(st.booleans()),
        input_channels_last=draw(st.booleans()),
        weight_channels_last=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        values=draw(st.sampled_from(["normal", "integers", "nan", "negative", "zeros"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def every_weight_element_sees_input(case):
    """Whether each kernel row and column meets the unpadded input at some output position.

    NB: native torch 2.14's oneDNN convolution backward in bfloat16 returns garbage (1e37,
    varying from call to call) for weight elements that only ever meet padding; F.conv2d's own
    gradient has it. The ops' dense backward calls the same function, so such geometries are
    left out here.
    """
    for size, kernel, stride, padding in zip(case["size"], case["kernel"], case["stride"], case["padding"]):
        outputs = conv_out(size, kernel, stride, padding)
        for k in range(kernel):
            if not any(0 <= o * stride + k - padding < size for o in range(outputs)):
                return False
    return True


def make_tensors(case, device):
    """Input, weight, bias and output gradient for a case.

    "integers" makes small integer values: every sum is exact, so pooling windows hold exact
    ties and both implementations must break them the same way.
    """
    generator = torch.Generator().manual_seed(case["seed"])
    kind, dtype = case["values"], case["dtype"]

    def draw(*shape):
        if kind == "integers":
            return torch.randint(-2, 3, shape, generator=generator).to(dtype)
        return torch.randn(shape, generator=generator, dtype=dtype)

    input = draw(case["batch"], case["in_channels"], *case["size"])
    weight = draw(case["out_channels"], case["in_channels"], *case["kernel"])
    bias = draw(case["out_channels"]) if case["bias"] else None
    if kind == "nan" and input.numel():
        input.view(-1)[torch.randint(input.numel(), (max(1, input.numel() // 7),), generator=generator)] = math.nan
    if kind == "negative":
        input, weight = input.abs(), -weight.abs()
        bias = None if bias is None else -bias.abs()
    if kind == "zeros":
        input.zero_()
    if case["input_channels_last"]:
        input = input.contiguous(memory_format=torch.channels_last)
    if case["weight_channels_last"]:
        weight = weight.contiguous(memory_format=torch.channels_last)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(input), move(weight), move(bias), generator


def op_args(case):
    return dict(
        stride=case["stride"],
        padding=case["padding"],
        pool_size=case["pool_size"],
        pool_stride=case["pool_stride"],
        ceil_mode=case["ceil_mode"],
        pool_padding=case["pool_padding"],
    )


def assert_same_layout(actual, expected):
    """Same element order in memory (an empty tensor, or a size-1 dimension, has no order)."""
    if expected.numel() == 0:
        return
    actual_strides = [s for s, n in zip(actual.stride(), actual.shape) if n > 1]
    expected_strides = [s for s, n in zip(expected.stride(), expected.shape) if n > 1]
    assert actual_strides == expected_strides, f"layout {actual.stride()} differs from native {expected.stride()}"


def tolerances(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)


def assert_no_worse_than_native(ours, native, reference, name, rtol, atol):
    """max |ours - reference| <= 4 max |native - reference| + atol + rtol max |reference|.

    The reference is the native computation in float64 on the same (rounded) data. In float32
    the data themselves can limit what any implementation reaches (inputs offset by 1e3 keep
    about 4 significant digits of their deviations; a batch norm over nearly constant channels
    amplifies rounding), so the bar is native's own float32 error, taken over the whole tensor
    (a single element of native's can be luckily exact). NaN must match NaN: the reference's,
    or native's where native's differs (oneDNN's bfloat16 convolution spreads a NaN to
    neighbouring outputs that float64 keeps finite); the values are compared elsewhere.
    """
    ours, native = ours.double(), native.double()
    ours_nan, native_nan, reference_nan = ours.isnan(), native.isnan(), reference.isnan()
    assert torch.equal(ours_nan, reference_nan) or torch.equal(ours_nan, native_nan), (
        f"{name}: NaN where neither the reference nor native has one, or the reverse"
    )
    if reference.numel() == 0:
        return
    finite = ~(ours_nan | native_nan | reference_nan)
    ours, native, reference = (torch.where(finite, t, 0.0) for t in (ours, native, reference))
    error = (ours - reference).abs().max().item()
    native_error = (native - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert error <= 4 * native_error + atol + rtol * scale, (
        f"{name}: max error {error:.3g}, native's {native_error:.3g} (largest reference value {scale:.3g})"
    )


@functools.cache
def opinfo_samples(name: str) -> tuple:
    """PyTorch's own OpInfo sample inputs (float64, CPU) of the torch op ``name``
    (``"nn.functional.conv2d"``): the cases torch tests its own op with.

    NB: ``torch.testing._internal`` is private, and this is the one place that reads it; the
    assertions say what changed if torch changes it. Importing it has side effects that this
    undoes for the rest of the session: it freezes ``torch.backends`` flags and wraps
    TorchScript calls. (Its ``common_utils`` imports ``expecttest``: a dev dependency.)
    """
    frozen = torch.backends.flags_frozen()
    script_calls = torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    finally:
        if not frozen:
            vars(torch.backends)["__allow_nonbracketed_mutation_flag"] = True
        torch._C.ScriptFunction.__call__, torch._C.ScriptMethod.__call__ = script_calls
    infos = [info for info in op_db if info.name == name and not info.variant_test_name]
    assert len(infos) == 1, f"torch's op_db has {len(infos)} OpInfos named {name!r}, expected 1"
    samples = tuple(infos[0].sample_inputs("cpu", torch.float64, requires_grad=False))
    assert samples, f"torch's OpInfo {name!r} gives no sample inputs"
    return samples
