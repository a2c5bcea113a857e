"""The Winograd F(2x2, 5x5) and F(4x4, 3x3) convolutions of the CPU kernels, against native
torch.

They run inside conv2d_batch_norm_relu_max_pool2d (forward, backward and phase ops),
conv2d_relu_max_pool2d's forward and batch_norm_relu_conv2d (forward and backward) for float32
5x5 and 3x3 convolutions with stride 1, enough channels and outputs, by default on CPUs of the
AVX2 class (these tests run them on any CPU with AVX2); they draw such geometries and check the
convolution output, the fused ops' outputs, statistics and gradients against float64, the
fallback to oneDNN for values that are not finite, and the switch that turns it off.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cifarnet
from cifarnet import _C
from cifarnet.ops import batch_norm_relu_conv2d, conv2d_batch_norm_relu_max_pool2d, conv2d_relu_max_pool2d
from op_cases import assert_no_worse_than_native, conv_out, make_tensors, op_args, pooled_out, tolerances
from conftest import native_conv2d_relu_max_pool2d
from test_conv2d_batch_norm_relu_max_pool2d import block_tensors, check_block_against_native

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))
STATS_OP = torch.ops.cifarnet._conv2d_batch_norm_relu_max_pool2d_stats
# Channel counts for which the transformed product pays: 36 and 40 leave vectors of padding
# channels (12 and 8 of them) past the last real one.
CHANNELS = [32, 36, 40, 48, 64]


def applies(in_channels, out_channels, size, padding, kernel=5):
    return _C._winograd_applies(in_channels, out_channels, *size, [kernel, kernel], [1, 1], list(padding))


@contextlib.contextmanager
def environment(**variables):
    """The variables set inside the block (the ops read them at each call)."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


# By default Winograd runs on the AVX2 class only; these tests run it on any CPU with AVX2
# (AVX-512 ones included, as CIFARNET_CONV_ALGORITHM=winograd does), so that every CI machine
# tests the loops.
with environment(CIFARNET_CONV_ALGORITHM="winograd"):
    requires_winograd = pytest.mark.skipif(
        not applies(32, 64, (16, 16), (2, 2)), reason="Winograd needs a CPU with AVX2"
    )


@pytest.fixture(autouse=True, scope="module")
def winograd_wherever_avx2():
    with environment(CIFARNET_CONV_ALGORITHM="winograd"):
        yield


