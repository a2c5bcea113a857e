"""The training step replayed from CUDA graphs (cifarnet.study.train.cuda_graph) against the
eager step, and where the graphs are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cifarnet
from cifar10_fakes import make_split, write_pickles
from cifarnet.study.data import load_cifar10
from cifarnet.study.models import ConvNet
from cifarnet.study.train import TrainConfig, epoch, make_optimizer, train
from cifarnet.study.train.cuda_graph import GraphedTrainingStep, cuda_graph_problem, set_lr

CUDA = cifarnet.build_info()["cuda"] and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and a build with CUDA kernels")


def test_graphs_are_refused_off_cuda_and_for_several_processes():
    assert "CUDA device" in cuda_graph_problem(torch.device("cpu"), data_parallel=False)
    assert "several processes" in cuda_graph_problem(torch.device("cuda"), data_parallel=True)
    assert cuda_graph_problem(torch.device("cuda"), data_parallel=False) is None


def test_epoch_on_the_cpu_refuses_cuda_graphs_with_the_reason():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(ValueError, match=r"^cuda_graph: CUDA graphs need a CUDA device, and training runs on cpu"):
        epoch(batches, model, nn.CrossEntropyLoss(), optimizer, cuda_graph=True)


def test_set_lr_fills_tensor_rates_in_place_and_replaces_floats():
    rate = torch.tensor(0.1)
    tensor_group, float_group = {"lr": rate}, {"lr": 0.1}
    set_lr(tensor_group, 0.05)
    set_lr(float_group, 0.05)
    assert tensor_group["lr"] is rate and rate.item() == pytest.approx(0.05)
    assert float_group["lr"] == 0.05


def test_learning_rates_are_device_tensors_inside_and_floats_after():
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with GraphedTrainingStep(model, nn.CrossEntropyLoss(), optimizer):
        assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor)
        set_lr(optimizer.param_groups[0], 0.025)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025) and isinstance(optimizer.param_groups[0]["lr"], float)


def _steps(model, optimizer, batches, graphed: bool):
    """Losses of a step per batch, eager or replayed (warm-up, capture, replays, a smaller batch)."""
    criterion = nn.CrossEntropyLoss()
    losses = []
    if not graphed:
        for inputs, labels in batches:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses
    with GraphedTrainingStep(model, criterion, optimizer) as step:
        for inputs, labels in batches:
            _, loss = step.forward_backward(inputs, labels)
            losses.append(loss.item())
            step.step()
    return losses


@needs_cuda
@pytest.mark.parametrize("ops", ["fused", "native"])
def test_replayed_steps_equal_eager_steps(ops):
    torch.manual_seed(0)
    # No dropout: its masks are drawn per call, eagerly; the batch norm's statistics are kept.
    reference = ConvNet("normalized", ops).cuda().train()
    generator = torch.Generator().manual_seed(1)
    sizes = [16] * 6 + [5]  # warm-up, capture and replays, then a smaller last batch (eager)
    batches = [
        (torch.randn(n, 3, 32, 32, generator=generator).cuda(), torch.randint(0, 10, (n,), generator=generator).cuda())
        for n in sizes
    ]
    results = {}
    for graphed in (False, True):
        model = ConvNet("normalized", ops).cuda().train()
        model.load_state_dict(reference.state_dict())
        optimizer, _ = make_optimizer(model, TrainConfig(variant="normalized", lr=0.05))
        results[graphed] = (_steps(model, optimizer, batches, graphed), [p.detach().clone() for p in model.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-4)
    for graphed_parameter, eager_parameter in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(graphed_parameter, eager_parameter, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_two_epochs_with_and_without_graphs_give_the_same_metrics(tmp_path):
    write_pickles(tmp_path / "cifar", make_split(96, seed=11), make_split(32, seed=12))
    data = load_cifar10(tmp_path / "cifar", progress=False)
    config = TrainConfig(variant="full", epochs=2, batch_size=16)
    histories = [
        train(config, tmp_path / f"graph-{graphed}", data=data, device="cuda", progress=False, cuda_graph=graphed)
        for graphed in (False, True)
    ]
    for eager, graphed in zip(*histories):
        for key in ("train_loss", "train_top1", "test_loss", "test_top1", "lr"):
            assert graphed[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-3), key
