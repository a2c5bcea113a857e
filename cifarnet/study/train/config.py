"""A training run's settings (:class:`TrainConfig`), the files a run writes, and the settings a
resumed run may change."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cifarnet.study.models import OPS
from cifarnet.study.variants import check_variant


METRIC_KEYS = (
    "epoch", "train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "test_classes_predicted",
    "lr", "seconds", "world_size", "train_images",
)
"""The keys of each ``metrics.jsonl`` line, in order (``test_classes_predicted``: how many
classes the model gave as its first prediction over the test set, 1 for a collapsed network;
``world_size``: the processes that trained the epoch, as a run resumed with another number of
processes changes it; ``train_images``: the training images the run trains on, all of them or
``limit_train``, so that a run's files say what it was trained on). Runs written before
``test_classes_predicted`` or ``train_images`` existed lack them."""

DEVICES = ("auto", "cpu", "cuda")
# torch.manual_seed's range.
MAX_SEED = 2**32 - 1
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
# Optional too: the threads and CPU that trained it (see compute_record).
CHECKPOINT_COMPUTE_KEY = "compute"
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
        variant: one of :data:`cifarnet.study.variants.VARIANTS`.
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
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be from 0 to {MAX_SEED} (torch.manual_seed's range); got {self.seed}")
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
