"""The ops' autograd formulas (csrc/ops/autograd/<op>.cpp): gradients for exactly the tensors that
ask for one, whichever optional tensors are given, equal to the native composition's; second
derivatives, forward-mode AD and torch.func transforms as native's; and first derivatives
still from the fused backward ops."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cifarnet import ops
from conftest import DEVICES, native_conv2d_relu_max_pool2d

GEOMETRY = dict(stride=1, padding=1, pool_size=2)
PADDED_POOL = dict(stride=1, padding=1, pool_size=3, pool_stride=2, pool_padding=1)  # a ResNet stem's pool


def ones_if_none(weight, channels_of):
    """An all-ones batch-norm weight where none is given: the same function for native to
    differentiate, and it keeps native's CUDA backward off its path for a bias without a
    weight, which fails in torch 2.11 ("tensor does not have a device", seen on an H200)."""
    return weight if weight is not None else torch.ones_like(channels_of[0, :, 0, 0]).detach()


def native_conv2d_batch_norm_relu_max_pool2d(input, weight, bias, bn_weight, bn_bias, pool=(2, 2, 0)):
    conv = F.conv2d(input, weight, bias, padding=1)
    return F.max_pool2d(F.relu(F.batch_norm(conv, None, None, ones_if_none(bn_weight, conv), bn_bias, training=True)), *pool)


# name: (ours, native, tensor shapes, which tensors are optional)
OPS = {
    "conv2d_relu_max_pool2d": (
        lambda x, w, b: ops.conv2d_relu_max_pool2d(x, w, b, **GEOMETRY),
        lambda x, w, b: native_conv2d_relu_max_pool2d(x, w, b, **GEOMETRY),
        [(2, 3, 6, 6), (4, 3, 3, 3), (4,)],
        [False, False, True],
    ),
    "conv2d_relu_max_pool2d, padded pool": (
        lambda x, w, b: ops.conv2d_relu_max_pool2d(x, w, b, **PADDED_POOL),
        lambda x, w, b: native_conv2d_relu_max_pool2d(x, w, b, **PADDED_POOL),
        [(2, 3, 7, 6), (4, 3, 3, 3), (4,)],
        [False, False, True],
    ),
    "batch_norm, training": (
        lambda x, w, b: ops.batch_norm(x, None, None, w, b, training=True),
        lambda x, w, b: F.batch_norm(x, None, None, ones_if_none(w, x), b, training=True),
        [(3, 4, 5, 5), (4,), (4,)],
        [False, True, True],
    ),
    "batch_norm, evaluation": (
        lambda x, w, b: ops.batch_norm(x, torch.full_like(x[0, :, 0, 0], 0.5), torch.full_like(x[0, :, 0, 0], 2.0), w, b),
        lambda x, w, b: F.batch_norm(x, torch.full_like(x[0, :, 0, 0], 0.5), torch.full_like(x[0, :, 0, 0], 2.0), ones_if_none(w, x), b),
        [(3, 4, 5, 5), (4,), (4,)],
        [False, True, True],
    ),
    "batch_norm_relu_conv2d, training": (
        lambda x, bw, bb, w, b: ops.batch_norm_relu_conv2d(x, None, None, bw, bb, w, b, training=True, padding=1),
        lambda x, bw, bb, w, b: F.conv2d(F.relu(F.batch_norm(x, None, None, ones_if_none(bw, x), bb, training=True)), w, b, padding=1),
        [(2, 3, 6, 6), (3,), (3,), (4, 3, 3, 3), (4,)],
        [False, True, True, False, True],
    ),
    "conv2d_batch_norm_relu_max_pool2d, training": (
        lambda x, w, b, bw, bb: ops.conv2d_batch_norm_relu_max_pool2d(x, w, b, None, None, bw, bb, training=True, **GEOMETRY),
        native_conv2d_batch_norm_relu_max_pool2d,
        [(2, 3, 6, 6), (4, 3, 3, 3), (4,), (4,), (4,)],
        [False, False, True, True, True],
    ),
    "conv2d_batch_norm_relu_max_pool2d, training, padded pool": (
        lambda x, w, b, bw, bb: ops.conv2d_batch_norm_relu_max_pool2d(x, w, b, None, None, bw, bb, training=True, **PADDED_POOL),
        lambda x, w, b, bw, bb: native_conv2d_batch_norm_relu_max_pool2d(x, w, b, bw, bb, pool=(3, 2, 1)),
        [(2, 3, 7, 6), (4, 3, 3, 3), (4,), (4,), (4,)],
        [False, False, True, True, True],
    ),
    "conv2d_batch_norm_relu_max_pool2d, evaluation": (
        lambda x, w, b, bw, bb: ops.conv2d_batch_norm_relu_max_pool2d(
            x, w, b, torch.full_like(w[:, 0, 0, 0], 0.5), torch.full_like(w[:, 0, 0, 0], 2.0), bw, bb, **GEOMETRY
        ),
        lambda x, w, b, bw, bb: F.max_pool2d(
            F.relu(
                F.batch_norm(
                    F.conv2d(x, w, b, padding=1),
                    torch.full_like(w[:, 0, 0, 0], 0.5),
                    torch.full_like(w[:, 0, 0, 0], 2.0),
                    ones_if_none(bw, w[None, :, :, 0]),
                    bb,
                )
            ),
            2,
        ),
        [(2, 3, 6, 6), (4, 3, 3, 3), (4,), (4,), (4,)],
        [False, False, True, True, True],
    ),
}


def gradient_requests(optional):
    """Every choice of given optional tensors, with every non-empty choice of given tensors
    that ask for a gradient."""
    for given in itertools.product(*[[True, False] if o else [True] for o in optional]):
        positions = [i for i, g in enumerate(given) if g]
        for count in range(1, len(positions) + 1):
            for wanting in itertools.combinations(positions, count):
                yield given, set(wanting)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_gradients_for_exactly_the_tensors_that_ask(name, device):
    ours, native, shapes, optional = OPS[name]
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(shape, generator=generator, dtype=torch.float64).to(device) for shape in shapes]
    for given, wanting in gradient_requests(optional):

        def leaves():
            return [
                (v.clone().requires_grad_(i in wanting) if given[i] else None) for i, v in enumerate(values)
            ]

        our_leaves, native_leaves = leaves(), leaves()
        our_output, native_output = ours(*our_leaves), native(*native_leaves)
        grad_output = torch.randn(native_output.shape, generator=generator, dtype=torch.float64).to(device)
        our_output.backward(grad_output)
        native_output.backward(grad_output)
        for i, (mine, theirs) in enumerate(zip(our_leaves, native_leaves)):
            what = f"{name}: tensor {i} (given {given}, asking {sorted(wanting)})"
            if mine is None:
                continue
            if i not in wanting:
                assert mine.grad is None, f"{what} got a gradient it did not ask for"
                continue
            assert mine.grad is not None, f"{what} got no gradient"
            torch.testing.assert_close(mine.grad, theirs.grad, msg=what)


def all_tensors(name, device, generator):
    """Every tensor of op ``name`` given, float64, each asking for a gradient."""
    shapes = OPS[name][2]
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(device).requires_grad_() for shape in shapes]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_second_derivatives_float64(name, device):
    ours = OPS[name][0]
    tensors = all_tensors(name, device, torch.Generator().manual_seed(1))
    # NB: a tie in a pool window or a value at ReLU's kink makes the finite differences jump;
    # random float64 data has neither.
    assert torch.autograd.gradgradcheck(ours, tensors, eps=1e-6, atol=1e-5, nondet_tol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_gradient_penalty_matches_native(name, device):
    """A gradient penalty (WGAN-GP, R1): the gradient of the squared norm of the first
    gradients, through create_graph=True, as native's."""
    ours, native, _, _ = OPS[name]
    generator = torch.Generator().manual_seed(2)
    tensors = all_tensors(name, device, generator)
    penalty_grads = []
    for op in (ours, native):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        first = torch.autograd.grad(op(*leaves).square().sum(), leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in first)
        penalty_grads.append(torch.autograd.grad(penalty, leaves))
    for i, (mine, theirs) in enumerate(zip(*penalty_grads)):
        torch.testing.assert_close(mine, theirs, msg=f"{name}: tensor {i}")
    assert any(g.abs().sum() > 0 for g in penalty_grads[0]), "a penalty with no gradient at all tests nothing"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("duals", ["input", "all"])
