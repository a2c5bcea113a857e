"""cifarnet's dropout against an independent Philox4x32-10 in Python (checked against the
generator's published known-answer vectors) and native dropout's arithmetic (checked against
native dropout itself); its statistics, determinism, autograd, opcheck and torch.compile, with
an explicit seed and with the masks torch's generators key (a CUDA graph's replays:
tests/test_cuda_graphs.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import cifarnet
from cifarnet.study.models import ConvNet
from conftest import DEVICES

DROPOUT = torch.ops.cifarnet.dropout.default
DROPOUT_FORWARD = torch.ops.cifarnet._dropout_forward.default
DROPOUT_BACKWARD = torch.ops.cifarnet._dropout_backward.default
GENERATOR_STREAMS = 2**63  # philox.h: the streams of the masks a generator keys
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Philox4x32-10 (Salmon et al., SC 2011), written from the paper's definition.
_M0, _M1, _W0, _W1, _LOW = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox4x32_10(counter: list[int], key: list[int]) -> list[int]:
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & _LOW, p1 & _LOW, ((p0 >> 32) ^ c3 ^ k1) & _LOW, p0 & _LOW
        k0, k1 = (k0 + _W0) & _LOW, (k1 + _W1) & _LOW
    return [c0, c1, c2, c3]


def test_reference_philox_gives_the_published_known_answers():
    # Random123's kat_vectors for philox4x32_10.
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([_LOW] * 4, [_LOW] * 2) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0]) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1,
    ]  # fmt: skip


def reference_keep(numel: int, seed: int, p: float, stream: int = 0) -> torch.Tensor:
    """The documented mask: element e takes word (e % 32) // 8 of the block at counter
    8 * (e // 32) + e % 8 (the low 64 bits; the high 64 bits are the stream: 0 for an explicit
    seed), keyed by the seed's 64 bits; kept where the word >= round(p * 2^32)."""
    key = seed & 0xFFFFFFFFFFFFFFFF
    key_words = [key & _LOW, key >> 32]
    threshold = math.floor(p * 2**32 + 0.5)
    keep = []
    blocks: dict[int, list[int]] = {}
    for e in range(numel):
        counter = 8 * (e // 32) + e % 8
        if counter not in blocks:
            blocks[counter] = philox4x32_10([counter & _LOW, counter >> 32, stream & _LOW, stream >> 32], key_words)
        keep.append(blocks[counter][(e % 32) // 8] >= threshold)
    return torch.tensor(keep, dtype=torch.bool)


def native_arithmetic(input: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """What native CPU dropout computes with this mask: a noise tensor of the input's dtype
    (0 or 1) divided by 1 - p, times the input (test_native_arithmetic... checks this)."""
    noise = keep.reshape(input.shape).to(input.dtype)
    noise.div_(1 - p)
    return input * noise


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64)


def seed_offset_tensor(seed: int, offset: int, device="cpu") -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64, device=device)


def generator_stream(offset: int) -> int:
    return GENERATOR_STREAMS + offset // 4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.7])
def test_native_arithmetic_is_what_native_dropout_computes(dtype, p):
    """The reference above, against native dropout itself: its output for ones is its noise,
    and its output for any input is that input times the same noise."""
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.manual_seed(7)
    noise = F.dropout(torch.ones_like(x), p, True)
    torch.manual_seed(7)
    native = F.dropout(x, p, True)
    keep = noise != 0
    assert torch.equal(native_arithmetic(x, keep, p), native)
    assert torch.equal(noise, native_arithmetic(torch.ones_like(x), keep, p))


SPECIAL = [0.0, -0.0, 1.0, -2.5, 3e38, float("inf"), -float("inf"), float("nan"), 1e-40]
# Sampled, not st.integers: beside five other arguments hypothesis drew integers' lower bound in
# nearly half the examples (an empty tensor, 17 of 40). The empty tensor is one explicit example.
NUMELS = st.sampled_from(range(1, 301))


@settings(max_examples=40, deadline=None)
@example(numel=0, seed=7, p=0.5, dtype=torch.float32, specials=[], device="cpu")
@given(
    numel=NUMELS,
    seed=st.integers(-(2**63), 2**63 - 1),
    p=st.sampled_from([0.0, 1e-9, 0.25, 0.5, 0.9, 1 - 1e-9]) | st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from(DTYPES),
    specials=st.lists(st.sampled_from(SPECIAL), max_size=20),
    device=st.sampled_from(DEVICES),
)
def test_output_is_the_reference_mask_with_native_arithmetic(numel, seed, p, dtype, specials, device):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=torch.float64)
    values[: len(specials)] = torch.tensor(specials[:numel], dtype=torch.float64)
    x = values.to(dtype)
    output = DROPOUT(x.to(device), seed_tensor(seed), p).cpu()
    expected = native_arithmetic(x, reference_keep(numel, seed, p), p)
    torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)
    # x * 0 keeps -0. A NaN's sign is left out: native's own differs between its paths (bfloat16
    # rounding in ATen's vector loop keeps the sign of inf * 0's negative NaN, its scalar tail
    # makes every NaN positive, so a 32-element bfloat16 tensor's first NaN is negative and a
    # 31-element one's positive).
    number = ~expected.isnan()
    assert torch.equal(output.signbit()[number], expected.signbit()[number])


