"""The study's training loop: one ``epoch`` function for train and test, a run per variant,
per-epoch metrics, plots and atomic, resumable checkpoints.

A run writes into its output folder:

* ``metrics.jsonl``: one JSON object per epoch with the keys :data:`METRIC_KEYS`;
* ``batch_losses.csv``: ``epoch,batch,loss`` for every training batch;
* ``curves.png`` ("Accuracy / epoch" beside "Loss / epoch") and ``batch_losses.png``;
* ``checkpoint.pt``: everything needed to continue (see :func:`train`), and a record of the
  data the run was trained on, so that a resume on other data is refused;
* ``diverged.json``, only where training diverged: the epoch and batch whose loss was not
  finite (see :class:`TrainingDiverged`).

A folder that already holds a run is neither resumed nor replaced unless asked (``resume`` or
``overwrite``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import cifarnet.nn
from cifarnet.data import CIFAR10, CROP_SIZE, IMAGE_SIZE, load_cifar10, make_loaders
from cifarnet.distributed import EveryProcessError, Peers, epoch_seed
from cifarnet.fileio import atomic_save, atomic_write_text, describe_file, output_folder_problem
from cifarnet.models import OPS, ConvNet
from cifarnet.plots import plot_batch_losses, plot_curves
from cifarnet.variants import check_variant, recipe

__all__ = [
    "CHECKPOINT_FILE",
    "DEVICES",
    "METRIC_KEYS",
    "PRECISIONS",
    "REMEDIES",
    "EpochResult",
    "TrainConfig",
    "TrainingCollapsed",
    "TrainingDiverged",
    "data_record",
    "epoch",
    "earlier_run_files",
    "load_checkpoint",
    "make_optimizer",
    "resolve_device",
    "train",
    "warmup_factor",
]

METRIC_KEYS = (
    "epoch", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "test_classes_predicted",
    "lr", "seconds", "world_size",
)
"""The keys of each ``metrics.jsonl`` line, in order (``test_classes_predicted``: how many
classes the model gave as its first prediction over the test set, 1 for a collapsed network;
``world_size``: the processes that trained the epoch, as a run resumed with another number of
processes changes it). Runs written before ``test_classes_predicted`` existed lack it."""

DEVICES = ("auto", "cpu", "cuda")
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
BATCH_LOSSES_FILE = "batch_losses.csv"
CURVES_FILE = "curves.png"
BATCH_LOSSES_PLOT = "batch_losses.png"
DIVERGENCE_FILE = "diverged.json"
CHECKPOINT_FORMAT = 1
# precision -> the autocast dtype of the forward passes (None: no autocast).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
CHECKPOINT_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "rng", "history", "batch_losses")
# Optional: what the run was trained on (see data_record); checkpoints written before it was
# recorded lack it and still resume, unchecked.
CHECKPOINT_DATA_KEY = "data"
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, BATCH_LOSSES_FILE, CURVES_FILE, BATCH_LOSSES_PLOT, DIVERGENCE_FILE)
"""The files a run writes into its folder (and ``overwrite`` removes)."""

# The batches' layout. The fused ops work channels last inside, so channels-last batches (and
# hence activations) spare each layer two layout copies a step (6-8% of a `full` training step
# on the CPU); native layers are faster in it too. The layout changes no value. The parameters
# stay contiguous: fused SGD would copy channels-last ones to contiguous and back every step.
TRAINING_MEMORY_FORMAT = torch.channels_last

# Settings that may change when a run is resumed: how long it runs, and how the same
# computation is carried out (fused and native models share their state_dict, and the
# checkpoint of any number of processes is that of one model; a switch is noted, since
# rounding and random draws then differ from the uninterrupted run).
RESUMABLE_CHANGES = ("epochs", "ops", "world_size", "sync_batch_norm")

# Settings that stabilise the study's schedule, off by default so the study runs as published
# (without batch norm, SGD at lr 0.1 with momentum 0.9 is at the edge of stability): setting ->
# the value a divergence message suggests, the better first: over seeds 0-7 of momentum and
# dropout (tools/divergence_study.py), clipping at 5 kept every run that diverges without it
# and failed none, while a one-epoch warm-up delayed failures into the second epoch. A
# complete run is kept whatever its remedies were (nothing of it is trained again); a partial
# one resumes only with its own.
REMEDIES = {"clip_grad_norm": 5.0, "warmup_epochs": 1}


@dataclass(frozen=True)
class TrainConfig:
    """What defines a run of the study (SEED.md's defaults).

    Attributes:
        variant: one of :data:`cifarnet.variants.VARIANTS`.
        epochs: epochs to reach (a resumed run continues up to this many).
        batch_size: training and test mini-batch size: the global batch, which the
            ``world_size`` processes share, ``batch_size / world_size`` samples each.
        lr: initial SGD learning rate.
        seed: seeds initialisation, dropout, shuffling and augmentation.
        ops: ``"fused"`` or ``"native"`` conv→ReLU→pool stages (see :class:`ConvNet`).
        limit_train: train on the first ``limit_train`` training images only (None: all).
        precision: ``"float32"`` (the study as published) or ``"bfloat16"``: forward passes
            under ``torch.autocast`` in that dtype (see :data:`PRECISIONS`); parameters,
            optimizer state and batch-norm statistics stay float32.
        warmup_epochs: raise the learning rate linearly, batch by batch, from ``lr / W`` to the
            scheduled rate over the first ``warmup_epochs`` epochs (W batches in all); see
            :func:`warmup_factor`. 0 (the study) for none.
        clip_grad_norm: rescale the gradients of each batch to at most this total 2-norm
            (``torch.nn.utils.clip_grad_norm_``) before the step; None (the study) for no
            clipping.
        world_size: the processes training together (data parallel, under ``torchrun``); 1
            for one process. Recorded so a reader knows how the run was made; :func:`train`
            checks it against the process group it runs in.
        sync_batch_norm: with several processes, normalise with the statistics of the whole
            global batch (``cifarnet.nn.convert_sync_batchnorm``) rather than of each process's
            slice. The same with one process, or without batch norm (only ``full`` has it).
    """

    variant: str = "full"
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.1
    seed: int = 0
    ops: str = "fused"
    limit_train: int | None = None
    precision: str = "float32"
    warmup_epochs: int = 0
    clip_grad_norm: float | None = None
    world_size: int = 1
    sync_batch_norm: bool = True

    def __post_init__(self) -> None:
        check_variant(self.variant)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.ops not in OPS:
            raise ValueError(f"ops must be one of {', '.join(OPS)}; got {self.ops!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1; got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number; got {self.lr}")
        if self.limit_train is not None and self.limit_train < 1:
            raise ValueError(f"limit_train must be at least 1 (or None for all images); got {self.limit_train}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be 0 (none) or more; got {self.warmup_epochs}")
        if self.clip_grad_norm is not None and not (math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a positive number (or None for no clipping); got {self.clip_grad_norm}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1; got {self.world_size}")
        if self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} does not split evenly among world_size {self.world_size} processes "
                f"(each takes batch_size / world_size samples per step); expected a multiple of {self.world_size}"
            )


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss: the run stopped at that batch.

    Attributes:
        variant: the run's variant.
        epoch: the epoch (from 1) in which the loss was not finite.
        batch: the training batch (from 1) whose loss was not finite, or None where the
            training losses were finite but the test loss of the epoch's model was not.
        loss: the non-finite value (nan, inf or -inf).
        remedies: the remedies to suggest (setting -> value), those the run lacks.
    """

    def __init__(self, variant: str, epoch: int, batch: int | None, loss: float, remedies: dict):
        self.variant, self.epoch, self.batch, self.loss, self.remedies = variant, epoch, batch, loss, remedies
        super().__init__(self.describe({name: f"{name}={value}" for name, value in remedies.items()}))

    def _what_happened(self) -> str:
        where = f"batch {self.batch}" if self.batch is not None else "test pass"
        what = "loss" if self.batch is not None else "test loss"
        return f"{self.variant} epoch {self.epoch} {where}: the {what} is {self.loss} (training diverged)"

    def describe(self, remedy_names: dict[str, str]) -> str:
        """The one-line message, naming each remedy as ``remedy_names[setting]`` (e.g. an option)."""
        message = f"{self._what_happened()}; the study's schedule is at the edge of stability without batch norm"
        if not self.remedies:
            return f"{message}: try a lower learning rate"
        return f"{message}: try {' or '.join(remedy_names[name] for name in self.remedies)} (off by default)"


class TrainingCollapsed(TrainingDiverged):
    """Training left a network that gives every test image the same class, with a finite loss,
    after an epoch in which no gradient reached its first layer: its ReLUs died (no input makes
    them positive, so nothing flows back through them), and nothing is left to train. The run
    stopped after that epoch's test pass. ``batch`` is None and ``loss`` is the test loss.
    """

    def _what_happened(self) -> str:
        return (
            f"{self.variant} epoch {self.epoch} test pass: the model gives every test image the same class and "
            f"no gradient reached its first layer in the whole epoch, test loss {self.loss:.4f} (training collapsed)"
        )


class _NonFiniteLoss(ArithmeticError):
    """Raised by :func:`epoch` at the first training batch whose loss is not finite."""

    def __init__(self, batch: int, loss: float):
        super().__init__(f"batch {batch}: loss {loss}")
        self.batch, self.loss = batch, loss


def warmup_factor(step: int, warmup_steps: int) -> float:
    """The warm-up's multiplier of the scheduled learning rate at training batch ``step``.

    Args:
        step: batches trained before this one, counted from the start of the run (0 first).
        warmup_steps: the length of the warm-up in batches (0: none).

    Returns:
        ``(step + 1) / warmup_steps`` during the warm-up, so the first batch trains at
        ``1 / warmup_steps`` of the rate and the last one at the full rate; 1.0 after it.
    """
    if step + 1 >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


@dataclass
class EpochResult:
    """Loss and accuracy of one pass over a data set.

    Attributes:
        loss: mean cross-entropy per example.
        top1, top5: percentage of examples whose label is the first, or among the first
            five, predictions.
        batch_losses: the mean loss of each batch, in order.
        classes_predicted: evaluation only: how many classes were some example's first prediction.
        first_layer_learned: training only: whether some step's gradient of the model's first
            parameter was not all zeros (False: no gradient got through to it all epoch).
    """

    loss: float
    top1: float
    top5: float
    batch_losses: list[float] = field(default_factory=list)
    classes_predicted: int | None = None
    first_layer_learned: bool | None = None


def epoch(
    data: Iterable[tuple[Tensor, Tensor]],
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    progress: bool = False,
    description: str = "",
    confusion: Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
    lr_scale: Callable[[int], float] | None = None,
    clip_grad_norm: float | None = None,
    peers: Peers | None = None,
) -> EpochResult:
    """One pass over ``data``: training with ``optimizer``, evaluation without.

    With an optimizer the model is in train mode (dropout and BN batch statistics active),
    its weights move after every batch, and the figures are running averages over the epoch.
    Without, the model is in eval mode under ``torch.no_grad`` and the figures are those of
    the fixed model.

    Args:
        data: batches of ``float32`` inputs ``Tensor[B, 3, H, W]`` and ``int64`` labels
            ``Tensor[B]`` on the model's device.
        model: maps inputs to logits ``Tensor[B, C]``.
        criterion: loss of ``(logits, labels)``, averaged over the batch.
        optimizer: updates the model's parameters; None evaluates.
        progress: show a progress bar with the running loss and accuracy.
        description: the progress bar's label.
        confusion: optional ``int64`` ``Tensor[C, C]`` on the CPU; ``confusion[true, predicted]``
            is incremented for every example.
        autocast_dtype: run the forward pass and loss under ``torch.autocast`` in this dtype
            (None: in the inputs' dtype).
        lr_scale: training only: maps the batch index (from 0) to a multiplier of every
            parameter group's learning rate for that batch's step (a warm-up); the rates are
            restored when the epoch ends, however it ends.
        clip_grad_norm: training only: clip the gradients to this total 2-norm before each step.
        peers: data parallel: ``data`` is a :class:`cifarnet.data.BatchLoader` that yields this
            process's slice of each global batch, and ``model`` is wrapped in
            ``DistributedDataParallel``. Each training step sums the batch's loss over all
            processes during the backward pass (so every process sees the global batch's loss,
            and a non-finite one, at the same step, before its update) and weights this
            process's loss by its share of the batch, so the averaged gradient is that of the
            global batch's mean loss. The returned figures are those of all processes' samples.

    Returns:
        :class:`EpochResult` with example-weighted averages; ``batch_losses`` are those of the
        global batches.

    Raises:
        ArithmeticError: training only, at the first batch whose loss is not finite, before
            its step (so the weights are those that produced it); ``batch`` (from 1) and
            ``loss`` are attributes.
        cifarnet.distributed.PeerFailure: with ``peers``, another process stopped.
    """
    training = optimizer is not None
    model.train(training)
    seen = correct1 = correct5 = 0
    loss_sum = 0.0
    batch_losses = []
    predicted_counts = None  # evaluation: examples per first-predicted class
    first_parameter = next((p for p in model.parameters() if p.requires_grad), None) if training else None
    first_layer_learned = False if training else None
    total = len(data) if hasattr(data, "__len__") else None
    bar = tqdm(data, total=total, desc=description, leave=False, disable=not progress, file=sys.stderr, unit="batch")
    scheduled_lrs = [group["lr"] for group in optimizer.param_groups] if training else []
    # DDP's forward (buffers) and backward (gradients) communicate too.
    communication = peers.guard("training" if training else "testing") if peers is not None else contextlib.nullcontext()
    try:
        with torch.set_grad_enabled(training), communication:
            for index, (inputs, labels) in enumerate(bar):
                with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    logits = model(inputs)
                    loss = criterion(logits, labels)
                local_loss = batch_loss = loss.item()
                count = labels.shape[0]
                if training:
                    share, global_loss_sum = 1.0, None
                    if peers is not None:
                        global_count = data.global_batch_size(index)
                        # DDP averages over processes; the weight makes that the global batch's mean.
                        share = count * peers.world_size / global_count
                        # NB: the global loss (and agreement on divergence) is summed while the
                        # backward pass runs, and checked before the step.
                        global_loss_sum = peers.sum_later([local_loss * count], "summing the batch's loss")
                    optimizer.zero_grad(set_to_none=True)
                    try:
                        (loss * share if share != 1.0 else loss).backward()
                    except BaseException:
                        # NB: a collective still running when the process exits aborts it.
                        if global_loss_sum is not None:
                            with contextlib.suppress(Exception):
                                global_loss_sum()
                        raise
                    if global_loss_sum is not None:
                        batch_loss = global_loss_sum()[0] / global_count
                    if not math.isfinite(batch_loss):
                        raise _NonFiniteLoss(index + 1, batch_loss)
                    if not first_layer_learned and first_parameter is not None and first_parameter.grad is not None:
                        # NB: read until the first step that has one: once an epoch, for a network that learns.
                        first_layer_learned = bool(first_parameter.grad.any())
                    if clip_grad_norm is not None:
                        nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
                    if lr_scale is not None:
                        scale = lr_scale(index)
                        for group, scheduled_lr in zip(optimizer.param_groups, scheduled_lrs):
                            group["lr"] = scheduled_lr * scale
                    optimizer.step()
                batch_losses.append(batch_loss)
                loss_sum += local_loss * count
                # One topk serves top-1, top-5 and the confusion matrix, so they agree on ties.
                top = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices
                predicted = top[:, 0]
                if not training:
                    counts = torch.bincount(predicted, minlength=logits.shape[1])
                    predicted_counts = counts if predicted_counts is None else predicted_counts + counts
                correct1 += int((predicted == labels).sum())
                correct5 += int((top == labels[:, None]).any(dim=1).sum())
                if confusion is not None:
                    classes = confusion.shape[0]
                    pairs = (labels * classes + predicted).cpu()
                    confusion += torch.bincount(pairs, minlength=classes * classes).view(classes, classes)
                seen += count
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", top1=f"{100 * correct1 / seen:.2f}%", refresh=False)
    finally:
        # The schedule (ExponentialLR, checkpoints) sees the scheduled rates, never a warm-up's.
        for group, scheduled_lr in zip(optimizer.param_groups if training else [], scheduled_lrs):
            group["lr"] = scheduled_lr
        bar.close()
    predicted_counts = [] if predicted_counts is None else predicted_counts.tolist()
    if peers is not None:
        loss_sum, correct1, correct5, seen = peers.sum([loss_sum, correct1, correct5, seen], "summing the epoch's metrics")
        if not training:
            # NB: gathered, not summed: a process that saw no batch has no counts (and no class count).
            gathered = peers.gather(predicted_counts, "gathering the predicted classes")
            predicted_counts = [sum(column) for column in itertools.zip_longest(*gathered, fillvalue=0)]
    if seen == 0:
        raise ValueError("data yielded no batches")
    classes_predicted = None if training else sum(count > 0 for count in predicted_counts)
    return EpochResult(
        loss_sum / seen, 100 * correct1 / seen, 100 * correct5 / seen, batch_losses, classes_predicted, first_layer_learned
    )


def make_optimizer(
    model: nn.Module, config: TrainConfig
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.ExponentialLR | None]:
    """SGD at ``config.lr`` with the variant's momentum, and its ExponentialLR (or None).

    The update is torch's fused SGD kernel where the parameters' device has one (the CPU and
    CUDA do): the same arithmetic in one pass per parameter, about half the time of the
    per-tensor loop over the study's 1.2 M parameters.
    """
    schedule = recipe(config.variant)
    parameters = list(model.parameters())
    try:
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=schedule.momentum, fused=True)
    except RuntimeError:  # a device without the fused kernel
        optimizer = torch.optim.SGD(parameters, lr=config.lr, momentum=schedule.momentum)
    if schedule.lr_gamma is None:
        return optimizer, None
    return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=schedule.lr_gamma)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; ``"cuda"`` must be available."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {str(device)!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use --device cpu or auto")
    return device