def test_auto_runs_winograd_on_the_avx2_class_only(monkeypatch):
    monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", "auto")
    assert applies(32, 64, (16, 16), (2, 2)) == (cifarnet.build_info()["cpu_isa"].startswith("avx2"))
    monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", "fastest")
    with pytest.raises(ValueError, match="CIFARNET_CONV_ALGORITHM must be one of auto, winograd, native .* got 'fastest'"):
        applies(32, 64, (16, 16), (2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_a_bad_algorithm_is_refused_for_every_dtype(dtype, monkeypatch):
    """Not only for the dtypes Winograd could take: a typo must not pass unnoticed in float64."""
    monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", "Winograd")
    input, weight = torch.randn(2, 32, 12, 12, dtype=dtype), torch.randn(64, 32, 5, 5, dtype=dtype)
    with pytest.raises(ValueError, match="CIFARNET_CONV_ALGORITHM must be one of auto, winograd, native"):
        conv2d_relu_max_pool2d(input, weight, padding=2)


@requires_winograd
def test_the_weight_gradient_is_the_same_for_any_thread_count():
    """Its float partial sums cover the same tiles whatever the thread count (a thread's share
    starts where a partial sum starts), so the gradient comes out the same to the bit, as
    oneDNN's does. The phase ops of synchronized batch norm isolate it: statistics, argmax and
    the reduced sums once, then only the backward that convolves, at 1, 2 and 3 threads. With a
    512 KiB L2, blocks of 24 tiles and partial sums of 4 blocks: 40 samples of 14x14 make 1960
    tiles, 82 blocks, which 2 or 3 equal shares would split inside a partial sum; the input and
    gradient (3 MiB) hold the sums of three runs of partial sums (885 KiB each), so each thread
    takes a run."""
    ops = torch.ops.cifarnet
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(40, 32, 14, 14, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(64, 32, 5, 5, generator=generator)
    grad_output = torch.randn(40, 64, 7, 7, generator=generator).contiguous(memory_format=torch.channels_last)
    assert applies(32, 64, (14, 14), (2, 2))
    geometry = ([1, 1], [2, 2], [2, 2], [2, 2], False, [0, 0])
    conv_output, mean, var = ops._conv2d_batch_norm_relu_max_pool2d_stats(input, weight, None, *geometry)
    _, argmax = ops._conv2d_batch_norm_relu_max_pool2d_epilogue(input, weight, conv_output, mean, var, None, None, 1e-5, *geometry)
    sums = ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad_output, input, weight, conv_output, mean, argmax, *geometry)
    threads = torch.get_num_threads()
    gradients = []
    _C._set_cache_sizes(32 * 1024, 512 * 1024, 32 * 2**20)
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            _, grad_weight, _ = ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
                grad_output, input, weight, conv_output, mean, var, None, argmax, *sums, 40 * 14 * 14, 1e-5,
                *geometry, [False, True, False],
            )  # fmt: skip
            gradients.append(grad_weight)
    finally:
        torch.set_num_threads(threads)
        _C._set_cache_sizes()
    assert torch.equal(gradients[0], gradients[1]) and torch.equal(gradients[0], gradients[2])


WEIGHT_GRADIENT_MEMORY_SCRIPT = """
import re, sys, torch
from cifarnet import _C
ops = torch.ops.cifarnet

def resident_bytes(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

generator = torch.Generator().manual_seed(0)
input = torch.randn(32, 128, 16, 16, generator=generator).contiguous(memory_format=torch.channels_last)
weight = torch.randn(128, 128, 3, 3, generator=generator)
grad_output = torch.randn(32, 128, 8, 8, generator=generator).contiguous(memory_format=torch.channels_last)
geometry = ([1, 1], [1, 1], [2, 2], [2, 2], False, [0, 0])
conv_output, mean, var = ops._conv2d_batch_norm_relu_max_pool2d_stats(input, weight, None, *geometry)
_, argmax = ops._conv2d_batch_norm_relu_max_pool2d_epilogue(input, weight, conv_output, mean, var, None, None, 1e-5, *geometry)
sums = ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad_output, input, weight, conv_output, mean, argmax, *geometry)
_C._set_cache_sizes(32 * 1024, 512 * 1024, 32 * 2**20)
torch.set_num_threads(int(sys.argv[1]))
backward = lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
    grad_output, input, weight, conv_output, mean, var, None, argmax, *sums, 32 * 16 * 16, 1e-5,
    *geometry, [False, True, False])[1]
gradient = backward()  # the threads' stacks and every lazy allocation, before measuring
peaks = []
for _ in range(3):
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident set starts again from here
    resident = resident_bytes("VmRSS")
    backward()
    peaks.append(resident_bytes("VmHWM") - resident)
torch.save(gradient, sys.argv[2])
print(min(peaks))
"""


@requires_winograd
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures the peak resident set through Linux's /proc")
def test_the_weight_gradient_memory_does_not_grow_with_threads(tmp_path):
    """Its threads' double sums of the transformed gradient (7 MiB each for 128 -> 128) are held
    to what fits in the input and output gradient's bytes, the threads beyond them splitting the
    output channels: with 16 threads the backward takes no more than with one (one sum per thread
    took 40 MiB here, for 8 MiB of input and gradient), and gives the same gradient. Measured as
    the peak resident set of a fresh process (torch's profiler does not see allocations in
    worker threads), glibc told to map every buffer of 64 KiB or more on its own so that freeing
    returns it (the default threshold moves with what was freed)."""
    env = dict(os.environ, CIFARNET_CONV_ALGORITHM="winograd", MALLOC_MMAP_THRESHOLD_="65536")
    peaks = {}
    for threads in (1, 16):
        command = [sys.executable, "-c", WEIGHT_GRADIENT_MEMORY_SCRIPT, str(threads), str(tmp_path / f"{threads}.pt")]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        peaks[threads] = int(result.stdout.split()[-1])
    held_bytes = 2 * 32 * 128 * 16 * 16 * 4
    assert peaks[16] <= peaks[1] + held_bytes // 2, f"peak resident bytes above the start with 1 and 16 threads: {peaks}"
    assert torch.equal(torch.load(tmp_path / "1.pt"), torch.load(tmp_path / "16.pt"))


# A convolution's sizes, for the tests that draw their own tensors (the tests assume the ones
# Winograd takes).
GEOMETRIES = dict(
    batch=st.integers(1, 3),
    in_channels=st.sampled_from(CHANNELS),
    out_channels=st.sampled_from(CHANNELS),
    size=st.tuples(st.integers(1, 14), st.integers(1, 14)),
    kernel=st.sampled_from([3, 5]),
    padding=st.tuples(st.integers(0, 4), st.integers(0, 4)),
)


@st.composite
def winograd_cases(draw, values=("normal", "nan")):
    """A conv -> batch norm -> ReLU -> pool case whose convolution runs as Winograd: 5x5 or 3x3,
    stride 1, padding up to the filter's reach, sizes that leave partial tiles, channel counts
    with padding lanes."""
    kernel = draw(st.sampled_from([3, 5]))
    padding = (draw(st.integers(0, kernel - 1)), draw(st.integers(0, kernel - 1)))
    size = (draw(st.integers(1, 14)), draw(st.integers(1, 14)))
    conv = [conv_out(s, kernel, 1, p) for s, p in zip(size, padding)]
    assume(min(conv) >= 2)
    pool = draw(st.sampled_from([(2, 2), (3, 3), (1, 1)]))
    assume(all(pooled_out(c, w, w, False) > 0 for c, w in zip(conv, pool)))
    in_channels, out_channels = draw(st.sampled_from(CHANNELS)), draw(st.sampled_from(CHANNELS))
    assume(applies(in_channels, out_channels, size, padding, kernel))
    return dict(
        batch=draw(st.integers(1, 4)), in_channels=in_channels, out_channels=out_channels, size=size,
        kernel=(kernel, kernel), stride=(1, 1), padding=padding, pool_size=pool, pool_stride=None, ceil_mode=False,
        pool_padding=(0, 0), bias=draw(st.booleans()), input_channels_last=draw(st.booleans()),
        weight_channels_last=draw(st.booleans()), dtype=torch.float32, values=draw(st.sampled_from(values)),
        seed=draw(st.integers(0, 2**31 - 1)), training=True, running_stats=draw(st.booleans()),
        bn_affine=draw(st.booleans()), momentum=0.1,
    )


def nearest_tie(case, batch_norm=True):
    """The smallest gap between a pool window's winner and its runner-up or zero (the ReLU's
    kink), in the float64 block's normalised units (or, without batch norm, as a fraction of
    the largest convolution output). Rounding a few times native's decides a window closer
    than that either way: both are right, but the gradient lands elsewhere."""
    input, weight, bias, bn_weight, bn_bias, _, _ = block_tensors(case, "cpu")
    double = lambda t: None if t is None else t.double()  # noqa: E731
    conv = F.conv2d(double(input), double(weight), double(bias), padding=case["padding"])
    if batch_norm:
        activation = F.batch_norm(conv, None, None, double(bn_weight), double(bn_bias), training=True)
    else:
        activation = conv / conv.abs().max()
    pool_h, pool_w = case["pool_size"]
    windows = activation.unfold(2, pool_h, pool_h).unfold(3, pool_w, pool_w).flatten(-2)
    if windows.shape[-1] == 1:
        gaps = windows[..., 0].abs()
    else:
        top = windows.topk(2, dim=-1).values
        gaps = torch.minimum(top[..., 0] - top[..., 1], top[..., 0].abs())
    return gaps.min().item() if gaps.numel() else math.inf


@requires_winograd
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=winograd_cases(), forward=st.sampled_from(["samples", "tiles"]))
def test_conv_relu_pool_with_winograd_matches_native(case, forward):
    """conv2d_relu_max_pool2d's forward takes Winograd too (whichever way it shares the batch
    out: a tile per thread, or tiles of one sample each): its output within 1e-5 of the
    largest float64 convolution output, NaN where native has it, its gradients (exact for the
    windows' winners) as native's. Near-ties are left out, as above."""
    assume(case["values"] == "nan" or nearest_tie(case, batch_norm=False) > 1e-4)
    input, weight, bias, generator = make_tensors(case, "cpu")
    geometry = op_args(case)
    leaves = [t.detach().clone().requires_grad_() for t in (input, weight)]
    native_leaves = [t.detach().clone().requires_grad_() for t in (input, weight)]
    with environment(CIFARNET_CONV_FORWARD=forward, CIFARNET_FORWARD_TILE_BYTES="1"):
        fused = conv2d_relu_max_pool2d(*leaves, bias, **geometry)
    native = native_conv2d_relu_max_pool2d(*native_leaves, bias, **geometry)
    exact = native_conv2d_relu_max_pool2d(input.double(), weight.double(), None if bias is None else bias.double(), **geometry)
    scale = exact.nan_to_num().abs().max().item()
    torch.testing.assert_close(fused.double(), exact, rtol=0, atol=1e-5 * scale + 1e-30, equal_nan=True)
    grad_output = torch.randn(native.shape, generator=generator)
    fused_grads = torch.autograd.grad(fused, leaves, grad_output)
    native_grads = torch.autograd.grad(native, native_leaves, grad_output)
    for name, ours, theirs in zip(("input", "weight"), fused_grads, native_grads):
        torch.testing.assert_close(ours, theirs, equal_nan=True, msg=lambda m: f"grad {name}: {m}", **tolerances(torch.float32))


