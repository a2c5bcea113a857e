"""cifarnet.ops.batch_norm and cifarnet.nn.BatchNorm1d/2d against native batch norm."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import cifarnet
from cifarnet.ops import batch_norm
from cifarnet._op_handles import BN_BACKWARD_OP, BN_FORWARD_OP
from conftest import DEVICES, EVALUATION_EPS_MESSAGE, TRAINING_EPS_MESSAGE
from op_cases import assert_no_worse_than_native

EXAMPLES = int(os.environ.get("CIFARNET_EXAMPLES", 100))


@st.composite
def batch_norm_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 4, 5]))
    training = draw(st.booleans())
    # Up to 80 channels: the CPU kernels reduce channels-last data in register blocks of up
    # to 64 channels, then single vectors, then one channel at a time.
    channels = draw(st.one_of(st.integers(1, 20), st.integers(21, 80)))
    shape = [draw(st.integers(2 if training else 1, 5)), channels]
    shape += [draw(st.integers(1, 6)) for _ in range(rank - 2)]
    return dict(
        shape=shape,
        channels_last=rank == 4 and draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        training=training,
        running_stats=draw(st.booleans()) or not training,
        affine=draw(st.booleans()),
        momentum=draw(st.sampled_from([0.1, 0.5, 1.0, 0.0])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        offset=draw(st.sampled_from([0.0, 1e3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def case_tensors(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, channels = case["dtype"], case["shape"][1]
    # float64 data, rounded to the case's dtype: the float64 composition is then the exact
    # reference for both dtypes.
    input = torch.randn(case["shape"], generator=generator, dtype=torch.float64) + case["offset"]
    input = input.to(dtype).to(device)
    if case["channels_last"]:
        input = input.contiguous(memory_format=torch.channels_last)
    weight = bias = None
    if case["affine"]:
        weight = torch.randn(channels, generator=generator, dtype=dtype).to(device)
        bias = torch.randn(channels, generator=generator, dtype=dtype).to(device)
    running = None
    if case["running_stats"]:
        running = (
            torch.randn(channels, generator=generator, dtype=dtype).to(device) + case["offset"],
            torch.rand(channels, generator=generator, dtype=dtype).to(device) + 0.5,
        )
    return input, weight, bias, running, generator


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=EXAMPLES, deadline=None)
@given(case=batch_norm_cases())
def test_matches_native(case, device):
    """Output, running statistics and gradients: as close to exact as native batch norm is."""
    input, weight, bias, running, generator = case_tensors(case, device)
    dtype = case["dtype"]
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    args = dict(training=case["training"], momentum=case["momentum"], eps=case["eps"])
    grad = torch.randn(input.shape, generator=generator, dtype=torch.float64).to(device)

    def run(function, run_dtype):
        leaves = [t.detach().to(run_dtype).requires_grad_() for t in [input] + ([weight, bias] if case["affine"] else [])]
        stats = [t.detach().to(run_dtype).clone() for t in running] if running else [None, None]
        weight_, bias_ = (leaves[1], leaves[2]) if case["affine"] else (None, None)
        output = function(leaves[0], stats[0], stats[1], weight_, bias_, **args)
        grads = torch.autograd.grad(output, leaves, grad.to(run_dtype))
        return output, stats, grads

    ours, ours_stats, ours_grads = run(batch_norm, dtype)
    native, native_stats, native_grads = run(F.batch_norm, dtype)
    reference, reference_stats, reference_grads = run(F.batch_norm, torch.float64)

    assert ours.dtype == dtype and ours.shape == input.shape
    assert ours.is_contiguous(memory_format=torch.channels_last if case["channels_last"] else torch.contiguous_format)
    assert_no_worse_than_native(ours, native, reference, "output", **tolerance)
    if running:
        for name, mine, theirs, exact in zip(("running_mean", "running_var"), ours_stats, native_stats, reference_stats):
            assert_no_worse_than_native(mine, theirs, exact, name, **tolerance)
    for name, mine, theirs, exact in zip(("grad input", "grad weight", "grad bias"), ours_grads, native_grads, reference_grads):
        assert_no_worse_than_native(mine, theirs, exact, name, **tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_offset_keeps_the_variance(device, dtype, channels_last):
    # mean 1e3, std 1: a naive float32 E[x^2] - E[x]^2 loses the variance entirely. 72
    # channels: channels-last sums go through register blocks, single vectors and the tail.
    generator = torch.Generator().manual_seed(0)
    input = (torch.randn(64, 72, 16, 16, generator=generator, dtype=torch.float64) + 1e3).to(dtype).to(device)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    running_mean, running_var = torch.zeros(72, dtype=dtype, device=device), torch.ones(72, dtype=dtype, device=device)
    batch_norm(input, running_mean, running_var, training=True, momentum=1.0)
    expected_var = input.double().var(dim=(0, 2, 3), unbiased=True)
    torch.testing.assert_close(running_var.double(), expected_var, rtol=1e-5, atol=1e-6)


@pytest.fixture
def streaming_threshold():
    """Sets the bytes above which the CPU passes stream their stores (the last-level cache
    size, overridden); restores the machine's caches."""
    machine = cifarnet._C._cache_sizes()

    def set_threshold(bytes):
        cifarnet._C._set_cache_sizes(l1d_bytes=machine["l1d_bytes"], l2_bytes=machine["l2_bytes"], llc_bytes=bytes)
        assert cifarnet._C._streaming_store_threshold_bytes() == bytes

    yield set_threshold
    cifarnet._C._set_cache_sizes()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("stream", [False, True])
