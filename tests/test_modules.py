"""Every cifarnet module, and the functional ops, against the torch.nn module or composition it
replaces: the checks of PyTorch's ``test/test_modules.py`` (forward, gradients, second
derivatives, forward-mode AD, memory formats, non-contiguous inputs, pickling, train/eval,
zero-size batches, argument errors) over a table of our own (tests/module_cases.py).

Each check builds a cifarnet module and its native twin from the same constructor arguments and
gives the twin a copy of the module's state (``load_state_dict``): the two share no tensor, so
running statistics are compared after each step. Native behaviour is the oracle throughout,
errors included: where native raises, cifarnet raises the same exception type, and where native
does not, cifarnet does not either.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call, jvp, replace_all_batch_norm_modules_

from conftest import DEVICES
from module_cases import CASES, TWINS, BadCall, ModuleCase, NativeDropoutWithMask, bad_calls

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float64, id="float64")]
MODES = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


# --------------------------------------------------------------------------------------------
# Helpers


def ids(cases) -> list:
    return [pytest.param(case, id=case.name) for case in cases]


@contextlib.contextmanager
def frozen_rng():
    """Every call under the same seed, so that dropout draws the same mask each time (from
    torch's default CPU generator, or on CUDA the CUDA generator's Philox state: torch.manual_seed
    seeds both)."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if "cuda" in DEVICES else []):
        torch.manual_seed(0)
        yield


def call(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    with frozen_rng():
        return module(input)


def dropout_mask(ours: nn.Module, shape, device) -> torch.Tensor:
    """The mask cifarnet's dropout draws under :func:`frozen_rng` for inputs of ``shape``, read off
    its output for an input of ones (the mask depends only on the seed and each element's index)."""
    ones = torch.ones(shape, dtype=torch.float64, device=device)
    with torch.no_grad():
        return call(copy.deepcopy(ours).train(), ones) != 0


def randomize_state(module: nn.Module) -> None:
    """Batch-norm parameters and running statistics away from their initial ones and zeros, and
    a count of batches so far (``momentum=None`` averages over it)."""
    with torch.no_grad():
        for bn in module.modules():
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                continue
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_()
            if bn.track_running_stats:
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 1.5)
                bn.num_batches_tracked.fill_(3)


def make_pair(case: ModuleCase, dtype=torch.float64, device="cpu", training=True, input_shape=None):
    """The cifarnet module of ``case`` and its native twin with a copy of its state, both in
    ``dtype`` on ``device``, in training or evaluation mode."""
    torch.manual_seed(0)
    ours = case.ours(**case.kwargs)
    randomize_state(ours)
    ours.to(device=device, dtype=dtype).train(training)
    if case.dropout_p is not None:
        native = NativeDropoutWithMask(case.dropout_p, dropout_mask(ours, input_shape or case.input_shape, device))
    else:
        native = case.native(**case.kwargs)
        native.load_state_dict({case.native_key(name): value for name, value in ours.state_dict().items()})
    return ours, native.to(device=device, dtype=dtype).train(training)


def make_input(shape, dtype=torch.float64, device="cpu", requires_grad=True, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, dtype=dtype, generator=generator).to(device).requires_grad_(requires_grad)


def grad_output_for(module: nn.Module, input: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        shape = call(module, input).shape
    return make_input(shape, input.dtype, input.device, requires_grad=False, seed=2)


def paired_parameters(case: ModuleCase, ours: nn.Module, native: nn.Module):
    """``(names, ours' parameters, native's)``, in the order of ours'."""
    natives = dict(native.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    return names, list(ours.parameters()), [natives[case.native_key(name)] for name in names]


def input_and_parameter_grads(module, params, input, grad_output):
    output = call(module, input)
    return output, torch.autograd.grad(output, [input, *params], grad_output, allow_unused=True)


def assert_same_state(case: ModuleCase, ours: nn.Module, native: nn.Module, when: str, **tolerance) -> None:
    """Equal parameters and buffers (running statistics, ``num_batches_tracked``)."""
    natives = native.state_dict()
    for name, value in ours.state_dict().items():
        expected = natives[case.native_key(name)]
        torch.testing.assert_close(value, expected, **tolerance, msg=lambda m: f"{name} {when}: {m}")


def layout(tensor: torch.Tensor) -> tuple[bool, bool]:
    return tensor.is_contiguous(), tensor.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------
# Forward and gradients


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ids(CASES))
def test_forward(case, dtype, training, device):
    ours, native = make_pair(case, dtype, device, training)
    input = make_input(case.input_shape, dtype, device, requires_grad=False)
    for step in range(2):
        torch.testing.assert_close(call(ours, input), call(native, input), **TOLERANCES[dtype])
        assert_same_state(case, ours, native, f"after step {step + 1}", **TOLERANCES[dtype])


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ids(CASES))
def test_gradients(case, dtype, training, device):
    ours, native = make_pair(case, dtype, device, training)
    names, params, native_params = paired_parameters(case, ours, native)
    input = make_input(case.input_shape, dtype, device)
    grad_output = grad_output_for(ours, input)
    _, grads = input_and_parameter_grads(ours, params, input, grad_output)
    _, native_grads = input_and_parameter_grads(native, native_params, input, grad_output)
    for name, grad, native_grad in zip(["input", *names], grads, native_grads):
        torch.testing.assert_close(grad, native_grad, **TOLERANCES[dtype], msg=lambda m: f"grad of {name}: {m}")