def test_large_tensor_threaded_matches_the_reference():
    """Over 2^17 elements, so the kernel splits the work over threads and vector groups."""
    numel, seed, p = 2**17 + 77, 2**40 + 3, 0.3
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = DROPOUT(x, seed_tensor(seed), p)
        torch.set_num_threads(1)
        one = DROPOUT(x, seed_tensor(seed), p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert torch.equal(two, native_arithmetic(x, reference_keep(numel, seed, p), p))


@settings(max_examples=30, deadline=None)
@example(numel=0, seed=7, offset=8, p=0.5, dtype=torch.float32, device="cpu")
@given(
    numel=NUMELS,
    seed=st.integers(-(2**63), 2**63 - 1),
    offset=st.integers(0, 2**61 - 1).map(lambda quarter: 4 * quarter),  # torch's offsets: multiples of 4
    p=st.sampled_from([0.0, 0.25, 0.5, 1 - 1e-9]) | st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from(DTYPES),
    device=st.sampled_from(DEVICES),
)
def test_a_generators_seed_and_offset_key_the_reference_mask_of_their_stream(numel, seed, offset, p, dtype, device):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel), dtype=torch.float64).to(dtype)
    output = DROPOUT_BACKWARD(x.to(device), seed_offset_tensor(seed, offset, device), p).cpu()
    expected = native_arithmetic(x, reference_keep(numel, seed, p, generator_stream(offset)), p)
    torch.testing.assert_close(output, expected, rtol=0, atol=0, equal_nan=True)


def test_a_generators_mask_is_the_same_for_any_thread_count():
    """Over 2^17 elements, so the kernel splits the work over threads; the first elements
    against the reference (an element's word does not depend on the tensor's size)."""
    numel, seed, offset, p = 2**17 + 77, -(2**40) - 3, 2**50 + 8, 0.3
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    key = seed_offset_tensor(seed, offset)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = DROPOUT_BACKWARD(x, key, p)
        torch.set_num_threads(1)
        one = DROPOUT_BACKWARD(x, key, p)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    head = 4096
    assert torch.equal(two[:head], native_arithmetic(x[:head], reference_keep(head, seed, p, generator_stream(offset)), p))


def generator_state(device: str) -> torch.Tensor:
    return torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()


def set_generator_state(device: str, state: torch.Tensor) -> None:
    if device == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state)


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_seed_the_mask_follows_the_devices_generator(device):
    x = torch.randn(4000, device=device) + 10  # no zeros: a zero output is a dropped element
    torch.manual_seed(3)
    first, second = DROPOUT(x, None, 0.5), DROPOUT(x, None, 0.5)
    assert not torch.equal(first, second)
    torch.manual_seed(3)
    assert torch.equal(DROPOUT(x, None, 0.5), first)
    state = generator_state(device)
    again = DROPOUT(x, None, 0.5)
    set_generator_state(device, state)
    assert torch.equal(DROPOUT(x, None, 0.5), again)
    kept = first != 0
    assert torch.equal(first[kept], x[kept] * torch.tensor(2.0, device=device))
    assert abs(kept.float().mean().item() - 0.5) < 6 * math.sqrt(0.25 / x.numel())


@pytest.mark.parametrize("device", DEVICES)
def test_the_forward_op_returns_the_seed_and_offset_its_backward_reapplies(device):
    x = torch.randn(7, 45, device=device)
    torch.manual_seed(11)
    output, seed_offset = DROPOUT_FORWARD(x, 0.4)
    assert seed_offset.shape == (2,) and seed_offset.dtype == torch.int64 and seed_offset.device == x.device
    assert torch.equal(DROPOUT_BACKWARD(x, seed_offset, 0.4), output)
    torch.manual_seed(11)
    assert torch.equal(DROPOUT(x, None, 0.4), output), "the op without autograd draws the same mask"
    empty_output, empty_seed_offset = DROPOUT_FORWARD(torch.empty(0, 3, device=device), 0.4)
    assert empty_output.shape == (0, 3) and empty_seed_offset.shape == (2,)


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_seed_the_backward_applies_the_forward_mask(device):
    x = torch.randn(10, 70, dtype=torch.float64, device=device, requires_grad=True)
    output = DROPOUT(x, None, 0.3)
    DROPOUT(x.detach(), None, 0.3)  # the generator moves on before the backward
    grad = torch.randn_like(output)
    output.backward(grad)
    keep = output != 0  # x has no zeros
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(x.grad, native_arithmetic(grad, keep, 0.3))