def test_streaming_and_cached_passes_match_native(streaming_threshold, channels_last, stream):
    # A normalising or input-gradient pass over more than the last-level cache writes with
    # non-temporal stores. The threshold is lowered (or stores never stream) so that a small
    # tensor takes each path on any machine; the verdict is against float64, by native's own
    # float32 error.
    streaming_threshold(64 * 1024 if stream else 0)
    batch, channels, size = 12, 32, 16  # 384 KiB in float32: every pass is over the threshold
    generator = torch.Generator().manual_seed(7)
    input = torch.randn(batch, channels, size, size, generator=generator) * 3 + 2
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    input = input.contiguous(memory_format=memory_format)
    weight, bias = torch.rand(channels, generator=generator) + 0.5, torch.randn(channels, generator=generator)
    grad = torch.randn(input.shape, generator=generator).contiguous(memory_format=memory_format)
    results = {}
    for name, function, dtype in (("ours", batch_norm, torch.float32), ("native", F.batch_norm, torch.float32), ("reference", F.batch_norm, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (input, weight, bias)]
        output = function(leaves[0], None, None, leaves[1], leaves[2], training=True)
        results[name] = (output, *torch.autograd.grad(output, leaves, grad.to(dtype)))
        if name == "ours":
            assert output.is_contiguous(memory_format=memory_format)
    for index, what in enumerate(("output", "grad input", "grad weight", "grad bias")):
        assert_no_worse_than_native(results["ours"][index], results["native"][index], results["reference"][index], what, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_running_stats_views_update_in_place(device, dtype):
    # Every other element of larger buffers: updated in place as native updates them, the
    # elements in between left alone.
    generator = torch.Generator().manual_seed(5)
    input = torch.randn(6, 5, 4, 4, generator=generator, dtype=dtype).to(device)
    initial = torch.rand(2, 10, generator=generator, dtype=dtype).to(device) + 0.5
    buffers = {"ours": initial.clone(), "native": initial.clone()}
    for _ in range(3):
        batch_norm(input, buffers["ours"][0, ::2], buffers["ours"][1, ::2], training=True, momentum=0.3)
        F.batch_norm(input, buffers["native"][0, ::2], buffers["native"][1, ::2], training=True, momentum=0.3)
    assert not torch.equal(buffers["ours"], initial)
    torch.testing.assert_close(buffers["ours"], buffers["native"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64(device, training, channels_last):
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(3, 4, 5, 3, dtype=torch.float64, generator=generator).to(device)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, dtype=torch.float64, generator=generator).to(device)
    bias = torch.randn(4, dtype=torch.float64, generator=generator).to(device)
    running_mean = torch.randn(4, dtype=torch.float64, generator=generator).to(device)
    running_var = torch.rand(4, dtype=torch.float64, generator=generator).to(device) + 0.5

    def fn(x, w, b):
        # fresh copies: the running statistics must not drift between gradcheck's evaluations
        return batch_norm(x, running_mean.clone(), running_var.clone(), w, b, training=training)

    inputs = tuple(t.requires_grad_() for t in (input, weight, bias))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    generator = torch.Generator().manual_seed(4)
    for shape, memory_format in [((4, 3), torch.contiguous_format), ((3, 5, 4, 2), torch.channels_last), ((2, 3, 7), torch.contiguous_format)]:
        for dtype in (torch.float32, torch.float64):
            input = torch.randn(shape, dtype=dtype, generator=generator).to(device)
            if len(shape) == 4:
                input = input.contiguous(memory_format=memory_format)
            channels = shape[1]
            weight = torch.randn(channels, dtype=dtype, generator=generator).to(device)
            bias = torch.randn(channels, dtype=dtype, generator=generator).to(device)
            mean = torch.randn(channels, dtype=dtype, generator=generator).to(device)
            var = torch.rand(channels, dtype=dtype, generator=generator).to(device) + 0.5
            for training, relu in ((True, False), (False, False), (True, True), (False, True)):
                args = (input.requires_grad_(), None if training else mean, None if training else var, weight.requires_grad_(), bias, training, 1e-5, relu)
                torch.library.opcheck(BN_FORWARD_OP, args)
                output, save_mean, save_var = BN_FORWARD_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
                # With relu, the backward takes the gradient through it, from its output.
                relu_output = (output,) if relu else ()
                torch.library.opcheck(
                    BN_BACKWARD_OP,
                    (torch.randn_like(output), input.detach(), save_mean, save_var, weight.detach(), training, 1e-5, [True, True, False], *relu_output),
                )
            torch.library.opcheck(
                torch.ops.cifarnet._batch_norm_update_running_stats.default,
                (mean.clone(), var.clone(), mean * 2, var * 2, 0.1, 10),
            )


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_updates_running_stats(device):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = cifarnet.nn.BatchNorm2d(6).to(device)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for _ in range(3):
        input = torch.randn(4, 6, 5, 5, device=device, requires_grad=True)
        expected = eager(input)
        actual = compiled(input)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(torch.autograd.grad(actual.sum(), input)[0], torch.autograd.grad(expected.sum(), input)[0])
    torch.testing.assert_close(compiled_module.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_module.running_var, eager.running_var)
    assert compiled_module.num_batches_tracked.item() == eager.num_batches_tracked.item() == 3


def _bad_batch_norm_cases():
    x = torch.randn(4, 3, 5, 5)
    return [
        ("1-D input", dict(input=torch.randn(3)), "input must have at least 2 dimensions", RuntimeError),
        ("running_mean size", dict(running_mean=torch.zeros(4)), "running_mean should contain 3 elements", RuntimeError),
        ("weight size", dict(weight=torch.ones(2)), "weight should contain 3 elements", RuntimeError),
        ("one value per channel", dict(input=torch.randn(1, 3, 1, 1)), "Expected more than 1 value per channel when training", ValueError),
        ("integer input", dict(input=x.long()), "input must be float32, float64, float16 or bfloat16, got Long", RuntimeError),
        ("eval without running stats", dict(running_mean=None, running_var=None, training=False), "must be defined in evaluation mode", RuntimeError),
        # F.batch_norm's exception type
        ("only running_mean", dict(running_var=None), "both be given or both be None", ValueError),
        ("only running_var", dict(running_mean=None), "both be given or both be None", ValueError),
        # F.batch_norm's checks, with its exception type: a zero eps would divide by zero on a
        # constant channel in training.
        ("eps zero in training", dict(eps=0.0), TRAINING_EPS_MESSAGE, ValueError),
        ("eps negative in training", dict(eps=-1.0), TRAINING_EPS_MESSAGE, ValueError),
        ("eps negative in evaluation", dict(eps=-1.0, training=False), EVALUATION_EPS_MESSAGE, ValueError),
        # A tensor on another device takes the dispatch elsewhere (meta: the fake kernel): the
        # composite names it first, as native refuses it.
        ("meta weight", dict(weight=torch.ones(3, device="meta")), "weight is on meta but input is on cpu", RuntimeError),
        ("meta bias in evaluation", dict(bias=torch.ones(3, device="meta"), training=False), "bias is on meta but input is on cpu", RuntimeError),
        ("meta running statistics in evaluation", dict(running_mean=torch.zeros(3, device="meta"), running_var=torch.ones(3, device="meta"), training=False),
         "running_mean is on meta but input is on cpu", RuntimeError),
        ("running_mean requiring grad", dict(running_mean=torch.zeros(3, requires_grad=True)), "running_mean cannot have requires_grad=True", RuntimeError),
        ("running_var requiring grad in evaluation", dict(running_var=torch.ones(3, requires_grad=True), training=False),
         "running_var cannot have requires_grad=True", RuntimeError),
    ]


@pytest.mark.parametrize("name, overrides, message, error", _bad_batch_norm_cases(), ids=[c[0] for c in _bad_batch_norm_cases()])
def test_bad_input_raises_a_clear_error(name, overrides, message, error):
    args = dict(input=torch.randn(4, 3, 5, 5), running_mean=torch.zeros(3), running_var=torch.ones(3), training=True)
    args.update(overrides)
    with pytest.raises(error) as info:
        batch_norm(**args)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "module_args",
    [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False), dict(eps=1e-3, momentum=0.3)],
    ids=["default", "cumulative", "no-affine", "no-running-stats", "eps-momentum"],
)
@pytest.mark.parametrize("dims", [1, 2])
def test_modules_match_torch_nn_over_training_then_eval(device, module_args, dims):
    torch.manual_seed(0)
    native_class, our_class = (nn.BatchNorm1d, cifarnet.nn.BatchNorm1d) if dims == 1 else (nn.BatchNorm2d, cifarnet.nn.BatchNorm2d)
    native = native_class(5, **module_args).double().to(device)
    ours = our_class(5, **module_args).double().to(device)
    ours.load_state_dict(native.state_dict())
    if native.affine:
        with torch.no_grad():
            for module in (native, ours):
                module.weight.copy_(torch.linspace(0.5, 1.5, 5))
                module.bias.copy_(torch.linspace(-1, 1, 5))
    shape = (6, 5, 7) if dims == 1 else (6, 5, 4, 3)
    for step in range(4):
        input = torch.randn(shape, dtype=torch.float64, device=device) * (step + 1) + step
        torch.testing.assert_close(ours(input), native(input))
    assert set(ours.state_dict()) == set(native.state_dict())
    for key, value in native.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value)
    ours.eval(), native.eval()
    input = torch.randn(shape, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(input), native(input))