@requires_winograd
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(case=winograd_cases())
def test_fused_op_with_winograd_matches_native(case):
    """Output, running statistics and every gradient within the fused op's property test's
    bounds against float64 (a few times native's float32 error), the convolution gradients
    within 3e-5 of their summed terms: of each element's for the input gradient, of the
    filter's largest for the weight gradient, over whose 25 elements the transforms spread
    their rounding (native: 1e-5 of each element's; over 150 drawn cases Winograd's worst
    were 0.8e-5 and 1.2e-5). NaN inputs give native's pattern (oneDNN runs them). Cases with a
    pool window within 1e-4 of a tie are left out (see nearest_tie), and so are inputs of one
    sign: a batch norm of such a convolution subtracts a mean far larger than the spread and
    magnifies any rounding (Winograd's 1e-5 of the terms became 1e-4 of the output in one
    drawn case); the convolution alone is checked on them below."""
    assume(case["values"] == "nan" or nearest_tie(case) > 1e-4)
    check_block_against_native(case, "cpu", conv2d_batch_norm_relu_max_pool2d, winograd_rounding_bound)


def winograd_rounding_bound(name, terms):
    if name == "weight":
        return 3e-5 * terms.amax(dim=(2, 3), keepdim=True)
    return 3e-5 * terms