def _check_model_runs_on(model: ConvNet, device: torch.device) -> None:
    """Fails early, in one line, where the build lacks a kernel for ``device`` (fused ops)."""
    if device.type == "cpu":
        return
    size = CROP_SIZE if model.recipe.augment else IMAGE_SIZE
    was_training = model.training
    model.eval()  # no BN statistics move, no dropout draws
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    except (NotImplementedError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"ops={model.ops!r} cannot run on {device} ({first_line}); try ops='native'") from None
    finally:
        model.train(was_training)


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_python(np.random.get_state()),
        "data": generator.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_to_python(state) -> tuple:
    # Plain Python types, so checkpoints load with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian))


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value):
    """``random.setstate`` needs tuples where a round trip may have given lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by :func:`train`.

    Returns:
        dict with ``format``, ``epoch`` (epochs completed), ``config`` (a
        :class:`TrainConfig` as dict), ``model``, ``optimizer``, ``scheduler`` (None for a
        constant learning rate), ``rng``, ``history`` (the ``metrics.jsonl`` records),
        ``batch_losses`` (per epoch, the loss of each training batch) and, in checkpoints that
        record it, ``data`` (see :func:`data_record`).

    Raises:
        ValueError: ``path`` is not a readable cifarnet checkpoint; the message says what it is
            instead.
    """
    path = Path(path)
    expected = f"expected a {CHECKPOINT_FILE} written by cifarnet-train"
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; {expected}")
    if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
        raise ValueError(f"checkpoint {path} is a folder; did you mean {path / CHECKPOINT_FILE}?")
    if not zipfile.is_zipfile(path):
        # torch.save writes a ZIP archive; anything else (an image, a text file) is not ours.
        raise ValueError(f"{path} is not a checkpoint: it is {describe_file(path)}; {expected} (a torch.save ZIP archive)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a checkpoint: {_torch_load_failure(error)}; {expected}") from None
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise ValueError(
            f"{path} is a torch file but not a cifarnet checkpoint: it holds {_describe_object(checkpoint)}; {expected} "
            f"(a dict with format {CHECKPOINT_FORMAT} and {', '.join(CHECKPOINT_KEYS)})"
        )
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {checkpoint['format']!r}; this cifarnet reads format {CHECKPOINT_FORMAT}"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    try:
        TrainConfig(**checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path} holds an unusable config ({error})") from None
    return checkpoint