def test_forward_ad_matches_native(name, device, duals):
    ours, native, _, _ = OPS[name]
    generator = torch.Generator().manual_seed(3)
    primals = [t.detach() for t in all_tensors(name, device, generator)]
    tangents = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device) for p in primals]
    results = []
    for op in (ours, native):
        with fwAD.dual_level():
            inputs = [fwAD.make_dual(p, t) if duals == "all" or i == 0 else p for i, (p, t) in enumerate(zip(primals, tangents))]
            results.append(fwAD.unpack_dual(op(*inputs)))
    torch.testing.assert_close(results[0].primal, results[1].primal)
    assert results[0].tangent is not None
    torch.testing.assert_close(results[0].tangent, results[1].tangent)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_torch_func_transforms_match_native(name, device):
    """torch.func.jvp, grad and (for conv -> ReLU -> max-pool) vmap, which refuse C++ autograd
    Functions, run the op."""
    ours, native, _, _ = OPS[name]
    generator = torch.Generator().manual_seed(4)
    primals = [t.detach() for t in all_tensors(name, device, generator)]
    tangents = [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(device) for p in primals]
    primals, tangents = tuple(primals), tuple(tangents)
    for mine, theirs in zip(torch.func.jvp(ours, primals, tangents), torch.func.jvp(native, primals, tangents)):
        torch.testing.assert_close(mine, theirs)
    every = tuple(range(len(primals)))
    for mine, theirs in zip(
        torch.func.grad(lambda *t: ours(*t).square().sum(), every)(*primals),
        torch.func.grad(lambda *t: native(*t).square().sum(), every)(*primals),
    ):
        torch.testing.assert_close(mine, theirs)
    batch = torch.stack([primals[0], primals[0].flip(0)])
    torch.testing.assert_close(
        torch.func.vmap(lambda x: ours(x, *primals[1:]))(batch), torch.func.vmap(lambda x: native(x, *primals[1:]))(batch)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", OPS)
def test_per_example_gradients_match_native(name, device):
    """vmap(grad): each example's parameter gradients (DP-SGD's clipping, influence functions),
    every example a batch of one; the ops run under vmap as native does."""
    ours, native, _, _ = OPS[name]
    generator = torch.Generator().manual_seed(5)
    primals = [t.detach() for t in all_tensors(name, device, generator)]
    examples = primals[0]
    parameters = tuple(range(1, len(primals)))

    def per_example(op):
        loss = lambda x, *rest: op(x[None], *rest).square().sum()  # noqa: E731
        return torch.func.vmap(torch.func.grad(loss, parameters), in_dims=(0, *[None] * len(parameters)))(
            examples, *primals[1:]
        )

    for i, (mine, theirs) in enumerate(zip(per_example(ours), per_example(native), strict=True)):
        torch.testing.assert_close(mine, theirs, msg=f"{name}: parameter {i + 1}")


def test_ensemble_of_fused_models_matches_native():
    """An ensemble over stacked weights (torch.func.stack_module_state + functional_call), the
    models in evaluation, as the fused model's layers replace native ones."""
    import cifarnet

    torch.manual_seed(6)

    def model():
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3), torch.nn.Flatten(), torch.nn.Dropout(0.5),
        ).double()

    natives = [model() for _ in range(3)]
    for native in natives:  # running statistics other than the initial ones
        native.train()(torch.randn(8, 3, 8, 8, dtype=torch.float64))
        native.eval()
    fused = []
    for native in natives:
        model_fused, report = cifarnet.fuse(native, report=True)
        assert len(report.fused) == 2, f"the test compares fused layers with native ones; fuse did: {report}"
        fused.append(model_fused)
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)

    def ensemble(models):
        params, buffers = torch.func.stack_module_state(models)
        call = lambda p, b: torch.func.functional_call(models[0], (p, b), (x,))  # noqa: E731
        return torch.func.vmap(call)(params, buffers)

    torch.testing.assert_close(ensemble(fused), ensemble(natives))