@requires_winograd
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    **GEOMETRIES,
    channels_last=st.booleans(),
    one_sign=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_convolution_output_within_float32_rounding_of_float64(
    batch, in_channels, out_channels, size, kernel, padding, channels_last, one_sign, seed
):
    """The convolution alone (the statistics phase returns it), against float64: within
    1e-5 of the sum of the absolute products the outputs of its tile add up (native's bound
    would be each output's own; F(4x4, 3x3)'s worst over 1,000 drawn cases lay between 2e-6
    and 4e-6); also for non-negative inputs (as after a ReLU) with weights of one sign."""
    assume(all(conv_out(s, kernel, 1, p) >= 1 for s, p in zip(size, padding)))
    assume(applies(in_channels, out_channels, size, padding, kernel))
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch, in_channels, *size, generator=generator)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) / 10
    bias = torch.randn(out_channels, generator=generator)
    if one_sign:
        input, weight = input.abs(), -weight.abs()
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    conv, _, _ = STATS_OP(input, weight, bias, [1, 1], list(padding), [1, 1], [1, 1], False, [0, 0])
    exact = F.conv2d(input.double(), weight.double(), bias.double(), padding=padding)
    terms = F.conv2d(input.double().abs(), weight.double().abs(), bias.double().abs(), padding=padding)
    error = (conv.double() - exact).abs()
    bound = OUTPUT_ROUNDING * tile_maxima(terms, TILE[kernel])
    assert (error <= bound).all(), f"error {(error / bound).max() * OUTPUT_ROUNDING:.3g} of its tile's terms"