def _torch_load_failure(error: Exception) -> str:
    """One clause saying why ``torch.load(weights_only=True)`` refused a ZIP archive."""
    message = " ".join(str(error).split())
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if unsupported:
        # weights_only refuses pickled Python objects; a cifarnet checkpoint holds none.
        return f"it is a torch file holding a Python object of type {unsupported.group(1)}"
    return f"it is a ZIP archive torch cannot load ({message[:200] or type(error).__name__})"


def _describe_object(value) -> str:
    if isinstance(value, dict):
        keys = [str(key) for key in list(value)[:6]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(value) > 6 else ''}" if keys else "an empty dict"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _resumable_config(saved: dict, config: TrainConfig, path: Path, *, complete: bool = False) -> None:
    # A setting a checkpoint predates (precision, the remedies) had its default then.
    def differs(name: str, default) -> bool:
        return saved.get(name, default) != getattr(config, name)

    allowed = RESUMABLE_CHANGES + (tuple(REMEDIES) if complete else ())
    changed = [
        f"{f.name}: {saved.get(f.name, f.default)!r} -> {getattr(config, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in allowed and differs(f.name, f.default)
    ]
    kept = [f"{f.name}={saved.get(f.name, f.default)!r}" for f in fields(TrainConfig) if f.name in REMEDIES]
    if complete and any(differs(f.name, f.default) for f in fields(TrainConfig) if f.name in REMEDIES):
        _note(f"{path} is a complete run trained with {', '.join(kept)}; it is kept as it is")
    if changed:
        raise ValueError(
            f"cannot resume {path} with different settings ({'; '.join(changed)}); "
            "resume with the run's settings, or train into another folder"
        )
    if saved.get("ops") != config.ops:
        _note(
            f"{path} was trained with {saved.get('ops')} ops and continues with {config.ops} ops: the two compute "
            "the same function on the same weights, but round differently in float32, so the result will not "
            "match an uninterrupted run bit for bit"
        )
    saved_world_size = saved.get("world_size", 1)
    if saved_world_size != config.world_size:
        _note(
            f"{path} was trained by {_processes(saved_world_size)} and continues with {_processes(config.world_size)}: "
            "the same samples and crops make each step, but gradients are summed in another order and dropout "
            "draws other masks, so the result will not match an uninterrupted run bit for bit"
        )