@pytest.mark.parametrize(
    "op",
    [
        lambda x, mean, var: ops.batch_norm(x, mean, var, training=True),
        lambda x, mean, var: F.batch_norm(x, mean, var, training=True),
    ],
    ids=["ours", "native"],
)
def test_vmap_of_training_with_shared_running_statistics_fails_as_native(op):
    """Running statistics shared by every example cannot take each example's update: native
    refuses, and so does the op, with native's message."""
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(RuntimeError, match="running_mean or running_var, which will be updated in place"):
        torch.func.vmap(lambda x: op(x, mean, var))(torch.randn(4, 2, 3, 5))


def test_dropout_under_vmap_draws_as_randomness_says():
    """vmap's randomness: "error" refuses the draw, "different" draws a mask per example,
    "same" one mask for all; kept elements are scaled by 1 / (1 - p)."""
    ones = torch.ones(4, 2000)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(lambda x: ops.dropout(x, 0.5))(ones)
    different = torch.func.vmap(lambda x: ops.dropout(x, 0.5), randomness="different")(ones)
    same = torch.func.vmap(lambda x: ops.dropout(x, 0.5), randomness="same")(ones)
    for masks in (different, same):
        assert set(masks.unique().tolist()) == {0.0, 2.0}
    assert not torch.equal(different[0], different[1])
    assert all(torch.equal(same[0], row) for row in same)