# Outputs along a tile's side, by filter size; the bound on an output's rounding, as a fraction
# of its tile's summed terms.
TILE = {5: 2, 3: 4}
OUTPUT_ROUNDING = 1e-5


def tile_maxima(terms, tile):
    """Each output's bound scale: the largest summed terms of its tile (the transforms mix the
    tile's 6 x 6 inputs, so rounding follows the tile's scale, not each output's)."""
    height, width = terms.shape[-2:]
    maxima = F.max_pool2d(terms, tile, tile, ceil_mode=True)
    return maxima.repeat_interleave(tile, dim=-2).repeat_interleave(tile, dim=-1)[..., :height, :width]


def test_winograd_is_not_oneDNN_and_the_switch_restores_oneDNN(monkeypatch):
    """With Winograd the convolution's rounding differs from oneDNN's (so it ran); with
    CIFARNET_CONV_ALGORITHM=native the op's convolution is oneDNN's to the bit."""
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(4, 32, 12, 12, generator=generator)
    weight = torch.randn(64, 32, 5, 5, generator=generator)
    # The op's oneDNN call: its weight channels last.
    native = F.conv2d(input, weight.contiguous(memory_format=torch.channels_last), None, padding=2)
    args = ([1, 1], [2, 2], [2, 2], [2, 2], False, [0, 0])
    if applies(32, 64, (12, 12), (2, 2)):
        winograd, _, _ = STATS_OP(input, weight, None, *args)
        assert not torch.equal(winograd, native)
        torch.testing.assert_close(winograd, native, rtol=0, atol=1e-5 * native.abs().max().item())
    monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", "native")
    assert not applies(32, 64, (12, 12), (2, 2))
    switched_off, _, _ = STATS_OP(input, weight, None, *args)
    assert torch.equal(switched_off, native)


@requires_winograd
@pytest.mark.parametrize(
    "value", [math.inf, -math.inf, math.nan, 3e38], ids=["inf", "-inf", "nan", "overflowing"]
)
@pytest.mark.parametrize("where", ["input", "weight", "grad_output"])
def test_values_that_are_not_finite_give_native_results(value, where, monkeypatch):
    """One such value: a tile's transform would spread it over outputs whose windows never
    saw it (or, for 3e38, overflow in the transform); the op hands the call to oneDNN and
    gives exactly native's values, NaN and infinities included. (In the output gradient it
    reaches the backward only: both runs share the forward.)"""
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(2, 32, 10, 10, generator=generator)
    weight = torch.randn(32, 32, 5, 5, generator=generator) / 10
    grad_output = torch.randn(2, 32, 5, 5, generator=generator)
    tensor = {"input": input, "weight": weight, "grad_output": grad_output}[where]
    tensor[0, 3, 2, 2] = value

    def run(forward, backward):
        x, w = input.clone().requires_grad_(), weight.clone().requires_grad_()
        monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", forward)
        out = conv2d_batch_norm_relu_max_pool2d(x, w, None, None, None, None, None, training=True, padding=2, pool_size=2)
        monkeypatch.setenv("CIFARNET_CONV_ALGORITHM", backward)
        return (out, *torch.autograd.grad(out, [x, w], grad_output))

    if where == "grad_output":
        ours, native = run("winograd", "winograd"), run("winograd", "native")
    else:
        ours, native = run("winograd", "winograd"), run("native", "native")
    for name, mine, theirs in zip(("output", "grad input", "grad weight"), ours, native):
        assert torch.equal(mine.isnan(), theirs.isnan()), f"{name}: NaN pattern differs"
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, equal_nan=True, msg=name)