def _processes(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def data_record(data: CIFAR10, limit_train: int | None = None) -> dict:
    """What a run trains and tests on, as stored in its checkpoint under ``"data"``.

    Args:
        data: the loaded data set.
        limit_train: the run's ``TrainConfig.limit_train``.

    Returns:
        dict with ``root`` (the folder read, resolved), ``layout``, ``train_images`` (those
        used), ``test_images`` and ``sha256``, a hash of the pixels and labels of both (so the
        same images read from another place are recognised as the same data).
    """
    train_split = data.train.head(limit_train) if limit_train is not None else data.train
    digest = hashlib.sha256()
    for tensor in (train_split.images, train_split.labels, data.test.images, data.test.labels):
        digest.update(tensor.contiguous().numpy())
    return {
        "root": str(Path(data.root).resolve()),
        "layout": data.layout,
        "train_images": len(train_split),
        "test_images": len(data.test),
        "sha256": digest.hexdigest(),
    }


def _describe_data(record: dict) -> str:
    return f"{record['root']} ({record['train_images']:,} training and {record['test_images']:,} test images)"


def _check_same_data(saved, current: dict, path: Path) -> None:
    """Refuses to resume on other data; says so where it cannot tell, or where only the path moved."""
    if not (isinstance(saved, dict) and saved.keys() >= current.keys()):
        _note(f"{path} does not record the data it was trained on (written by an older cifarnet); continuing on "
              f"{_describe_data(current)} unchecked")
        return
    if saved.get("sha256") != current["sha256"]:
        raise ValueError(
            f"cannot resume {path} on other data: it was trained on {_describe_data(saved)}, not on "
            f"{_describe_data(current)}; point the data folder at the run's data, or train into another folder"
        )
    if saved.get("root") != current["root"]:
        _note(f"{path} was trained on {saved.get('root')}; {current['root']} holds the same images, so the run continues")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stdout, flush=True)