@pytest.mark.parametrize("device", DEVICES)
def test_without_a_seed_gradcheck_second_derivatives_and_forward_ad(device):
    x = torch.randn(6, 9, dtype=torch.float64, device=device, requires_grad=True)

    def op(t):
        torch.manual_seed(8)  # one mask for every evaluation of the checks
        return DROPOUT(t, None, 0.4)

    assert torch.autograd.gradcheck(op, (x,))
    assert torch.autograd.gradgradcheck(op, (x,))
    scaled_mask = op(torch.ones_like(x)).detach()
    tangent = torch.randn_like(x)
    with fwAD.dual_level():
        output = fwAD.unpack_dual(op(fwAD.make_dual(x.detach(), tangent)))
    torch.testing.assert_close(output.primal, x.detach() * scaled_mask, rtol=0, atol=0)
    torch.testing.assert_close(output.tangent, tangent * scaled_mask, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_mask_statistics(p):
    """Kept fraction, and pairs of elements at the distances the layout could correlate
    (neighbours, the next word of a block, the next group, another seed) kept together with
    probability (1 - p)^2: all within 6 standard deviations."""
    n = 2**20
    keep = DROPOUT(torch.ones(n), seed_tensor(12345), p) != 0
    q = 1 - p

    def assert_rate(observed: torch.Tensor, rate: float, what: str) -> None:
        count = observed.numel()
        sigma = math.sqrt(rate * (1 - rate) / count)
        assert abs(observed.double().mean().item() - rate) < 6 * sigma, what

    assert_rate(keep, q, "kept fraction")
    for distance in (1, 8, 32, 256):
        assert_rate(keep[:-distance] & keep[distance:], q * q, f"kept together at distance {distance}")
    other = DROPOUT(torch.ones(n), seed_tensor(12346), p) != 0
    assert_rate(keep & other, q * q, "kept under two neighbouring seeds")


@pytest.mark.parametrize("device", DEVICES)
def test_the_mask_follows_the_logical_index_whatever_the_layout(device):
    x = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(2)).to(device)
    seed = seed_tensor(99)
    contiguous = DROPOUT(x, seed, 0.4)
    channels_last = DROPOUT(x.contiguous(memory_format=torch.channels_last), seed, 0.4)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(channels_last, contiguous)
    transposed = DROPOUT(x.transpose(1, 3), seed, 0.4)
    assert torch.equal(transposed, DROPOUT(x.transpose(1, 3).contiguous(), seed, 0.4))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_and_cuda_give_the_same_output(dtype):
    x = torch.randn(1000003, generator=torch.Generator().manual_seed(3)).to(dtype)
    seed = seed_tensor(-5)
    assert torch.equal(DROPOUT(x.cuda(), seed, 0.5).cpu(), DROPOUT(x, seed, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_applies_the_forward_mask(device):
    x = torch.randn(10, 70, dtype=torch.float64, device=device, requires_grad=True)
    seed = seed_tensor(31)
    output = DROPOUT(x, seed, 0.3)
    grad = torch.randn_like(output)
    output.backward(grad)
    keep = reference_keep(x.numel(), 31, 0.3).to(device)
    assert torch.equal(x.grad, native_arithmetic(grad, keep, 0.3))
    assert torch.equal(output != 0, keep.reshape(output.shape) & (x != 0))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_keeps_the_forward_mask_when_the_seed_tensor_is_advanced_in_place(device):
    """One seed tensor advanced in place between two layers (issue 25): each backward applies
    the mask its own forward drew, not the one the seed holds at backward time."""
    p = 0.5
    x = torch.randn(8, 64, dtype=torch.float64, device=device, requires_grad=True)
    seed = seed_tensor(31)
    hidden = DROPOUT(x, seed, p)
    seed.add_(1)
    output = DROPOUT(hidden, seed, p)
    seed.add_(1)
    first, second = (reference_keep(x.numel(), s, p).reshape(x.shape).to(device) for s in (31, 32))
    assert not torch.equal(first, second)
    grad = torch.randn_like(output)
    output.backward(grad)
    assert torch.equal(x.grad, native_arithmetic(native_arithmetic(grad, second, p), first, p))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device):
    x = torch.randn(6, 9, dtype=torch.float64, device=device, requires_grad=True)
    seed = seed_tensor(8)
    assert torch.autograd.gradcheck(lambda t: DROPOUT(t, seed, 0.4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: DROPOUT(t, seed, 0.4), (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    generator = torch.Generator().manual_seed(5)
    for shape, memory_format in [((7,), None), ((4, 33), None), ((2, 3, 5, 4), torch.channels_last), ((0, 3), None)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(shape, generator=generator).to(dtype).to(device)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            for p in (0.0, 0.5, 1.0):
                torch.library.opcheck(DROPOUT, (x.requires_grad_(dtype != torch.bfloat16), seed_tensor(3), p))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_without_a_seed(device):
    generator = torch.Generator().manual_seed(6)
    for shape, memory_format in [((7,), None), ((4, 33), None), ((2, 3, 5, 4), torch.channels_last), ((0, 3), None)]:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = torch.randn(shape, generator=generator).to(dtype).to(device)
            if memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            for p in (0.0, 0.5, 1.0):
                torch.library.opcheck(DROPOUT, (x.clone().requires_grad_(dtype != torch.bfloat16), None, p))
                torch.library.opcheck(DROPOUT_FORWARD, (x, p))
                torch.library.opcheck(DROPOUT_BACKWARD, (x, seed_offset_tensor(3, 64, device), p))


def test_schema_seed_is_optional_and_the_random_ops_are_tagged():
    """nondeterministic_seeded, as native dropout: torch.compile must neither fold the op into a
    constant nor recompute it in the backward; the backward of a saved key is deterministic."""
    seed = DROPOUT._schema.arguments[1]
    assert seed.name == "seed" and isinstance(seed.type, torch.OptionalType) and seed.default_value is None
    assert torch.Tag.nondeterministic_seeded in DROPOUT.tags
    assert torch.Tag.nondeterministic_seeded in DROPOUT_FORWARD.tags
    assert torch.Tag.nondeterministic_seeded not in DROPOUT_BACKWARD.tags
    output = torch.ops.cifarnet.dropout(torch.ones(1000))  # p=0.5 by default
    assert set(output.unique().tolist()) == {0.0, 2.0}


def test_functional_follows_f_dropout_outside_training_and_at_the_ends():
    x = torch.tensor([1.0, -2.0, float("nan"), float("inf"), 0.0])
    assert cifarnet.ops.dropout(x, 0.5, training=False) is x
    assert cifarnet.ops.dropout(x, 0.0) is x
    dropped = cifarnet.ops.dropout(x, 1.0)
    torch.testing.assert_close(dropped, F.dropout(x, 1.0, True), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dropped.signbit(), F.dropout(x, 1.0, True).signbit())
    empty = torch.empty(0, 4)
    assert cifarnet.ops.dropout(empty, 0.5).shape == (0, 4)


def test_functional_draws_its_seed_from_torch_generators():
    x = torch.randn(1000)
    torch.manual_seed(3)
    first = cifarnet.ops.dropout(x, 0.5)
    second = cifarnet.ops.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(cifarnet.ops.dropout(x, 0.5), first)
    assert not torch.equal(first, second)
    generator = torch.Generator().manual_seed(11)
    again = torch.Generator().manual_seed(11)
    assert torch.equal(cifarnet.ops.dropout(x, 0.5, generator=generator), cifarnet.ops.dropout(x, 0.5, generator=again))


def test_seeds_span_the_64_bit_range_and_every_call_draws_another_mask():
    generator = torch.Generator().manual_seed(5)
    seeds = torch.cat([cifarnet.ops.dropout_seed(generator) for _ in range(2000)])
    assert seeds.dtype == torch.int64 and seeds.device.type == "cpu"
    assert seeds.unique().numel() == 2000
    assert (seeds < 0).any() and (seeds > 0).any()
    assert (seeds.abs() > 2**62).sum() > 800  # half of them, where the high bits are drawn
    again = torch.Generator().manual_seed(5)
    assert torch.equal(cifarnet.ops.dropout_seed(again), seeds[:1])
    # A study epoch's calls (390 batches): as many masks as calls.
    torch.manual_seed(0)
    masks = {tuple(cifarnet.ops.dropout(torch.ones(64), 0.5).bool().tolist()) for _ in range(390)}
    assert len(masks) == 390


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: cifarnet.ops.dropout(torch.ones(3), 1.5), ValueError, "between 0 and 1, but got 1.5"),
        # a RuntimeError, as F.dropout raises it for NaN (its range check lets NaN through to ATen's)
        (lambda: cifarnet.ops.dropout(torch.ones(3), float("nan")), RuntimeError, "between 0 and 1, but got nan"),
        (lambda: cifarnet.ops.dropout(torch.ones(3, dtype=torch.int64), 0.5), RuntimeError, "must be float32, float64, bfloat16 or float16, got Long"),
        (lambda: DROPOUT(torch.ones(3), torch.tensor([1, 2]), 0.5), RuntimeError, "one-element int64 tensor on the CPU, got a Long tensor of 2 elements"),
        (lambda: DROPOUT(torch.ones(3), torch.tensor([1.0]), 0.5), RuntimeError, "got a Float tensor of 1 elements"),
        (lambda: DROPOUT(torch.ones(3), seed_tensor(1), -0.1), RuntimeError, "between 0 and 1, got -0.1"),
        (lambda: DROPOUT_BACKWARD(torch.ones(3), seed_tensor(1), 0.5), RuntimeError, "seed_offset must be an int64 tensor of 2 elements on grad_output's device"),
        (lambda: DROPOUT_BACKWARD(torch.ones(3, dtype=torch.int64), seed_offset_tensor(1, 0), 0.5), RuntimeError, "dropout grad_output must be float32"),
    ],
)  # fmt: skip
def test_bad_arguments_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        call()


def test_torch_compile_draws_masks_of_the_right_kind():
    x = torch.randn(64, 100) + 3  # no zeros: a zero output is a dropped element
    compiled = torch.compile(lambda t: cifarnet.ops.dropout(t, 0.25), fullgraph=True)
    output = compiled(x)
    kept = output != 0
    assert torch.equal(output[kept], x[kept] * torch.tensor(1 / 0.75, dtype=torch.float32))
    assert abs(kept.float().mean().item() - 0.75) < 6 * math.sqrt(0.75 * 0.25 / x.numel())
    assert not torch.equal(compiled(x), output)  # a new seed every call


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_without_a_seed_follows_the_generator_as_eager_does(device):
    x = torch.randn(64, 100, device=device) + 3
    compiled = torch.compile(lambda t: DROPOUT(t, None, 0.25), fullgraph=True)
    compiled(x)  # compiled before the generator is seeded
    torch.manual_seed(2)
    eager = DROPOUT(x, None, 0.25)
    torch.manual_seed(2)
    assert torch.equal(compiled(x), eager)
    assert not torch.equal(compiled(x), compiled(x))


def test_torch_compile_does_not_bake_a_mask_into_a_graph_of_constants():
    compiled = torch.compile(lambda: DROPOUT(torch.ones(1000), None, 0.5), fullgraph=True)
    assert not torch.equal(compiled(), compiled())


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_backward_applies_the_forward_mask(device):
    """The backward graph reads the forward's seed and offset: it neither recomputes the
    forward nor draws again."""
    compiled = torch.compile(lambda t: DROPOUT(t, None, 0.3), fullgraph=True)
    x = (torch.randn(16, 90, device=device) + 10).requires_grad_()
    output = compiled(x)
    DROPOUT(x.detach(), None, 0.3)  # the generator moves on before the backward
    grad = torch.randn_like(output)
    output.backward(grad)
    keep = output != 0
    assert 0 < keep.sum() < keep.numel()
    assert torch.equal(x.grad, native_arithmetic(grad, keep, 0.3))


def test_module_is_a_drop_in_nn_dropout():
    module = cifarnet.nn.Dropout(0.3)
    assert isinstance(module, nn.Dropout) and module.state_dict() == {}
    x = torch.randn(50, 40) + 3
    kept = module(x) != 0
    assert 0.5 < kept.float().mean().item() < 0.9
    module.eval()
    assert module(x) is x
    native = module.to_native()
    assert type(native) is nn.Dropout and native.p == 0.3 and not native.training
    back = cifarnet.nn.Dropout.from_dropout(nn.Dropout(0.2, inplace=True))
    assert back.p == 0.2 and back.inplace and back.training
    y = x.clone()
    assert back(y) is y and (y == 0).any()
    unfused = cifarnet.unfuse(nn.Sequential(nn.Linear(4, 4), cifarnet.nn.Dropout(0.2)))
    assert type(unfused[1]) is nn.Dropout and unfused[1].p == 0.2


def test_the_fused_convnet_uses_it_and_the_native_one_does_not():
    assert isinstance(ConvNet("dropout", "fused").dropout, cifarnet.nn.Dropout)
    assert type(ConvNet("dropout", "native").dropout) is nn.Dropout
