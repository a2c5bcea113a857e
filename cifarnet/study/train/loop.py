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
import itertools
import json
import math
import platform
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import cifarnet.nn
from cifarnet._cpu import cpu_info
from cifarnet.study.data import CIFAR10, CROP_SIZE, IMAGE_SIZE, load_cifar10, make_loaders
from cifarnet.study.distributed import Peers, epoch_seed
from cifarnet.study.fileio import atomic_save, output_folder_problem
from cifarnet.study.models import ConvNet
from cifarnet.study.plots import plot_batch_losses, plot_curves
from cifarnet.study.train.checkpoints import (
    _batch_loss_rows,
    _check_same_compute,
    _check_same_data,
    _note,
    _resumable_config,
    _rng_state,
    _set_rng_state,
    _write_records,
    compute_record,
    data_record,
    earlier_run_files,
    load_checkpoint,
)
from cifarnet.study.train.config import (
    BATCH_LOSSES_FILE,
    BATCH_LOSSES_PLOT,
    CHECKPOINT_COMPUTE_KEY,
    CHECKPOINT_DATA_KEY,
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CURVES_FILE,
    DEVICES,
    DIVERGENCE_FILE,
    METRICS_FILE,
    PRECISIONS,
    RUN_FILES,
    TRAINING_MEMORY_FORMAT,
    TrainConfig,
)
from cifarnet.study.train.cuda_graph import GraphedTrainingStep, cuda_graph_problem, set_lr
from cifarnet.study.train.divergence import _diverged, _NonFiniteLoss
from cifarnet.study.train.processes import _check_last_batch, _check_processes_agree, _on_main
from cifarnet.study.variants import recipe


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
    cuda_graph: bool = False,
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
        peers: data parallel: ``data`` is a :class:`cifarnet.study.data.BatchLoader` that yields this
            process's slice of each global batch, and ``model`` is wrapped in
            ``DistributedDataParallel``. Each training step sums the batch's loss over all
            processes during the backward pass (so every process sees the global batch's loss,
            and a non-finite one, at the same step, before its update) and weights this
            process's loss by its share of the batch, so the averaged gradient is that of the
            global batch's mean loss. The returned figures are those of all processes' samples.
        cuda_graph: training only: replay each batch's step from CUDA graphs
            (:class:`cifarnet.study.train.cuda_graph.GraphedTrainingStep`: the same arithmetic,
            one launch for the forward and backward and one for the update); the model must be
            on a CUDA device, without ``peers``.

    Returns:
        :class:`EpochResult` with example-weighted averages; ``batch_losses`` are those of the
        global batches.

    Raises:
        ArithmeticError: training only, at the first batch whose loss is not finite, before
            its step (so the weights are those that produced it); ``batch`` (from 1) and
            ``loss`` are attributes.
        cifarnet.study.distributed.PeerFailure: with ``peers``, another process stopped.
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
    scheduled_lrs = [float(group["lr"]) for group in optimizer.param_groups] if training else []
    # DDP's forward (buffers) and backward (gradients) communicate too.
    communication = peers.guard("training" if training else "testing") if peers is not None else contextlib.nullcontext()
    graphed = None
    if training and cuda_graph:
        problem = cuda_graph_problem(first_parameter.device, data_parallel=peers is not None)
        if problem:
            raise ValueError(f"cuda_graph: {problem}")
        graphed = GraphedTrainingStep(model, criterion, optimizer, autocast_dtype=autocast_dtype,
                                      clip_grad_norm=clip_grad_norm)
    try:
        with torch.set_grad_enabled(training), communication, graphed or contextlib.nullcontext():
            for index, (inputs, labels) in enumerate(bar):
                count = labels.shape[0]
                if graphed is not None:
                    logits, loss = graphed.forward_backward(inputs, labels)
                else:
                    with torch.autocast(inputs.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        logits = model(inputs)
                        loss = criterion(logits, labels)
                local_loss = batch_loss = loss.item()
                if training and graphed is None:
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
                if training:
                    if not math.isfinite(batch_loss):
                        raise _NonFiniteLoss(index + 1, batch_loss)
                    if not first_layer_learned and first_parameter is not None and first_parameter.grad is not None:
                        # NB: read until the first step that has one: once an epoch, for a network that learns.
                        first_layer_learned = bool(first_parameter.grad.any())
                    if lr_scale is not None:
                        scale = lr_scale(index)
                        for group, scheduled_lr in zip(optimizer.param_groups, scheduled_lrs):
                            set_lr(group, scheduled_lr * scale)
                    if graphed is not None:
                        graphed.step()
                    else:
                        if clip_grad_norm is not None:
                            nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
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
            set_lr(group, scheduled_lr)
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


def has_bfloat16_arithmetic() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): where it does not,
    oneDNN emulates it and bfloat16 autocast is slower than float32, not faster. True where the
    instruction sets are unknown (other than x86-64 Linux), so that only a known lack warns."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return True
    isa = cpu_info()["isa"]
    return "AVX512-BF16" in isa or "AMX-BF16" in isa


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
    cuda_graph: bool = True,
) -> list[dict]:
    """Trains and tests one variant, epoch by epoch, writing results and checkpoints to ``out``.

    Each epoch trains on the (shuffled, augmented) training set, tests the end-of-epoch model,
    steps the learning-rate schedule, then saves ``checkpoint.pt`` atomically (model, optimiser,
    scheduler, the torch/python/numpy random states and the CUDA one of the run's GPU alone, so
    that it resumes on a machine with fewer GPUs, the data generator, epoch, config, history),
    appends to ``metrics.jsonl`` and ``batch_losses.csv`` and redraws the plots. So a
    run killed at any moment loses at most the epoch in progress, and on the CPU a resumed run
    gives the same metrics, bit for bit, as one that was never interrupted, where it runs on as
    many threads and the same class of CPU (the checkpoint records both; a note says where they
    differ).

    With ``peers`` (several processes under ``torchrun``), the processes train one model data
    parallel: each takes its slice of every global batch of ``config.batch_size`` (the same
    samples and crops a single process would see; see :class:`cifarnet.study.data.BatchLoader`), the
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
            ``data_dir`` with :func:`cifarnet.study.data.load_cifar10`.
        data_dir: see :func:`cifarnet.study.data.load_cifar10`.
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
        peers: the processes training together (:class:`cifarnet.study.distributed.Peers`), or None
            for one process.
        cuda_graph: replay the training steps from CUDA graphs where that is possible (one
            process on a CUDA device; see :func:`epoch`): the same arithmetic with a fraction
            of the host's launching. False: eager steps everywhere.

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
        cifarnet.study.data.DataError: the data set cannot be read.
        cifarnet.study.distributed.PeerFailure: another process stopped, or stalled for longer than
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
    if device.type == "cpu" and config.precision == "bfloat16" and not has_bfloat16_arithmetic():
        warnings.warn(
            "precision bfloat16 on a CPU without AVX512-BF16 or AMX: bfloat16 arithmetic is emulated there, and a "
            "step takes several times float32's (docs/benchmarks.md); precision float32 trains faster",
            stacklevel=2,
        )
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
        if earlier and resume and CHECKPOINT_FILE not in earlier:
            # Resuming would start afresh and rewrite the metrics: the recorded epochs would be lost.
            raise ValueError(f"{out} holds {', '.join(earlier)} but no {CHECKPOINT_FILE} to resume from; replace it (overwrite=True)")
        if not (resume and checkpoint_path.exists()):
            return None
        found = load_checkpoint(checkpoint_path)
        _resumable_config(found["config"], config, checkpoint_path, complete=found["epoch"] >= config.epochs)
        return found

    checkpoint = _on_main(peers, open_run)
    if data is None:
        data = load_cifar10(data_dir, progress=progress and is_main)
    trained_on = data_record(data, config.limit_train)
    if config.limit_train is not None and config.limit_train > len(data.train) and is_main:
        _note(f"limit_train {config.limit_train} is more than the {len(data.train):,} training images of {data.root}: training on all of them")
    computed_by = compute_record(device)
    if checkpoint is not None:
        _on_main(peers, lambda: _check_same_data(checkpoint.get(CHECKPOINT_DATA_KEY), trained_on, checkpoint_path))
        if is_main:
            _check_same_compute(checkpoint.get(CHECKPOINT_COMPUTE_KEY), computed_by, checkpoint_path)
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
        _set_rng_state(checkpoint["rng"], generator, device, quiet=not is_main)
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
    graphed_steps = cuda_graph and cuda_graph_problem(device, data_parallel=peers is not None) is None
    batches_per_epoch = len(train_loader)
    progress = progress and is_main
    if checkpoint is not None and len(history) >= config.epochs and is_main:
        trained, asked = len(history), config.epochs
        done = f"{trained} of {asked} epochs" if trained == asked else f"{trained} epochs, more than the {asked} asked for"
        _note(f"{out} is complete ({done}); nothing to train")
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
                            clip_grad_norm=config.clip_grad_norm, peers=peers, cuda_graph=graphed_steps)
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
            "train_images": trained_on["train_images"],
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
                CHECKPOINT_COMPUTE_KEY: computed_by,
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