@requires_winograd
def test_study_layers_run_winograd_but_not_conv1():
    """conv2 and conv3 of the study's network take the transformed product; conv1's three
    input channels would not pay for it."""
    assert applies(32, 64, (16, 16), (2, 2)) and applies(64, 64, (8, 8), (2, 2))
    assert not applies(3, 32, (32, 32), (2, 2))


@requires_winograd
def test_resnet_3x3_layers_run_winograd_where_it_pays():
    """ResNet's 3x3 convolutions at 224x224 (64 channels at 56x56, 128 at 28x28) and at
    CIFAR's 32x32 (64 at 8x8) take F(4x4, 3x3); on a 2x2 image a tile computes four times the
    outputs that exist, which does not pay."""
    assert applies(64, 64, (56, 56), (1, 1), 3) and applies(128, 128, (28, 28), (1, 1), 3)
    assert applies(64, 64, (8, 8), (1, 1), 3)
    assert not applies(256, 256, (2, 2), (1, 1), 3)


@requires_winograd
def test_channels_whose_block_outgrows_l2_are_refused():
    """The smallest block (12 tiles' transformed inputs and products) must fit in one core's
    L2: 128 + 128 channels take 432 KiB, 256 + 256 twice that."""
    machine = _C._cache_sizes()
    try:
        _C._set_cache_sizes(l1d_bytes=32 << 10, l2_bytes=512 << 10, llc_bytes=32 << 20)
        assert applies(128, 128, (28, 28), (1, 1), 3)
        assert not applies(256, 256, (28, 28), (1, 1), 3) and not applies(64, 512, (28, 28), (1, 1), 3)
        _C._set_cache_sizes(l1d_bytes=32 << 10, l2_bytes=2 << 20, llc_bytes=32 << 20)
        assert applies(256, 256, (28, 28), (1, 1), 3)
    finally:
        _C._set_cache_sizes()
    assert _C._cache_sizes() == machine


@pytest.mark.parametrize(
    "kernel, stride, padding, size",
    [((7, 7), (1, 1), (3, 3), (16, 16)), ((5, 5), (2, 2), (2, 2), (16, 16)), ((5, 5), (1, 1), (5, 5), (16, 16)),
     ((3, 3), (1, 1), (3, 3), (16, 16)), ((5, 5), (1, 1), (3, 0), (1, 8)), ((3, 3), (1, 1), (1, 1), (1, 16))],
    ids=["7x7", "stride-2", "padding-5", "3x3-padding-3", "filter-rows-that-only-meet-padding", "3x3-filter-rows-that-only-meet-padding"],
)
def test_geometries_winograd_does_not_cover_are_refused(kernel, stride, padding, size):
    assert not _C._winograd_applies(64, 64, *size, list(kernel), list(stride), list(padding))


@requires_winograd
@pytest.mark.parametrize("input_channels_last", [False, True])
@pytest.mark.parametrize("weight_channels_last", [False, True])
def test_gradients_take_native_layouts(input_channels_last, weight_channels_last):
    """The Winograd gradients are laid out as native conv2d's (channels last where the input or
    the weight is), as the oneDNN path gives them. (36 output channels: a vector of padding
    channels past the last, which once made the transforms write out of bounds.)"""
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(2, 32, 10, 10, generator=generator)
    weight = torch.randn(36, 32, 5, 5, generator=generator)
    if input_channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    if weight_channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    leaves = [input.clone().requires_grad_(), weight.clone().requires_grad_()]
    out = conv2d_batch_norm_relu_max_pool2d(*leaves, None, None, None, None, None, training=True, padding=2, pool_size=2)
    grads = torch.autograd.grad(out, leaves, torch.randn_like(out))
    native_leaves = [input.clone().requires_grad_(), weight.clone().requires_grad_()]
    native = F.conv2d(*native_leaves, padding=2)
    native_grads = torch.autograd.grad(native, native_leaves, torch.randn_like(native))
    for ours, theirs in zip(grads, native_grads):
        assert ours.stride() == theirs.stride()
    assert _C._winograd_applies(32, 36, 10, 10, [5, 5], [1, 1], [2, 2])