# --------------------------------------------------------------------------------------------
# Second derivatives


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", ids(CASES))
def test_gradgradcheck(case, training, device):
    ours, _ = make_pair(case, torch.float64, device, training, input_shape=case.small_input_shape)
    names = [name for name, _ in ours.named_parameters()]

    def function(input, *params):
        with frozen_rng():
            return functional_call(ours, dict(zip(names, params)), (input,))

    input = make_input(case.small_input_shape, torch.float64, device)
    params = [p.detach().requires_grad_() for p in ours.parameters()]
    assert torch.autograd.gradgradcheck(function, (input, *params), fast_mode=True)


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", ids(CASES))
def test_gradient_penalty(case, training, device):
    """The gradient of the sum of squared first gradients (taken with create_graph=True), as a
    gradient penalty takes it: equal to native's, and neither None nor zero where native's is
    not."""
    ours, native = make_pair(case, torch.float64, device, training)
    names, params, native_params = paired_parameters(case, ours, native)

    def penalty_grads(module, params):
        input = make_input(case.input_shape, torch.float64, device)
        output = call(module, input)
        first = torch.autograd.grad(output, [input, *params], torch.ones_like(output), create_graph=True)
        penalty = sum((grad**2).sum() for grad in first)
        if not penalty.requires_grad:  # no first gradient depends on anything
            return [None] * len(first)
        return torch.autograd.grad(penalty, [input, *params], allow_unused=True)

    problems = []
    grads, native_grads = penalty_grads(ours, params), penalty_grads(native, native_params)
    for name, grad, native_grad in zip(["input", *names], grads, native_grads):
        if native_grad is None or not native_grad.any():
            if grad is not None and grad.any():
                problems.append(f"{name}: nonzero where native's is zero")
        elif grad is None:
            problems.append(f"{name}: None (native's is nonzero)")
        elif not grad.any():
            problems.append(f"{name}: all zero (native's is nonzero)")
        elif not torch.allclose(grad, native_grad, rtol=1e-8, atol=1e-8):
            problems.append(f"{name}: differs from native's by up to {(grad - native_grad).abs().max():.3g}")
    assert not problems, "; ".join(problems)


# --------------------------------------------------------------------------------------------
# Forward-mode AD


FORWARD_AD = ["make_dual-input", "make_dual-input_and_parameters", "func.jvp"]


def forward_ad_tangent(module, names, input, params, tangents, how, training):
    """The output's tangent for the tangents of the input and (but for ``make_dual-input``) of
    the parameters ``names`` of ``module``."""
    if how == "func.jvp":
        if training:
            # functorch refuses the in-place update of the integer num_batches_tracked, which
            # it cannot take as an input: its documented remedy, for native and cifarnet alike.
            replace_all_batch_norm_modules_(module)
        # Running statistics that training updates in place (the OpCall's) as inputs, with
        # zero tangents; evaluation only reads them.
        buffers = {name: b.clone() for name, b in module.named_buffers() if b.is_floating_point() and training}

        def function(input, *tensors):
            with frozen_rng():
                return functional_call(module, dict(zip([*names, *buffers], tensors)), (input,))

        zeros = [torch.zeros_like(b) for b in buffers.values()]
        return jvp(function, (input, *params, *buffers.values()), (*tangents, *zeros))[1]
    with fwAD.dual_level():
        dual_input = fwAD.make_dual(input, tangents[0])
        if how == "make_dual-input":
            output = call(module, dual_input)
        else:
            duals = {name: fwAD.make_dual(p, t) for name, p, t in zip(names, params, tangents[1:])}
            with frozen_rng():
                output = functional_call(module, duals, (dual_input,))
        return fwAD.unpack_dual(output).tangent