def earlier_run_files(out: str | Path) -> list[str]:
    """The names of the files in ``out`` that show an earlier run: its checkpoint, or metrics of
    at least one epoch. Empty where ``out`` holds no run (a run stopped in its first epoch
    leaves nothing worth keeping)."""
    out = Path(out)
    if not out.is_dir():
        return []
    metrics = out / METRICS_FILE
    found = [CHECKPOINT_FILE] if (out / CHECKPOINT_FILE).exists() else []
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    return found


def _write_records(out: Path, history: list[dict], batch_losses: list[list[float]]) -> None:
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))
    atomic_write_text(out / BATCH_LOSSES_FILE, "epoch,batch,loss\n" + "".join(_batch_loss_rows(batch_losses)))


def _batch_loss_rows(batch_losses: list[list[float]], first_epoch: int = 1) -> Iterable[str]:
    for epoch_number, losses in enumerate(batch_losses, start=first_epoch):
        for batch, loss in enumerate(losses, start=1):
            yield f"{epoch_number},{batch},{loss!r}\n"


def _diverged(
    config: TrainConfig, out: Path, epoch_number: int, batch: int | None, loss: float, *, record: bool = True,
    collapsed: bool = False,
):
    """Records the divergence (or collapse) in ``out`` (beside the last good epoch's files) and
    raises; only ``record``-ing processes (rank 0) write."""
    remedies = {name: value for name, value in REMEDIES.items() if getattr(config, name) in (0, None)}
    error = (TrainingCollapsed if collapsed else TrainingDiverged)(config.variant, epoch_number, batch, loss, remedies)
    if record:
        entry = {"epoch": epoch_number, "batch": batch, "loss": str(loss), "message": str(error)}
        if collapsed:
            entry["collapsed"] = True
        atomic_write_text(out / DIVERGENCE_FILE, json.dumps(entry) + "\n")
    raise error