@requires_winograd
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    **GEOMETRIES,
    bias=st.booleans(),
    input_channels_last=st.booleans(),
    weight_channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_batch_norm_relu_conv_with_winograd_matches_float64(
    batch, in_channels, out_channels, size, kernel, padding, bias, input_channels_last, weight_channels_last, seed
):
    """batch_norm_relu_conv2d with its convolution as Winograd (a ResNet block's 3x3 one),
    against native's chain in float64: the output within the bound above of its tile's summed
    terms; the weight gradient within 3e-5 of its filter's largest summed terms (both plus
    what the batch norm's own float32 rounding, 8 ulps of its terms, moves them: a rectified
    value just above zero carries it relative to its size); the batch norm's gradients within
    3e-5 of the batch norm's backward taken over the convolution's input-gradient terms in
    absolute values (where Winograd's rounding goes), plus native's float32 tolerance of their
    scale; native's layouts."""
    assume(all(s + 2 * p >= kernel for s, p in zip(size, padding)))
    assume(applies(in_channels, out_channels, size, padding, kernel))
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch, in_channels, *size, generator=generator) * 2 + 1
    bn_weight = 0.5 + torch.rand(in_channels, generator=generator)
    bn_bias = torch.randn(in_channels, generator=generator)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) / 10
    conv_bias = torch.randn(out_channels, generator=generator) if bias else None
    if input_channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    if weight_channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    leaves = [t.clone().requires_grad_() for t in (input, bn_weight, bn_bias, weight)]
    output = batch_norm_relu_conv2d(*leaves[:1], None, None, *leaves[1:], conv_bias, training=True, padding=padding)
    grad_output = torch.randn(output.shape, generator=generator)
    grads = torch.autograd.grad(output, leaves, grad_output)

    exact_leaves = [t.double().requires_grad_() for t in (input, bn_weight, bn_bias, weight)]
    x, gamma, beta, w = exact_leaves
    normalised = F.batch_norm(x, None, None, gamma, beta, training=True)
    rectified = F.relu(normalised)
    exact = F.conv2d(rectified, w, None if conv_bias is None else conv_bias.double(), padding=padding)
    exact_grads = torch.autograd.grad(exact, exact_leaves, grad_output.double())
    native_leaves = [t.clone().requires_grad_() for t in (input, bn_weight, bn_bias, weight)]
    normalised_natively = F.batch_norm(native_leaves[0], None, None, *native_leaves[1:3], training=True)
    native = F.conv2d(F.relu(normalised_natively), native_leaves[3], conv_bias, padding=padding)
    native_grads = torch.autograd.grad(native, native_leaves, grad_output)
    assert output.stride() == native.stride()
    for name, mine, theirs in zip(("input", "weight"), grads[::3], native_grads[::3]):
        assert mine.stride() == theirs.stride(), f"grad {name}: strides {mine.stride()}, native {theirs.stride()}"

    r, g, dy = rectified.detach().abs(), w.detach().abs(), grad_output.double().abs()
    dims = (0, 2, 3)
    mean, var = x.detach().mean(dims, keepdim=True), x.detach().var(dims, unbiased=False, keepdim=True)
    x_hat = ((x.detach() - mean) / (var + 1e-5).sqrt()).abs()
    normalised_terms = gamma.detach().view(1, -1, 1, 1) * x_hat + beta.detach().abs().view(1, -1, 1, 1)
    rectified_rounding = 2**-20 * normalised_terms * (normalised > -2**-20 * normalised_terms)
    terms = F.conv2d(r, g, None if conv_bias is None else conv_bias.double().abs(), padding=padding)
    bound = OUTPUT_ROUNDING * tile_maxima(terms, TILE[kernel]) + F.conv2d(rectified_rounding, g, padding=padding)
    error = (output.double() - exact.detach()).abs()
    assert (error <= bound).all(), f"output: {(error / bound).nan_to_num().max():.3g} of the bound"

    weight_terms = torch.nn.grad.conv2d_weight(r, w.shape, dy, padding=padding)
    weight_bound = 3e-5 * weight_terms.amax(dim=(2, 3), keepdim=True) + torch.nn.grad.conv2d_weight(
        rectified_rounding, w.shape, dy, padding=padding
    )
    weight_error = (grads[3].double() - exact_grads[3]).abs()
    assert (weight_error <= weight_bound).all(), f"grad weight: {(weight_error / weight_bound).nan_to_num().max():.3g} of the bound"

    # The batch norm's backward over the input-gradient terms, in absolute values: how far
    # Winograd's rounding of the convolution's input gradient can move each gradient.
    input_terms = torch.nn.grad.conv2d_input(x.shape, g, dy, padding=padding) * (normalised > 0)
    scale = gamma.detach().abs().view(1, -1, 1, 1) / (var + 1e-5).sqrt()
    spread = {
        "input": scale * (input_terms + input_terms.mean(dims, keepdim=True) + x_hat * (input_terms * x_hat).mean(dims, keepdim=True)),
        "bn_weight": (input_terms * x_hat).sum(dims),
        "bn_bias": input_terms.sum(dims),
    }
    for name, mine, reference in zip(("input", "bn_weight", "bn_bias"), grads, exact_grads):
        allowed = 3e-5 * spread[name] + 1e-5 * reference.abs().max()
        difference = (mine.double() - reference).abs()
        assert (difference <= allowed).all(), f"grad {name}: {(difference / allowed).nan_to_num().max():.3g} of the bound"


