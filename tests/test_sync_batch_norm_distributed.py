"""Synchronized batch norm over two processes (gloo, CPU, float64) against one process that
holds the whole batch and computes it with native torch layers.

Each test spawns two processes once and runs all its cases in them; a case gives each process
its part of the same global batch (even, uneven, or one process with no samples). Each
process checks its own part of the output and of the input gradient; the parameter gradients
summed over the processes (DistributedDataParallel averages them: the gradient of the average
of the processes' losses) must equal the whole batch's gradient of the summed loss; the
running statistics must equal native's on every process. A last test compiles the layers
in a world of one process.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import cifarnet
from cifarnet.fuse import FusedConv2dBatchNormReLUMaxPool2d
from cifarnet.nn import (
    BatchNormReLUConv2d,
    Conv2dBatchNormReLUMaxPool2d,
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncConv2dBatchNormReLUMaxPool2d,
    convert_sync_batchnorm,
)
from conftest import DEVICES

WORLD_SIZE = 2
TOLERANCE = dict(rtol=1e-10, atol=1e-10)
# Per-process batch sizes: even, uneven, and a process with an empty batch.
SPLITS = [(4, 4), (3, 5), (0, 6)]


def run_on_processes(tmp_path, scenario: str, *args, processes: int = WORLD_SIZE) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"), scenario, processes, args), nprocs=processes, join=True)


def _worker(rank: int, store: str, scenario: str, processes: int, args: tuple) -> None:
    torch.set_num_threads(1)
    # gloo takes CUDA tensors too: the CUDA phase ops run synchronized with one GPU for both
    # processes, where NCCL would want one GPU each.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=processes)
    try:
        globals()[scenario](rank, *args)
    finally:
        dist.destroy_process_group()


def _randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator, dtype=torch.float64) * 2 - 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator, dtype=torch.float64))
    return model


def _native_stack() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.BatchNorm2d(6, momentum=None),
    ).double()  # fmt: skip
    return _randomise_batch_norms(model, 1)


def _check_against_whole_batch(rank, sizes, native, synced, pairs, input_shape, channels_last=False, steps=2, device="cpu"):
    """Trains ``native`` on the whole batch and ``synced`` on this process's part, ``steps``
    times, comparing outputs, gradients and buffers; ``pairs`` lists (native, synced)
    parameters and buffers that correspond (all on ``device``)."""
    start = sum(sizes[:rank])
    mine = slice(start, start + sizes[rank])
    for step in range(steps):
        generator = torch.Generator().manual_seed(100 * step + sum(sizes))
        whole = torch.randn(sum(sizes), *input_shape, dtype=torch.float64, generator=generator).to(device)
        native_input = whole.clone().requires_grad_()
        part = whole[mine].clone()
        if channels_last:
            part = part.contiguous(memory_format=torch.channels_last)
        part.requires_grad_()
        native.zero_grad(), synced.zero_grad()
        native_output = native(native_input)
        grad = torch.randn(native_output.shape, dtype=torch.float64, generator=generator).to(device)
        native_output.backward(grad)
        output = synced(part)
        output.backward(grad[mine])
        where = f"rank {rank}, batches {sizes}, step {step}"
        torch.testing.assert_close(output, native_output[mine], **TOLERANCE, msg=lambda m: f"{where}, output: {m}")
        torch.testing.assert_close(part.grad, native_input.grad[mine], **TOLERANCE, msg=lambda m: f"{where}, input grad: {m}")
        for index, (expected, parameter) in enumerate(pairs["parameters"]):
            summed = parameter.grad.clone()
            dist.all_reduce(summed)
            torch.testing.assert_close(summed, expected.grad, **TOLERANCE, msg=lambda m: f"{where}, parameter {index}: {m}")
        for index, (expected, buffer) in enumerate(pairs["buffers"]):
            torch.testing.assert_close(buffer, expected, **TOLERANCE, msg=lambda m: f"{where}, buffer {index}: {m}")


def _pairs(native: nn.Module, synced: nn.Module) -> dict:
    """Corresponding tensors of a model and its synchronized copy (the same order)."""
    return {
        "parameters": list(zip(native.parameters(), synced.parameters(), strict=True)),
        "buffers": list(zip(native.buffers(), synced.buffers(), strict=True)),
    }


def fused_stack_matches_native(rank, device):
    for sizes in SPLITS:
        for channels_last in (False, True):
            native = _native_stack().to(device)
            copied = copy.deepcopy(native)
            synced = nn.Sequential(
                SyncConv2dBatchNormReLUMaxPool2d.from_layer(Conv2dBatchNormReLUMaxPool2d.from_modules(copied[0], copied[1], copied[3])),
                SyncConv2dBatchNormReLUMaxPool2d.from_layer(Conv2dBatchNormReLUMaxPool2d.from_modules(copied[4], copied[5], copied[7])),
                SyncBatchNorm2d.from_batch_norm(copied[8]),
            )  # the copy's very tensors, in the same order
            pairs = _pairs(native, copied)
            _check_against_whole_batch(rank, sizes, native, synced, pairs, (3, 9, 9), channels_last, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_stack_matches_native_whole_batch(tmp_path, device):
    run_on_processes(tmp_path, "fused_stack_matches_native", device)


def batch_norm_matches_native(rank, device):
    for sizes in SPLITS:
        for channels_last in (False, True):
            native = _randomise_batch_norms(nn.BatchNorm2d(5, dtype=torch.float64), 2).to(device)
            synced = SyncBatchNorm2d.from_batch_norm(copy.deepcopy(native))
            pairs = _pairs(native, synced)
            _check_against_whole_batch(rank, sizes, native, synced, pairs, (5, 3, 4), channels_last, device=device)
            # A large offset: the merged variance keeps its digits.
            native, synced = (nn.Sequential(OffsetBy(1e4), module) for module in (native, synced))
            _check_against_whole_batch(rank, sizes, native, synced, _pairs(native, synced), (5, 3, 4), steps=1, device=device)


class OffsetBy(nn.Module):
    def __init__(self, offset):
        super().__init__()
        self.offset = offset

    def forward(self, x):
        return x + self.offset


@pytest.mark.parametrize("device", DEVICES)
def test_batch_norm_matches_native_whole_batch(tmp_path, device):
    run_on_processes(tmp_path, "batch_norm_matches_native", device)


def converted_batch_norm1d_matches_native(rank, device):
    # A classifier head's batch norm: [N, C] and [N, C, L] inputs.
    for sizes in SPLITS:
        for input_shape in ((5,), (5, 7)):
            native = _randomise_batch_norms(nn.Sequential(nn.BatchNorm1d(5, dtype=torch.float64)), 5).to(device)
            synced = convert_sync_batchnorm(copy.deepcopy(native))
            assert type(synced[0]) is SyncBatchNorm1d
            _check_against_whole_batch(rank, sizes, native, synced, _pairs(native, synced), input_shape, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_a_converted_batch_norm1d_matches_native_whole_batch(tmp_path, device):
    run_on_processes(tmp_path, "converted_batch_norm1d_matches_native", device)


def converted_and_fused_models_match_native(rank):
    from test_sync_batch_norm import CONVERTER_PATHS, FunctionalNet, convert_then_fuse

    for path in CONVERTER_PATHS:
        for net in (lambda: _native_stack()[:8], lambda: FunctionalNet().double()):
            torch.manual_seed(0)
            native = _randomise_batch_norms(net(), 3)
            synced = convert_then_fuse(copy.deepcopy(native), path)
            fused = [m for m in synced.modules() if isinstance(m, FusedConv2dBatchNormReLUMaxPool2d)]
            assert len(fused) == 2, f"{path}: {synced}"
            # The state_dict keys stay: its tensors pair with native's by key.
            native_state, synced_state = native.state_dict(keep_vars=True), synced.state_dict(keep_vars=True)
            pairs = {
                "parameters": [(native_state[k], synced_state[k]) for k, _ in native.named_parameters()],
                "buffers": [(native_state[k], synced_state[k]) for k, _ in native.named_buffers()],
            }
            _check_against_whole_batch(rank, (3, 5), native, synced, pairs, (3, 8, 8))


def test_converted_and_fused_models_match_native_whole_batch(tmp_path):
    run_on_processes(tmp_path, "converted_and_fused_models_match_native")


def converted_bn_relu_conv_matches_native(rank):
    torch.manual_seed(0)
    native = _randomise_batch_norms(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)).double(), 4)
    copied = copy.deepcopy(native)
    synced = convert_sync_batchnorm(nn.Sequential(BatchNormReLUConv2d.from_modules(copied[0], copied[2])))
    assert isinstance(synced[0].bn, SyncBatchNorm2d)
    for sizes in SPLITS:
        _check_against_whole_batch(rank, sizes, native, synced, _pairs(native, copied), (3, 6, 6))


def test_a_converted_bn_relu_conv_layer_synchronizes(tmp_path):
    # BatchNormReLUConv2d's op has no synchronized statistics: with a SyncBatchNorm2d in a
    # world of two it runs its batch norm module, unfused.
    run_on_processes(tmp_path, "converted_bn_relu_conv_matches_native")


def groups_of_one_and_evaluation_do_not_communicate(rank):
    """A group of one process is the unsynchronized layer (the same ops, bit for bit); so is
    evaluation, in the two-process group; too few values in the whole batch is an error on
    every process."""
    from test_sync_batch_norm import model_with_every_batch_norm, training_step

    own_group = [dist.new_group([r]) for r in range(WORLD_SIZE)][rank]
    model = model_with_every_batch_norm()
    for group, mode in ((own_group, "train"), (None, "eval")):
        plain = copy.deepcopy(model).train(mode == "train")
        synced = convert_sync_batchnorm(copy.deepcopy(model), group).train(mode == "train")
        for seed in range(2):
            (expected, expected_calls), (actual, actual_calls) = training_step(plain, seed), training_step(synced, seed)
            assert actual_calls == expected_calls, f"{mode}, group {group}"
            assert all(torch.equal(a, b) for a, b in zip(actual, expected, strict=True))

    bn = SyncBatchNorm2d(3, dtype=torch.float64)
    try:
        bn(torch.randn(1 - rank, 3, 1, 1, dtype=torch.float64))
    except ValueError as error:
        assert "Expected more than 1 value per channel when training, got 1 over the 2 processes" in str(error)
    else:
        raise AssertionError("a whole batch of one value per channel did not raise")


def test_groups_of_one_and_evaluation_do_not_communicate(tmp_path):
    run_on_processes(tmp_path, "groups_of_one_and_evaluation_do_not_communicate")


# Unit roundoffs (round to nearest): bfloat16 keeps 8 significant bits, float32 24.
BFLOAT16_ROUNDOFF, FLOAT32_ROUNDOFF = 2.0**-8, 2.0**-24


def _check_bfloat16_running_statistics(rank, conv, bn, part, old_mean, old_var):
    """The running statistics ``bn`` holds after one step under bfloat16 autocast, against the
    float64 update from ``old_mean``/``old_var`` (its float32 buffers before the step) with the
    float64 statistics of its whole-batch input: ``conv(x)`` for a fused layer, else ``x``,
    where ``x`` gathers every process's ``part`` (what the layer received).

    The bound, from bfloat16's rounding (u = 2^-8; float32's is 2^-24):

    - A fused layer rounds its input, weight and bias to bfloat16 (each a relative error <= u);
      a product of two bfloat16 numbers is exact in float32; the K = C_in*kh*kw products and
      the bias are summed in float32 (an error <= gamma_K = K*2^-24/(1 - K*2^-24) relative to
      the sum of their magnitudes); the output may be rounded to bfloat16 once more (<= u).
      Relative perturbations multiply, so each convolution output y has an error
      e <= c * A, c = (1+u)^3 * (1+gamma_K) - 1 (about 3u), with A = |w| * |x| + |b| (the
      convolution of the magnitudes), computed here in float64.
    - Over the n values of a channel, the mean moves by at most mean(e), and the biased
      variance by var(y+e) - var(y) = 2 cov(y, e) + var(e) <= 2 sd(y) rms(e) + mean(e^2)
      (Cauchy-Schwarz); times n/(n-1) for the unbiased one. A plain batch norm's input is
      already bfloat16, exact in float64: e = 0.
    - The statistics are accumulated in float32: allowed 8*n*2^-24 of mean(|y|) for the mean
      and of mean(y^2) for the variance (a generous multiple of the summation error gamma_n).
    - The update r' = (1-f) r + f s with factor f (momentum, or 1/num_batches_tracked where
      momentum is None) moves the error of s by f, and rounds r' to float32 (a few 2^-24).

    A wrong factor f + df is off by df * |s - r|: with these data a factor 10% too large
    exceeds the bound (the running variances), where a tolerance of rtol = atol = 0.1, about
    the size of the whole change, let it pass."""
    pieces = [None] * WORLD_SIZE
    dist.all_gather_object(pieces, part.double())
    x = torch.cat(pieces)
    dims = (0, 2, 3)
    if conv is None:
        y, error = x, torch.zeros_like(x)
    else:
        weight, bias = conv.weight.double(), conv.bias.double()
        y = F.conv2d(x, weight, bias, conv.stride, conv.padding)
        terms = weight[0].numel() + 1
        gamma = terms * FLOAT32_ROUNDOFF / (1 - terms * FLOAT32_ROUNDOFF)
        relative = (1 + BFLOAT16_ROUNDOFF) ** 3 * (1 + gamma) - 1
        error = relative * F.conv2d(x.abs(), weight.abs(), bias.abs(), conv.stride, conv.padding)
    count = y.numel() // y.shape[1]
    float32_sums = 8 * count * FLOAT32_ROUNDOFF
    mean, var = y.mean(dims), y.var(dims, correction=1)
    mean_bound = error.mean(dims) + float32_sums * y.abs().mean(dims)
    deviation_sd = (y - mean[:, None, None]).pow(2).mean(dims).sqrt()
    error_ms = error.pow(2).mean(dims)
    var_bound = count / (count - 1) * (2 * deviation_sd * error_ms.sqrt() + error_ms) + float32_sums * y.pow(2).mean(dims)
    factor = bn.momentum if bn.momentum is not None else 1 / int(bn.num_batches_tracked)
    checks = (("running_mean", bn.running_mean, old_mean, mean, mean_bound),
              ("running_var", bn.running_var, old_var, var, var_bound))  # fmt: skip
    for name, actual, old, statistic, bound in checks:
        expected = (1 - factor) * old + factor * statistic
        allowed = factor * bound + 4 * FLOAT32_ROUNDOFF * ((1 - factor) * old.abs() + factor * statistic.abs())
        off = (actual.double() - expected).abs()
        assert (off <= allowed).all(), (
            f"rank {rank}, {name} after a bfloat16 step: {actual.tolist()}, expected {expected.tolist()} "
            f"within {allowed.tolist()} (off by {off.tolist()}; the whole change {(expected - old).tolist()})"
        )


def low_precision_is_synchronized(rank):
    """float32 against the float64 whole batch; bfloat16 under autocast (the convolutions in
    bfloat16, the batch-norm tensors in float32): the running statistics are the same on both
    processes and within bfloat16's rounding of the float64 statistics of each batch norm's
    whole-batch input (see :func:`_check_bfloat16_running_statistics`)."""
    sizes = (3, 5)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    native = _native_stack()
    synced = convert_sync_batchnorm(cifarnet.fuse(copy.deepcopy(native))).float()
    generator = torch.Generator().manual_seed(7)
    whole = torch.randn(sum(sizes), 3, 9, 9, dtype=torch.float64, generator=generator)
    expected = native(whole)
    torch.testing.assert_close(synced(whole[mine].float()), expected[mine].float(), rtol=1e-4, atol=1e-4)
    for expected_buffer, buffer in zip(native.buffers(), synced.buffers(), strict=True):
        torch.testing.assert_close(buffer.to(expected_buffer.dtype), expected_buffer, rtol=1e-5, atol=1e-5)

    # (fused layer, its batch norm) of the stack, and the plain batch norm after them
    layers = [(synced[0], synced[1]), (synced[4], synced[5]), (None, synced[8])]
    parts = {}
    hooks = [
        (conv or bn).register_forward_pre_hook(lambda module, args: parts.__setitem__(module, args[0].detach()))
        for conv, bn in layers
    ]
    before = [(bn.running_mean.double(), bn.running_var.double()) for _, bn in layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = synced(whole[mine].float().requires_grad_())
    for hook in hooks:
        hook.remove()
    assert output.dtype == torch.bfloat16
    output.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in synced.parameters())
    for buffer in synced.buffers():
        gathered = [torch.empty_like(buffer) for _ in range(WORLD_SIZE)]
        dist.all_gather(gathered, buffer)
        assert torch.equal(gathered[0], gathered[1])
    for (conv, bn), (old_mean, old_var) in zip(layers, before):
        _check_bfloat16_running_statistics(rank, conv, bn, parts[conv or bn], old_mean, old_var)


def test_low_precision_is_synchronized(tmp_path):
    run_on_processes(tmp_path, "low_precision_is_synchronized")


def one_float32_parameter_on_16_bit_data(rank):
    """A synchronized batch norm (plain, and in the fused layer with a 16-bit convolution) of
    float32 with its weight or its bias alone, on 16-bit data (issue 25: the bias's gradient
    took the data's dtype): each parameter's gradient, summed over the processes, in native's
    dtype (its own) and no further from the float64 whole batch's than native's."""
    from op_cases import assert_no_worse_than_native

    sizes = (3, 5)
    mine = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    for dtype in (torch.bfloat16, torch.float16):
        for given in ("weight", "bias"):
            torch.manual_seed(2)
            bn = nn.BatchNorm2d(6)
            layer = Conv2dBatchNormReLUMaxPool2d(3, 6, 3, padding=1).to(dtype)
            for norm in (bn, layer.bn.float()):
                with torch.no_grad():
                    norm.weight.uniform_(0.5, 1.5), norm.bias.normal_()
                setattr(norm, "bias" if given == "weight" else "weight", None)
            cases = (
                ("SyncBatchNorm2d", bn, SyncBatchNorm2d.from_batch_norm(copy.deepcopy(bn)), 6),
                ("SyncConv2dBatchNormReLUMaxPool2d", layer.to_native(), SyncConv2dBatchNormReLUMaxPool2d.from_layer(copy.deepcopy(layer)), 3),
            )
            for name, native, synced, channels in cases:
                generator = torch.Generator().manual_seed(11)
                whole = (torch.randn(sum(sizes), channels, 8, 8, generator=generator) * 2 + 1).to(dtype)
                exact = copy.deepcopy(native).double()
                native_output = native(whole)
                grad_output = torch.randn(native_output.shape, generator=generator).to(dtype)
                native_output.backward(grad_output)
                exact(whole.double()).backward(grad_output.double())
                synced(whole[mine]).backward(grad_output[mine])
                where = f"rank {rank}, {name} {dtype} with its {given} alone"
                parameters = zip(synced.parameters(), native.parameters(), exact.parameters(), strict=True)
                for index, (ours, theirs, reference) in enumerate(parameters):
                    assert ours.grad.dtype == theirs.grad.dtype, f"{where}, parameter {index}: dtype {ours.grad.dtype}, native {theirs.grad.dtype}"
                    if theirs.dtype == torch.float32:  # the batch norm's (the 16-bit convolution's: elsewhere)
                        summed = ours.grad.clone()
                        dist.all_reduce(summed)
                        assert_no_worse_than_native(summed, theirs.grad, reference.grad, f"{where}, parameter {index}", rtol=4 * 2.0**-24, atol=1e-6)


def test_one_float32_parameter_on_16_bit_data(tmp_path):
    run_on_processes(tmp_path, "one_float32_parameter_on_16_bit_data")


def compiled_in_a_world_of_one(rank):
    """torch.distributed initialised with one process: torch.compile (fullgraph) of the
    synchronized layers computes what the unsynchronized ones compute."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    plain = nn.Sequential(Conv2dBatchNormReLUMaxPool2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    compiled = torch.compile(synced, fullgraph=True)
    for batch in (4, 6):
        input = torch.randn(batch, 3, 8, 8, requires_grad=True)
        expected, actual = plain(input), compiled(input)
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(torch.autograd.grad(actual.sum(), input)[0], torch.autograd.grad(expected.sum(), input)[0])
    for expected, actual in zip(plain.buffers(), synced.buffers(), strict=True):
        torch.testing.assert_close(actual, expected)


def test_torch_compile_in_a_world_of_one_process(tmp_path):
    run_on_processes(tmp_path, "compiled_in_a_world_of_one", processes=1)