@pytest.mark.parametrize("how", FORWARD_AD)
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", ids(CASES))
def test_forward_ad(case, training, how, device):
    ours, native = make_pair(case, torch.float64, device, training)
    names = [name for name, _ in ours.named_parameters()]
    input = make_input(case.input_shape, torch.float64, device, requires_grad=False)
    params = [p.detach() for p in ours.parameters()]
    tangents = [make_input(t.shape, torch.float64, device, False, seed=3 + i) for i, t in enumerate([input, *params])]
    native_names = [case.native_key(name) for name in names]
    native_tangent = forward_ad_tangent(native, native_names, input, params, tangents, how, training)
    tangent = forward_ad_tangent(ours, names, input, params, tangents, how, training)
    torch.testing.assert_close(tangent, native_tangent, **TOLERANCES[torch.float64])


# --------------------------------------------------------------------------------------------
# Memory formats and non-contiguous inputs


def memory_format_cases() -> list:
    """Contiguous and channels_last inputs for every case with 4-D inputs, and contiguous and
    channels_last weights for every case with 4-D weights."""
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    cases = []
    for case in (case for case in CASES if len(case.input_shape) == 4):
        weight_formats = formats.items() if case.weights_4d else [(None, None)]
        for (input_name, input_format), (weight_name, weight_format) in itertools.product(
            formats.items(), weight_formats
        ):
            name = f"{case.name}-input_{input_name}" + (f"-weight_{weight_name}" if weight_name else "")
            cases.append(pytest.param(case, input_format, weight_format, id=name))
    return cases


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, input_format, weight_format", memory_format_cases())
def test_memory_format(case, input_format, weight_format, dtype, training, device):
    """Values and layouts as native's: ``(is_contiguous(), is_contiguous(channels_last))`` of the
    output and of the gradients (PyTorch's test_memory_format checks the gradients' too)."""
    ours, native = make_pair(case, dtype, device, training)
    if weight_format is not None:
        ours.to(memory_format=weight_format)
        native.to(memory_format=weight_format)
    names, params, native_params = paired_parameters(case, ours, native)
    input = make_input(case.input_shape, dtype, device, requires_grad=False)
    input = input.contiguous(memory_format=input_format).requires_grad_()
    grad_output = grad_output_for(ours, input)
    output, grads = input_and_parameter_grads(ours, params, input, grad_output)
    native_output, native_grads = input_and_parameter_grads(native, native_params, input, grad_output)
    problems = []
    labels = ["output", *(f"grad of {name}" for name in ["input", *names])]
    for label, got, expected in zip(labels, [output, *grads], [native_output, *native_grads]):
        if not torch.allclose(got, expected, **TOLERANCES[dtype]):
            problems.append(f"{label} differs from native's by up to {(got - expected).abs().max():.3g}")
        if layout(got) != layout(expected):
            problems.append(
                f"{label} (is_contiguous, is_contiguous(channels_last)) = {layout(got)}, native's {layout(expected)}"
            )
    assert not problems, "; ".join(problems)


def non_contiguous(shape, kind: str, dtype, device) -> torch.Tensor:
    """A tensor of ``shape`` as a slice (every other element of its last dimension) or a
    permutation (its dimensions stored in reverse order)."""
    if kind == "sliced":
        input = make_input((*shape[:-1], 2 * shape[-1]), dtype, device, requires_grad=False)[..., ::2]
    else:
        reversed_dims = list(range(len(shape)))[::-1]
        input = make_input(shape[::-1], dtype, device, requires_grad=False).permute(reversed_dims)
    assert not input.is_contiguous() and not input.is_contiguous(memory_format=torch.channels_last)
    return input.requires_grad_()