def _on_main(peers: Peers | None, work: Callable[[], object]):
    """Runs ``work()`` on rank 0 (the one process that owns the output folder) and gives every
    process its result; a ``ValueError`` it raises is raised on every process, so that all of
    them stop with the same message instead of waiting for rank 0."""
    result, problem = None, None
    if peers is None or peers.is_main:
        try:
            result = work()
        except ValueError as error:
            problem = error
    if peers is not None:
        result, message = peers.broadcast((result, None if problem is None else str(problem)))
        if message is not None and problem is None:
            problem = EveryProcessError(message)
    if problem is not None:
        raise problem
    return result


def _check_processes_agree(peers: Peers, config: TrainConfig, trained_on: dict) -> None:
    """Refuses to start where a process was given other settings, or reads other images, than
    rank 0 (e.g. a machine with another copy of the data). Raises the same error everywhere."""
    everyone = peers.gather((asdict(config), trained_on["sha256"]))
    main_config, main_data = everyone[0]
    for rank, (rank_config, rank_data) in enumerate(everyone):
        changed = [
            f"{name}: {main_config.get(name)!r} on rank 0, {value!r}"
            for name, value in rank_config.items()
            if main_config.get(name) != value
        ]
        if changed:
            raise EveryProcessError(
                f"rank {rank} was started with other settings than rank 0 ({'; '.join(changed)}); "
                "start every process with the same options"
            )
        if rank_data != main_data:
            raise EveryProcessError(
                f"rank {rank} reads other images than rank 0 (another sha256 of their pixels and labels); "
                "every process must read the same data"
            )


def _check_last_batch(train_count: int, batch_size: int, world_size: int) -> None:
    """With several processes, each must get at least one sample of every training batch."""
    last = train_count % batch_size
    if world_size > 1 and 0 < last < world_size:
        raise EveryProcessError(
            f"the last training batch holds {last} image{'s' if last > 1 else ''} ({train_count} training images in "
            f"batches of {batch_size}), fewer than the {world_size} processes, so a process would have none; "
            f"choose a limit_train (--limit-train) that leaves 0 or at least {world_size} images for the last batch"
        )


