"""Checks shared by the fuse tests (tests/test_fuse.py, tests/test_fuse_zoo.py): a fused model
against the unfused original it was made from, in outputs, gradients, buffers and state dicts."""

from __future__ import annotations

import copy
import warnings

import torch

import cifarnet

FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}  # atol: of the tensor's largest magnitude (see assert_close)
EXACT = {"rtol": 0, "atol": 0}
LARGE = 1_000_000  # elements; VGG's classifier has 100M-element weights


def fuse_quietly(model, **kwargs):
    """cifarnet.fuse, failing the test if it warns (the models these tests fuse quietly are
    traceable)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cifarnet.fuse(model, **kwargs)


def run(model, input, seed=0):
    """Output, input gradient and parameter gradients (by name) of one forward+backward, with
    the RNG seeded first (dropout) and a seeded output gradient."""
    input = input.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    output = model(input)
    grad_output = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    parameters = dict(model.named_parameters())
    grads = torch.autograd.grad(output, [input, *parameters.values()], grad_output, allow_unused=True)
    return output, grads[0], dict(zip(parameters, grads[1:]))


def assert_close(mine, expected, tolerance, name="") -> None:
    """torch.testing.assert_close with ``atol`` relative to ``expected``'s largest magnitude
    when above 1: float32 rounding through a deep network's eight batch norms scales with
    the gradient's size (VGG11-bn's first conv: max 24, float32 noise 1.5e-4)."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        mine, expected, rtol=tolerance["rtol"], atol=tolerance["atol"] * scale, msg=lambda m: f"{name}: {m}"
    )


def assert_same_tensors(ours: dict, theirs: dict, tolerance) -> None:
    assert list(ours) == list(theirs)
    for name in theirs:
        mine, expected = ours[name], theirs[name]
        if expected is None:
            assert mine is None, name
        elif tolerance == EXACT:
            assert mine.dtype == expected.dtype and torch.equal(mine, expected), name
        else:
            if expected.numel() > LARGE:
                # NB: comparing 100M elements takes seconds on a busy CPU; a strided sample of
                # the classifier's weights (which the fused layers feed) is as telling.
                mine, expected = mine.reshape(-1)[::97], expected.reshape(-1)[::97]
            assert_close(mine, expected, tolerance, name)


def assert_same_function(fused, original, input, tolerance, modes=(True, False)) -> None:
    """Outputs, gradients and (after the training-mode call) buffers of ``fused`` equal the
    unfused ``original``'s, in each mode."""
    for training in modes:
        original.train(training)
        fused.train(training)
        out, input_grad, grads = run(fused, input)
        expected_out, expected_input_grad, expected_grads = run(original, input)
        assert_close(out, expected_out, tolerance, "output")
        assert_close(input_grad, expected_input_grad, tolerance, "input gradient")
        assert_same_tensors(grads, expected_grads, tolerance)
        assert_same_tensors(dict(fused.named_buffers()), dict(original.named_buffers()), tolerance)


def assert_state_dicts_load_both_ways(fused, original) -> None:
    """``fused``'s state dict has ``original``'s keys, in order, and each loads into the other."""
    assert list(fused.state_dict()) == list(original.state_dict())
    fused = copy.deepcopy(fused)
    # Different values first, so that loading is seen to do something.
    other = copy.deepcopy(original)
    with torch.no_grad():
        for tensor in other.state_dict().values():
            tensor.add_(1)
    fused.load_state_dict(other.state_dict(), strict=True)
    assert_same_tensors(fused.state_dict(), other.state_dict(), EXACT)
    fresh = copy.deepcopy(original)
    fresh.load_state_dict(fused.state_dict(), strict=True)
    assert_same_tensors(fresh.state_dict(), other.state_dict(), EXACT)


def module_types(model) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in model.named_modules() if name]


def assert_unfuses_to(model, fused, input, tolerance) -> None:
    """unfuse(fused) has model's class and module types, fused's tensors and model's function."""
    unfused = cifarnet.unfuse(fused)
    assert type(unfused) is type(model)
    assert module_types(unfused) == module_types(model)
    assert_same_tensors(unfused.state_dict(), fused.state_dict(), EXACT)
    assert_same_function(unfused, model, input, tolerance)