@requires_winograd
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    **GEOMETRIES,
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_bfloat16_computes_in_float32_and_rounds_as_native(batch, in_channels, out_channels, size, kernel, padding, channels_last, seed):
    """A bfloat16 convolution (Winograd takes them where the CPU has no bfloat16 arithmetic)
    computes in float32 and rounds once, as oneDNN's: batch_norm_relu_conv2d's output and
    gradients in native's dtypes and layouts, no further from float64 on the same data than
    native bfloat16's (the batch norm's parameters in float32, as autocast leaves them)."""
    assume(all(s + 2 * p >= kernel for s, p in zip(size, padding)))
    assume(applies(in_channels, out_channels, size, padding, kernel))
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(batch, in_channels, *size, generator=generator).bfloat16()
    weight = (torch.randn(out_channels, in_channels, kernel, kernel, generator=generator) / 10).bfloat16()
    bn_weight, bn_bias = 0.5 + torch.rand(in_channels, generator=generator), torch.randn(in_channels, generator=generator)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    grad_output = None

    def run(function, dtype):
        nonlocal grad_output
        leaves = [t.to(dtype if t.dtype == torch.bfloat16 else None).requires_grad_() for t in (input, bn_weight, bn_bias, weight)]
        if dtype == torch.float64:
            leaves = [t.detach().double().requires_grad_() for t in leaves]
        output = function(leaves[0], None, None, *leaves[1:], None, training=True, padding=padding)
        if grad_output is None:
            grad_output = torch.randn(output.shape, generator=generator).bfloat16()
        return output, torch.autograd.grad(output, leaves, grad_output.to(output.dtype))

    def native(input, running_mean, running_var, bn_weight, bn_bias, weight, bias, training, padding):
        normalised = F.batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training)
        return F.conv2d(F.relu(normalised), weight, bias, padding=padding)

    ours, ours_grads = run(batch_norm_relu_conv2d, torch.bfloat16)
    theirs, native_grads = run(native, torch.bfloat16)
    exact, exact_grads = run(native, torch.float64)
    assert ours.dtype == theirs.dtype and ours.stride() == theirs.stride()
    assert_no_worse_than_native(ours, theirs, exact, "output", rtol=1e-2, atol=1e-2)
    for name, mine, native_grad, reference in zip(("input", "bn_weight", "bn_bias", "weight"), ours_grads, native_grads, exact_grads):
        assert mine.dtype == native_grad.dtype and mine.stride() == native_grad.stride(), name
        assert_no_worse_than_native(mine, native_grad, reference, f"grad {name}", rtol=1e-2, atol=1e-2)