@pytest.mark.parametrize("kind", ["sliced", "permuted"])
@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ids(CASES))
def test_non_contiguous_input(case, dtype, training, kind, device):
    ours, native = make_pair(case, dtype, device, training)
    names, params, native_params = paired_parameters(case, ours, native)
    input = non_contiguous(case.input_shape, kind, dtype, device)
    grad_output = grad_output_for(ours, input)
    output, grads = input_and_parameter_grads(ours, params, input, grad_output)
    native_output, native_grads = input_and_parameter_grads(native, native_params, input, grad_output)
    torch.testing.assert_close(output, native_output, **TOLERANCES[dtype])
    for name, grad, native_grad in zip(["input", *names], grads, native_grads):
        torch.testing.assert_close(grad, native_grad, **TOLERANCES[dtype], msg=lambda m: f"grad of {name}: {m}")


# --------------------------------------------------------------------------------------------
# Pickling, train/eval switching, zero-size batches


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", ids(case for case in CASES if not case.functional))
def test_pickle(case, training, device):
    ours, _ = make_pair(case, torch.float32, device, training)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(ours) and loaded.training == training
    input = make_input(case.input_shape, torch.float32, device, requires_grad=False)
    torch.testing.assert_close(call(loaded, input), call(ours, input), rtol=0, atol=0)
    loaded_state = loaded.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(loaded_state[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", ids(CASES))
def test_train_eval_switching(case, device):
    ours, native = make_pair(case, torch.float64, device, training=True)
    input = make_input(case.input_shape, torch.float64, device, requires_grad=False)
    for step, training in enumerate([True, False, True, True, False, False, True]):
        ours.train(training)
        native.train(training)
        assert all(module.training == training for module in ours.modules())
        torch.testing.assert_close(call(ours, input), call(native, input), **TOLERANCES[torch.float64])
        assert_same_state(case, ours, native, f"after step {step + 1} ({'train' if training else 'eval'})")


def outcome(function: Callable):
    """``(result, None)``, or ``(None, the exception)``."""
    try:
        return function(), None
    except Exception as error:  # noqa: BLE001  (its type is what the tests compare)
        return None, error


@pytest.mark.parametrize("training", MODES)
@pytest.mark.parametrize("case", ids(case for case in CASES if case.batched))
def test_zero_size_batch(case, training, device):
    shape = (0, *case.input_shape[1:])
    ours, native = make_pair(case, torch.float64, device, training, input_shape=shape)
    names, params, native_params = paired_parameters(case, ours, native)

    def forward_backward(module, params):
        input = make_input(shape, torch.float64, device)
        output = call(module, input)
        return output, torch.autograd.grad(output, [input, *params], torch.ones_like(output), allow_unused=True)

    expected, native_error = outcome(lambda: forward_backward(native, native_params))
    got, error = outcome(lambda: forward_backward(ours, params))
    if native_error is not None:
        assert type(error) is type(native_error), f"native raises {native_error!r}, cifarnet {error!r}"
        return
    assert error is None, f"native takes an empty batch, cifarnet raises {error!r}"
    (output, grads), (native_output, native_grads) = got, expected
    assert (output.shape, output.dtype) == (native_output.shape, native_output.dtype)
    for name, grad, native_grad in zip(["input", *names], grads, native_grads):
        assert (grad is None) == (native_grad is None), f"grad of {name} is {grad}, native's {native_grad}"
        if grad is not None:
            torch.testing.assert_close(grad, native_grad, msg=lambda m: f"grad of {name}: {m}")
    assert_same_state(case, ours, native, "after an empty batch")


# --------------------------------------------------------------------------------------------
# Argument errors


def attempt(function: Callable, bad_call: BadCall):
    """The outcome of ``bad_call`` made on ``function`` (a module class or op; see :func:`outcome`)."""
    torch.manual_seed(0)
    input, kwargs = bad_call.input(), copy.deepcopy(bad_call.kwargs)  # nothing shared with the other call
    if bad_call.twin.startswith("ops."):
        return outcome(lambda: function(input, **kwargs))
    return outcome(lambda: call(function(**kwargs).train(bad_call.training), input))


@pytest.mark.parametrize("bad_call", ids(bad_calls()))
def test_argument_errors_match_native(bad_call):
    ours, native = TWINS[bad_call.twin].ours, TWINS[bad_call.twin].native
    _, native_error = attempt(native, bad_call)
    _, error = attempt(ours, bad_call)
    if native_error is None:
        assert error is None, f"native accepts it, cifarnet raises {type(error).__name__}: {error}"
        return
    assert type(error) is type(native_error), (
        f"native raises {type(native_error).__name__}: {native_error}; cifarnet "
        + ("accepts it" if error is None else f"raises {type(error).__name__}: {error}")
    )
    assert str(error).strip(), "cifarnet's error has an empty message"