@pytest.mark.parametrize("channels_last", [False, True])
def test_an_infinite_first_element_gives_native_statistics(channels_last):
    # The statistics are shifted by an element of each channel; inf - inf would make them NaN.
    input = torch.randn(4, 2, 3, 3)
    input[0, 0, 0, 0] = float("inf")
    input[0, 1, 0, 0] = float("-inf")
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    ours, native = (torch.zeros(2), torch.ones(2)), (torch.zeros(2), torch.ones(2))
    batch_norm(input, *ours, training=True)
    F.batch_norm(input, *native, training=True)
    for mine, expected in zip(ours, native):
        torch.testing.assert_close(mine, expected, equal_nan=True)
    assert ours[0].isinf().all()


@pytest.mark.parametrize("dtype, stats_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_evaluation_double_backward_in_every_dtype(dtype, stats_dtype):
    # The saved statistics are float64 on the CPU; the double backward must hand native batch
    # norm the running statistics in their own dtype.
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(4, 3, 5, 5, generator=generator).to(dtype).requires_grad_()
    weight = (torch.rand(3, generator=generator) + 0.5).to(stats_dtype).requires_grad_()
    stats = torch.randn(3, generator=generator).to(stats_dtype), (torch.rand(3, generator=generator) + 0.5).to(stats_dtype)
    results = []
    for function in (batch_norm, F.batch_norm):
        output = function(input, *stats, weight, None, False)
        grads = torch.autograd.grad(output.float().pow(2).sum(), (input, weight), create_graph=True)
        results.append(torch.autograd.grad(sum(g.float().sum() for g in grads), (input, weight)))
    for ours, native in zip(*results):
        assert ours.dtype == native.dtype
        torch.testing.assert_close(ours, native, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_module_state_dict_loads_into_torch_nn():
    ours = cifarnet.nn.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2))
    native = nn.BatchNorm2d(3)
    native.load_state_dict(ours.state_dict())
    assert native.num_batches_tracked.item() == 1
    assert isinstance(ours, nn.BatchNorm2d)


