"""The ops' autograd formulas (csrc/ops/autograd/<op>.cpp): gradients for exactly the tensors that
ask for one, whichever optional tensors are given, equal to the native composition's."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cifarnet import ops
from conftest import DEVICES, native_conv2d_relu_max_pool2d

GEOMETRY = dict(stride=1, padding=1, pool_size=2)


def ones_if_none(weight, channels_of):
    """An all-ones batch-norm weight where none is given: the same function for native to
    differentiate, and it keeps native's CUDA backward off its path for a bias without a
    weight, which fails in torch 2.11 ("tensor does not have a device", seen on an H200)."""
    return weight if weight is not None else torch.ones_like(channels_of[0, :, 0, 0]).detach()


def native_conv2d_batch_norm_relu_max_pool2d(input, weight, bias, bn_weight, bn_bias):
    conv = F.conv2d(input, weight, bias, padding=1)
    return F.max_pool2d(F.relu(F.batch_norm(conv, None, None, ones_if_none(bn_weight, conv), bn_bias, training=True)), 2)


# name: (ours, native, tensor shapes, which tensors are optional)
OPS = {
    "conv2d_relu_max_pool2d": (
        lambda x, w, b: ops.conv2d_relu_max_pool2d(x, w, b, **GEOMETRY),
        lambda x, w, b: native_conv2d_relu_max_pool2d(x, w, b, **GEOMETRY),
        [(2, 3, 6, 6), (4, 3, 3, 3), (4,)],
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
    "conv2d_batch_norm_relu_max_pool2d, training": (
        lambda x, w, b, bw, bb: ops.conv2d_batch_norm_relu_max_pool2d(x, w, b, None, None, bw, bb, training=True, **GEOMETRY),
        native_conv2d_batch_norm_relu_max_pool2d,
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
