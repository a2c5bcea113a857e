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
from conftest import DEVICES
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
            for training in (True, False):
                args = (input.requires_grad_(), None if training else mean, None if training else var, weight.requires_grad_(), bias, training, 1e-5)
                torch.library.opcheck(BN_FORWARD_OP, args)
                output, save_mean, save_var = BN_FORWARD_OP(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
                torch.library.opcheck(
                    BN_BACKWARD_OP,
                    (torch.randn_like(output), input.detach(), save_mean, save_var, weight.detach(), training, 1e-5, [True, True, False]),
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
        ("only running_mean", dict(running_var=None), "both be given or both be None", RuntimeError),
        # F.batch_norm's checks, with its exception type: a zero eps would divide by zero on a
        # constant channel in training.
        ("eps zero in training", dict(eps=0.0), "eps must be positive during training", ValueError),
        ("eps negative in training", dict(eps=-1.0), "eps must be positive during training", ValueError),
        ("eps negative in evaluation", dict(eps=-1.0, training=False), "eps must be non-negative", ValueError),
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


def test_module_state_dict_loads_into_torch_nn():
    ours = cifarnet.nn.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2))
    native = nn.BatchNorm2d(3)
    native.load_state_dict(ours.state_dict())
    assert native.num_batches_tracked.item() == 1
    assert isinstance(ours, nn.BatchNorm2d)