# The ReLU fused into the private ops: _batch_norm_forward(relu=True) is relu(batch_norm(x)),
# _batch_norm_backward(relu_output=r) is batch norm's backward of threshold_backward(grad, r, 0).


@st.composite
def relu_cases(draw):
    rank = draw(st.sampled_from([2, 3, 4, 4]))
    training = draw(st.booleans())
    # Channels-last rows of up to 80 channels and channels-outer rows of up to 81 values: the
    # CPU loops' vectors, register blocks and scalar tails.
    channels = draw(st.one_of(st.integers(1, 20), st.integers(21, 80)))
    shape = [draw(st.integers(2 if training else 1, 3)), channels]
    shape += [draw(st.integers(1, 9 if rank == 4 else 40)) for _ in range(rank - 2)]
    return dict(
        shape=shape,
        channels_last=rank == 4 and draw(st.booleans()),
        # The ReLU's output in the other layout than the input's (the backward reads it in the
        # input's).
        relu_output_other_layout=rank == 4 and draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16])),
        training=training,
        affine=draw(st.booleans()),
        values=draw(st.sampled_from(["normal", "symmetric", "negative", "zeros", "nan"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def relu_case_tensors(case):
    """input, running statistics (evaluation) or None, weight, bias, float64, to be cast.
    "symmetric" makes each channel's batch mean exactly 0 and its zeros normalise to exactly 0
    (without affine), the ReLU's kink; "negative" shifts the output below zero, where the ReLU
    zeroes most of it; "zeros" makes constant channels; "nan" puts NaN in the input."""
    generator = torch.Generator().manual_seed(case["seed"])
    shape, channels, kind = case["shape"], case["shape"][1], case["values"]
    input = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "symmetric":
        half = torch.randint(-2, 3, shape, generator=generator).double()
        input = torch.cat([half, -half])  # 2N samples, each channel summing to 0
    elif kind == "zeros":
        input.zero_()
    elif kind == "nan":
        input[torch.rand(input.shape, generator=generator) < 0.1] = float("nan")
    weight = torch.randn(channels, generator=generator, dtype=torch.float64) if case["affine"] else None
    bias = torch.randn(channels, generator=generator, dtype=torch.float64) if case["affine"] else None
    if kind == "negative":
        bias = -1.0 - torch.rand(channels, generator=generator, dtype=torch.float64)
    running = None
    if not case["training"]:
        mean = torch.zeros(channels, dtype=torch.float64) if kind == "symmetric" else torch.randn(channels, generator=generator, dtype=torch.float64)
        running = (mean, torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5)
    if case["channels_last"]:
        input = input.contiguous(memory_format=torch.channels_last)
    return input, running, weight, bias, generator


def cast(t, dtype):
    return None if t is None else t.to(dtype)


def assert_same_bits(ours, theirs, name):
    """NaN in the same places, the same bits elsewhere (signed zeros included). NaNs' own bits
    are arithmetic's (torch.relu's bfloat16 path rewrites them), not compared."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
    nan = ours.isnan()
    assert torch.equal(nan, theirs.isnan()), f"{name}: NaN in other places"
    integers = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ours.element_size()]
    ours, theirs = (t.contiguous().view(integers)[~nan] for t in (ours, theirs))
    assert torch.equal(ours, theirs), f"{name}: {(ours != theirs).sum().item()} values differ in their bits"


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=relu_cases())
def test_relu_forward_is_torch_relu_of_the_batch_norm(case):
    """relu=True: bit for bit torch.relu of the op's own output (its NaNs, its -0s, and in
    bfloat16 its rounding first); as close to float64 as native relu(F.batch_norm) is."""
    input, running, weight, bias, _ = relu_case_tensors(case)
    dtype, training, eps = case["dtype"], case["training"], 1e-5
    args = (cast(running and running[0], dtype), cast(running and running[1], dtype), cast(weight, dtype), cast(bias, dtype), training, eps)
    x = input.to(dtype)
    rectified, save_mean, save_var = BN_FORWARD_OP(x, *args, True)
    normalised, unfused_mean, unfused_var = BN_FORWARD_OP(x, *args, False)
    assert_same_bits(rectified, torch.relu(normalised), "relu=True against torch.relu")
    assert rectified.stride() == normalised.stride()
    assert_same_bits(save_mean, unfused_mean, "save_mean")
    assert_same_bits(save_var, unfused_var, "save_var")

    def native(run_dtype):
        stats = [cast(t, run_dtype) for t in running] if running else [None, None]
        return F.relu(F.batch_norm(input.to(run_dtype), *stats, cast(weight, run_dtype), cast(bias, run_dtype), training, 0.0, eps))

    tolerance = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    assert_no_worse_than_native(rectified, native(dtype), native(torch.float64), "relu(batch_norm)", **tolerance)


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=relu_cases())
def test_relu_backward_is_threshold_backward_then_batch_norm_backward(case):
    """relu_output=r: bit for bit the op's own backward of threshold_backward(grad, r, 0) (the
    gradient passes where r > 0 or is NaN; -0, 0 and negatives stop it), and as close to float64
    as native's batch-norm backward of that gradient is."""
    input, running, weight, bias, generator = relu_case_tensors(case)
    dtype, training, eps = case["dtype"], case["training"], 1e-5
    x = input.to(dtype)
    stats = [cast(t, dtype) for t in running] if running else [None, None]
    relu_output, save_mean, save_var = BN_FORWARD_OP(x, *stats, cast(weight, dtype), cast(bias, dtype), training, eps, True)
    # The mask's edge values wherever the output has them, and a few more: -0, 0 and NaN.
    edges = torch.rand(relu_output.shape, generator=generator)
    relu_output = relu_output.masked_fill(edges < 0.05, -0.0).masked_fill(edges > 0.95, float("nan"))
    relu_output = relu_output.masked_fill((edges > 0.5) & (edges < 0.55), 0.0)
    if case["relu_output_other_layout"]:
        other = torch.contiguous_format if case["channels_last"] else torch.channels_last
        relu_output = relu_output.contiguous(memory_format=other)
    grad = torch.randn(input.shape, generator=generator, dtype=torch.float64)
    grad_relu = grad.to(dtype)
    output_mask = [True, case["affine"], case["affine"]]
    ours = BN_BACKWARD_OP(grad_relu, x, save_mean, save_var, cast(weight, dtype), training, eps, output_mask, relu_output)
    grad_normalised = torch.ops.aten.threshold_backward(grad_relu, relu_output, 0)
    composed = BN_BACKWARD_OP(grad_normalised, x, save_mean, save_var, cast(weight, dtype), training, eps, output_mask)
    for mine, theirs in zip(ours, composed):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert_same_bits(mine, theirs, "relu_output against threshold_backward")
            assert mine.stride() == theirs.stride()

    def native(run_dtype):
        leaves = [input.to(run_dtype).requires_grad_()] + ([weight.to(run_dtype).requires_grad_(), bias.to(run_dtype)] if case["affine"] else [])
        weight_, bias_ = (leaves[1], leaves[2]) if case["affine"] else (None, None)
        run_stats = [cast(t, run_dtype) for t in running] if running else [None, None]
        output = F.batch_norm(leaves[0], *run_stats, weight_, bias_, training, 0.0, eps)
        return torch.autograd.grad(output, leaves[:2], grad_normalised.to(run_dtype))

    tolerance = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}[dtype]
    for name, mine, theirs, exact in zip(("grad input", "grad weight"), ours, native(dtype), native(torch.float64)):
        assert_no_worse_than_native(mine, theirs, exact, name, **tolerance)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.float64, 1.0), (torch.float16, 1e-8), (torch.bfloat16, 1e-41)])