def train(
    config: TrainConfig,
    out: str | Path,
    *,
    data: CIFAR10 | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    threads: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    peers: Peers | None = None,
) -> list[dict]:
    """Trains and tests one variant, epoch by epoch, writing results and checkpoints to ``out``.

    Each epoch trains on the (shuffled, augmented) training set, tests the end-of-epoch model,
    steps the learning-rate schedule, then saves ``checkpoint.pt`` atomically (model, optimiser,
    scheduler, the torch/CUDA/python/numpy random states and the data generator, epoch, config,
    history), appends to ``metrics.jsonl`` and ``batch_losses.csv`` and redraws the plots. So a
    run killed at any moment loses at most the epoch in progress, and on the CPU a resumed run
    gives the same metrics, bit for bit, as one that was never interrupted.

    With ``peers`` (several processes under ``torchrun``), the processes train one model data
    parallel: each takes its slice of every global batch of ``config.batch_size`` (the same
    samples and crops a single process would see; see :class:`cifarnet.data.BatchLoader`), the
    model is wrapped in ``DistributedDataParallel`` (and, for batch norm with
    ``config.sync_batch_norm``, converted with ``cifarnet.nn.convert_sync_batchnorm``), and the
    figures are summed over all processes (the test set is split among them too, evaluated with
    rank 0's batch-norm statistics, so the figures are those of the saved model). Only rank 0
    checks and writes ``out``, shows progress and prints; it reads the checkpoint and sends it
    to the others. Every process seeds its own dropout draws each epoch from (seed, rank,
    epoch). A checkpoint resumes with any number of processes: it holds one model's state, and
    the data generator's state, which does not depend on the number of processes. Bit for bit,
    a run resumed with the number of processes it was interrupted with reproduces the
    uninterrupted run; one resumed with another number continues on the same samples and
    crops, but gradients are then summed in another order and dropout draws other masks.

    Args:
        config: the run's settings; ``config.world_size`` must be the number of processes.
        out: output folder (created).
        data: the data set, already loaded (e.g. shared by several runs); else read from
            ``data_dir`` with :func:`cifarnet.data.load_cifar10`.
        data_dir: see :func:`cifarnet.data.load_cifar10`.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (``"cuda:N"`` for one GPU of several).
        threads: ``torch.set_num_threads(threads)`` for CPU ops (None: leave it).
        resume: continue from ``out/checkpoint.pt`` if it exists; else start afresh. Its
            settings must equal ``config`` except ``epochs``, ``ops`` (fused and native models
            share their weights; a switch prints a note), ``world_size`` and
            ``sync_batch_norm`` (a change prints a note) and, for a run already complete
            (nothing is trained), the remedies of :data:`REMEDIES`; it must have been trained
            on the same images (the same ``limit_train`` and, per :func:`data_record`, the same
            pixels and labels; moved data prints a note, a checkpoint that predates the record
            resumes unchecked, with a note).
        overwrite: where ``out`` already holds a run, remove its files (:data:`RUN_FILES`) and
            start afresh. Without ``resume`` or ``overwrite`` such a folder is refused.
        progress: show progress bars and print one summary line per epoch (rank 0 only).
        peers: the processes training together (:class:`cifarnet.distributed.Peers`), or None
            for one process.

    Returns:
        The ``metrics.jsonl`` records of all epochs so far (dicts with :data:`METRIC_KEYS`).

    Raises:
        TrainingDiverged: a training batch's loss (or the test loss of an epoch's model) was not
            finite. The run stops at that batch; its folder keeps the files of the last
            complete epoch, and ``diverged.json`` records where it diverged.
        ValueError: bad settings, an unusable device, an output folder that cannot be written or
            holds a run (without ``resume`` or ``overwrite``), a checkpoint that does not fit,
            or processes given other settings or data than rank 0. With ``peers``, every
            process raises the same error.
        cifarnet.data.DataError: the data set cannot be read.
        cifarnet.distributed.PeerFailure: another process stopped, or stalled for longer than
            the process group's timeout.
    """
    out = Path(out)
    world_size = 1 if peers is None else peers.world_size
    is_main = peers is None or peers.is_main
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run in out, or replace it")
    if config.world_size != world_size:
        raise ValueError(
            f"config.world_size is {config.world_size}, but {world_size} process{'es' if world_size > 1 else ''} "
            "train; expected the number of processes"
        )
    device = resolve_device(device)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1; got {threads}")
        torch.set_num_threads(threads)
    checkpoint_path = out / CHECKPOINT_FILE

    def open_run() -> dict | None:
        problem = output_folder_problem(out)
        if problem:
            raise ValueError(f"output folder {out}: {problem}")
        earlier = earlier_run_files(out)
        if earlier and not (resume or overwrite):
            raise ValueError(
                f"{out} already holds a run ({', '.join(earlier)}); resume it (resume=True) or replace it (overwrite=True)"
            )
        if not (resume and checkpoint_path.exists()):
            return None
        found = load_checkpoint(checkpoint_path)
        _resumable_config(found["config"], config, checkpoint_path, complete=found["epoch"] >= config.epochs)
        return found

    checkpoint = _on_main(peers, open_run)
    if data is None:
        data = load_cifar10(data_dir, progress=progress and is_main)
    trained_on = data_record(data, config.limit_train)
    if checkpoint is not None:
        _on_main(peers, lambda: _check_same_data(checkpoint.get(CHECKPOINT_DATA_KEY), trained_on, checkpoint_path))
    if peers is not None:
        _check_processes_agree(peers, config, trained_on)
    _check_last_batch(trained_on["train_images"], config.batch_size, world_size)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            # Only now, once settings and data are known to be good: a failed start keeps the old run.
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        # A divergence recorded earlier is history once training starts again.
        (out / DIVERGENCE_FILE).unlink(missing_ok=True)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    # The same on every process: one shuffled order and one set of crops, each process taking its slice.
    generator = torch.Generator().manual_seed(config.seed)
    model = ConvNet(config.variant, config.ops).to(device)
    history: list[dict] = []
    batch_losses: list[list[float]] = []
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        _set_rng_state(checkpoint["rng"], generator, device)
        history, batch_losses = list(checkpoint["history"]), [list(b) for b in checkpoint["batch_losses"]]
    _check_model_runs_on(model, device)
    if peers is not None and config.sync_batch_norm and model.recipe.batch_norm:
        model = cifarnet.nn.convert_sync_batchnorm(model)
    # After the conversion, which may replace modules (the parameters are the same, in the same order).
    optimizer, scheduler = make_optimizer(model, config)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(checkpoint["scheduler"])
    # The checkpoint keeps `model`'s state_dict: one model's, without DDP's "module." prefix.
    trained_model = model if peers is None else peers.data_parallel(model)
    if is_main:
        # Rewritten from the checkpoint, so lines of an epoch lost to a crash disappear.
        _write_records(out, history, batch_losses)

    rank = 0 if peers is None else peers.rank
    train_loader, test_loader = make_loaders(
        data, recipe(config.variant), config.batch_size, generator, device=device, limit_train=config.limit_train,
        rank=rank, world_size=world_size, memory_format=TRAINING_MEMORY_FORMAT,
    )
    criterion = nn.CrossEntropyLoss()
    batches_per_epoch = len(train_loader)
    progress = progress and is_main
    if checkpoint is not None and len(history) >= config.epochs and is_main:
        _note(f"{out} is complete ({len(history)} of {config.epochs} epochs); nothing to train")
    for epoch_number in range(len(history) + 1, config.epochs + 1):
        label = f"{config.variant} {epoch_number}/{config.epochs}"
        started = time.perf_counter()
        if peers is not None:
            # Dropout: each process its own masks, reproducible whatever epoch the run resumed at.
            torch.manual_seed(epoch_seed(config.seed, rank, epoch_number))
        lr = optimizer.param_groups[0]["lr"]
        autocast_dtype = PRECISIONS[config.precision]
        lr_scale = None
        if epoch_number <= config.warmup_epochs:
            first_step = (epoch_number - 1) * batches_per_epoch
            warmup_steps = config.warmup_epochs * batches_per_epoch
            lr_scale = lambda index, first_step=first_step: warmup_factor(first_step + index, warmup_steps)  # noqa: E731
        try:
            trained = epoch(train_loader, trained_model, criterion, optimizer, progress=progress,
                            description=f"{label} train", autocast_dtype=autocast_dtype, lr_scale=lr_scale,
                            clip_grad_norm=config.clip_grad_norm, peers=peers)
        except _NonFiniteLoss as non_finite:
            _diverged(config, out, epoch_number, non_finite.batch, non_finite.loss, record=is_main)
        train_seconds = time.perf_counter() - started
        if peers is not None:
            # Per-process batch norm: test, and save, rank 0's statistics on every process.
            peers.broadcast_buffers(model)
        tested = epoch(test_loader, model, criterion, progress=progress, description=f"{label} test",
                       autocast_dtype=autocast_dtype, peers=peers)
        if not math.isfinite(tested.loss):
            # The last step of the epoch broke the weights: keep the previous epoch's checkpoint.
            _diverged(config, out, epoch_number, None, tested.loss, record=is_main)
        if tested.classes_predicted == 1 and trained.first_layer_learned is False:
            _diverged(config, out, epoch_number, None, tested.loss, record=is_main, collapsed=True)
        if scheduler is not None:
            scheduler.step()
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch_number,
            "train_loss": trained.loss,
            "train_top1": trained.top1,
            "train_top5": trained.top5,
            "test_loss": tested.loss,
            "test_top1": tested.top1,
            "test_top5": tested.top5,
            "test_classes_predicted": tested.classes_predicted,
            "lr": lr,
            "seconds": seconds,
            "world_size": world_size,
        }
        history.append(record)
        batch_losses.append(trained.batch_losses)
        if not is_main:
            continue
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "epoch": epoch_number,
                "config": asdict(config),
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": _rng_state(generator, device),
                "history": history,
                "batch_losses": batch_losses,
                CHECKPOINT_DATA_KEY: trained_on,
            },
            checkpoint_path,
        )
        with open(out / METRICS_FILE, "a", encoding="utf-8") as metrics_file:
            metrics_file.write(json.dumps(record) + "\n")
        with open(out / BATCH_LOSSES_FILE, "a", encoding="utf-8") as losses_file:
            losses_file.writelines(_batch_loss_rows([trained.batch_losses], first_epoch=epoch_number))
        plot_curves(history, out / CURVES_FILE, title=f"{config.variant} ({config.ops} ops)")
        plot_batch_losses(batch_losses, out / BATCH_LOSSES_PLOT, title=f"{config.variant}: training loss / batch")
        if progress:
            tqdm.write(
                f"{label}: train loss {trained.loss:.4f} top-1 {trained.top1:.2f}% | "
                f"test loss {tested.loss:.4f} top-1 {tested.top1:.2f}% top-5 {tested.top5:.2f}% | "
                f"lr {lr:.4g} | {seconds:.1f} s ({trained_on['train_images'] / train_seconds:.0f} training images/s)",
                file=sys.stdout,
            )
    if peers is not None:
        # When train returns on any process, rank 0 has written the whole run.
        peers.barrier()
    return history


if __name__ == "__main__":
    # `python -m cifarnet.train` is `cifarnet-train` (so `torchrun -m cifarnet.train` works too).
    from cifarnet.cli import train_main

    sys.exit(train_main())
