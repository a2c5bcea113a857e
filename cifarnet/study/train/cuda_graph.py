"""The training step on a GPU, captured in CUDA graphs and replayed batch after batch.

A step of the study's ConvNet launches a few hundred small kernels (0.1-1 ms of GPU work per
layer at batch 128), so on a GPU the host's launching, not the arithmetic, sets its pace. A
CUDA graph records the step's kernels once and replays them with one launch.

:class:`GraphedTrainingStep` keeps the eager loop's semantics: two graphs, not one, so that
the loop still reads each batch's loss before the optimiser steps and stops at a non-finite
one with the weights that produced it; learning rates stay settable between steps (they live
in one-element device tensors while the graphs exist, which the captured fused SGD reads at
every replay); batches of another shape (the last, smaller one) run eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# Eager steps before capture, on a side stream: they let lazy initialisation (cuDNN's and
# cuBLAS's workspaces, autograd's and the optimiser's state) happen outside the graph, as
# torch.cuda.graphs' documentation asks.
WARMUP_STEPS = 3


def cuda_graph_problem(device: torch.device, *, data_parallel: bool) -> str | None:
    """Why the training step cannot be captured on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, and training runs on {device}"
    if data_parallel:
        return "the step of several processes is not captured (DistributedDataParallel's hooks run eagerly)"
    return None


def set_lr(group: dict, lr: float) -> None:
    """Sets a parameter group's learning rate, in place where it is a tensor (so that a captured
    optimiser step sees it)."""
    if isinstance(group["lr"], Tensor):
        group["lr"].fill_(lr)
    else:
        group["lr"] = lr


class GraphedTrainingStep:
    """Forward, loss and backward in one CUDA graph, gradient clipping and the optimiser step in
    a second, replayed for every batch of the shape they were captured with.

    Use as a context manager around one epoch: inside it, the optimiser's learning rates are
    one-element tensors on the model's device (set them with :func:`set_lr`); on exit they are
    floats again, the values they ended the epoch with, and the graphs are freed.

    Args:
        model: the network, on a CUDA device, in training mode.
        criterion: the loss of ``(logits, labels)``.
        optimizer: updates the model's parameters (a capturable step: torch's fused or foreach
            SGD is).
        autocast_dtype: forward and loss under ``torch.autocast`` in this dtype (None: none).
        clip_grad_norm: clip the gradients to this total 2-norm before each step (None: no).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Tensor, Tensor], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        autocast_dtype: torch.dtype | None = None,
        clip_grad_norm: float | None = None,
    ):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.autocast_dtype = autocast_dtype
        self.clip_grad_norm = clip_grad_norm
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.device = self.parameters[0].device
        self.side_stream: torch.cuda.Stream | None = None
        self.eager_steps = 0
        self.forward_graph: torch.cuda.CUDAGraph | None = None
        self.step_graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, Tensor] = {}
        self.replaying = False  # whether the current batch's forward was a replay

    def __enter__(self) -> GraphedTrainingStep:
        for group in self.optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        self.forward_graph = self.step_graph = None
        self.static.clear()
        for group in self.optimizer.param_groups:
            group["lr"] = float(group["lr"])

    def forward_backward(self, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and loss of a batch, with the parameters' gradients of that loss computed.
        The tensors are the graph's own outputs when replayed: valid until the next batch."""
        shape = (inputs.shape, inputs.stride(), inputs.dtype, labels.shape)
        if self.forward_graph is not None and shape == self.static["shape"]:
            self.static["inputs"].copy_(inputs, non_blocking=True)
            self.static["labels"].copy_(labels, non_blocking=True)
            self.forward_graph.replay()
            self.replaying = True
            return self.static["logits"], self.static["loss"]
        self.replaying = False
        if self.forward_graph is None and self.eager_steps >= WARMUP_STEPS:
            self._capture(inputs, labels, shape)
            return self.forward_backward(inputs, labels)
        with self._eager_stream():
            # Once captured, the graphs own the gradient tensors .grad points at: zeroed in
            # place, they stay the ones the captured step reads.
            self.optimizer.zero_grad(set_to_none=self.forward_graph is None)
            logits, loss = self._forward(inputs, labels, cache=True)
            loss.backward()
        return logits, loss

    def step(self) -> None:
        """Clips the gradients and steps the optimiser, as the graph when the forward was
        replayed, else eagerly."""
        if self.replaying:
            self.step_graph.replay()
            return
        with self._eager_stream():
            self._clip_and_step()
        self.eager_steps += 1

    def _forward(self, inputs: Tensor, labels: Tensor, *, cache: bool) -> tuple[Tensor, Tensor]:
        # NB: autocast's cache of cast weights must be off while capturing: its casts would be
        # made once, at capture, into memory the graph does not own.
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None,
                            cache_enabled=cache):
            logits = self.model(inputs)
            return logits, self.criterion(logits, labels)

    def _clip_and_step(self) -> None:
        if self.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(self.parameters, self.clip_grad_norm)
        self.optimizer.step()

    def _eager_stream(self):
        """Warm-up steps run on a side stream (see WARMUP_STEPS); later eager ones (another
        batch shape) on the current stream."""
        if self.forward_graph is not None:
            return torch.cuda.stream(torch.cuda.current_stream(self.device))
        if self.side_stream is None:
            self.side_stream = torch.cuda.Stream(self.device)
        self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
        return _StreamThenJoin(self.side_stream, self.device)

    def _capture(self, inputs: Tensor, labels: Tensor, shape) -> None:
        self.static = {"shape": shape, "inputs": inputs.clone(), "labels": labels.clone()}
        # The backward captured from no gradients writes fresh ones at every replay, into
        # tensors of the graph's pool that .grad keeps pointing at: nothing accumulates.
        self.optimizer.zero_grad(set_to_none=True)
        forward_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(forward_graph):
            logits, loss = self._forward(self.static["inputs"], self.static["labels"], cache=False)
            loss.backward()
        step_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(step_graph, pool=forward_graph.pool()):
            self._clip_and_step()
        self.static.update(logits=logits, loss=loss)
        self.forward_graph, self.step_graph = forward_graph, step_graph


class _StreamThenJoin:
    """Runs a block on ``stream``, then makes the device's current stream wait for it."""

    def __init__(self, stream: torch.cuda.Stream, device: torch.device):
        self.stream, self.device = stream, device
        self.context = torch.cuda.stream(stream)

    def __enter__(self):
        self.context.__enter__()

    def __exit__(self, *exc_info):
        self.context.__exit__(*exc_info)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