class OpNames(TorchDispatchMode):
    """Records the name of every op that reaches the kernels."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "name, fused_backward",
    [
        ("conv2d_relu_max_pool2d", "cifarnet::_conv2d_relu_max_pool2d_backward"),
        ("batch_norm, training", "cifarnet::_batch_norm_backward"),
        ("conv2d_batch_norm_relu_max_pool2d, training", "cifarnet::_conv2d_batch_norm_relu_max_pool2d_training_backward"),
        ("batch_norm_relu_conv2d, training", "cifarnet::_batch_norm_relu_conv2d_training_backward"),
    ],
)
def test_first_derivatives_come_from_the_fused_backward(name, fused_backward):
    """The native composition is for what the fused formulas lack; a plain backward stays the
    fused one, and create_graph=True takes the composition."""
    ours = OPS[name][0]
    tensors = all_tensors(name, "cpu", torch.Generator().manual_seed(5))
    for create_graph in (False, True):
        output = ours(*tensors)
        with OpNames() as recorded:
            torch.autograd.grad(output.sum(), tensors, create_graph=create_graph)
        assert (fused_backward in recorded.names) == (not create_graph), sorted(recorded.names)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_second_derivatives_and_forward_ad(device):
    """Dropout is linear with the seed's mask: its gradient, second derivatives and tangent all
    apply that mask."""
    input = torch.randn(3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    seed = torch.tensor([1234])

    def op(x):
        return torch.ops.cifarnet.dropout(x, seed, 0.4)

    assert torch.autograd.gradgradcheck(op, (input,))
    scaled_mask = op(torch.ones_like(input)).detach()
    assert 0 < (scaled_mask == 0).sum() < scaled_mask.numel()
    tangent = torch.randn_like(input)
    with fwAD.dual_level():
        output = fwAD.unpack_dual(op(fwAD.make_dual(input.detach(), tangent)))
    torch.testing.assert_close(output.primal, input.detach() * scaled_mask)
    torch.testing.assert_close(output.tangent, tangent * scaled_mask)
    _, jvp_tangent = torch.func.jvp(op, (input.detach(),), (tangent,))
    torch.testing.assert_close(jvp_tangent, tangent * scaled_mask)