@pytest.mark.parametrize("training", [False, True])
def test_relu_keeps_negative_zero_and_nan_as_torch_relu(dtype, scale, training):
    """torch.relu gives -0 for -0 and NaN for NaN, and rectifies the batch norm's output after
    rounding it: a negative that rounds to -0 in float16 or bfloat16 stays -0 (relu before the
    rounding would give +0). Data and statistics exact: the output is scale * input, sign of
    zero included, in the op and natively alike."""
    values = torch.tensor([-0.0, 0.0, -1.0, 1.0, float("nan"), -2.0, 2.0, -0.0])
    if training:
        values = values.nan_to_num(0.0)  # one NaN would make the whole channel NaN
    input = values.repeat(5).reshape(5, 1, 8).to(dtype)  # mean 0, biased variance 1.25 (training)
    mean, var = torch.zeros(1), torch.ones(1)
    weight = torch.full((1,), scale * (1.25**0.5 if training else 1.0))
    bias = torch.full((1,), -0.0)
    parameters = dict(dtype=torch.float32) if dtype in (torch.float16, torch.bfloat16) else dict(dtype=dtype)
    mean, var, weight, bias = (t.to(**parameters) for t in (mean, var, weight, bias))
    eps = 2.0**-60 if not training else 1e-30  # evaluation: 1 / sqrt(1 + eps) rounds to 1
    stats = (None, None) if training else (mean, var)
    ours = BN_FORWARD_OP(input, *stats, weight, bias, training, eps, True)[0]
    native = F.relu(F.batch_norm(input, *stats, weight, bias, training, 0.0, eps))
    assert torch.equal(ours.isnan(), native.isnan())
    number = ~ours.isnan()  # a NaN's sign is arithmetic's, not the ReLU's
    assert torch.equal(torch.signbit(ours[number]), torch.signbit(native[number])), (ours, native)
    # The batch norm alone keeps the bias's -0 too (its vector path once broadcast it as +0).
    normalised = BN_FORWARD_OP(input, *stats, weight, bias, training, eps, False)[0]
    native_normalised = F.batch_norm(input, *stats, weight, bias, training, 0.0, eps)
    assert torch.equal(torch.signbit(normalised[number]), torch.signbit(native_normalised[number]))
    torch.testing.assert_close(ours, native, equal_nan=True)
    if scale == 1.0:
        assert torch.signbit(ours).any(), "the case must exercise -0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_forward_gradcheck_and_gradgradcheck_float64(device, training, channels_last):
    """The autograd formula of _batch_norm_forward(relu=True): its backward (through the fused
    backward), its forward-mode derivative and its second derivatives."""
    generator = torch.Generator().manual_seed(8)
    input = torch.randn(3, 4, 5, 3, dtype=torch.float64, generator=generator).to(device)
    if channels_last:
        input = input.contiguous(memory_format=torch.channels_last)
    weight = (torch.rand(4, dtype=torch.float64, generator=generator) + 0.5).to(device)
    bias = torch.randn(4, dtype=torch.float64, generator=generator).to(device)
    mean = torch.randn(4, dtype=torch.float64, generator=generator).to(device)
    var = (torch.rand(4, dtype=torch.float64, generator=generator) + 0.5).to(device)

    def fn(x, w, b):
        stats = (None, None) if training else (mean, var)
        return BN_FORWARD_OP(x, *stats, w, b, training, 1e-5, True)[0]

    inputs = tuple(t.requires_grad_() for t in (input, weight, bias))
    assert (fn(*inputs) == 0).any() and (fn(*inputs) > 0).any()
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-6)
