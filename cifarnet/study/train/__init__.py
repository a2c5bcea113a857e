"""The study's training: :func:`train` runs a variant with per-epoch metrics, plots and atomic,
resumable checkpoints (:mod:`.loop`); :mod:`.config` holds a run's settings and the files it
writes, :mod:`.checkpoints` reading and resuming, :mod:`.divergence` the runs that diverge or
collapse, :mod:`.processes` what several processes agree on. The command is
``cifarnet-train`` (:mod:`cifarnet.study.cli`).
"""

from cifarnet.study.train.checkpoints import data_record, earlier_run_files, load_checkpoint
from cifarnet.study.train.config import (
    CHECKPOINT_DATA_KEY,
    CHECKPOINT_FILE,
    DEVICES,
    DIVERGENCE_FILE,
    MAX_SEED,
    METRIC_KEYS,
    METRICS_FILE,
    PRECISIONS,
    REMEDIES,
    TrainConfig,
)
from cifarnet.study.train.divergence import TrainingCollapsed, TrainingDiverged
from cifarnet.study.train.loop import EpochResult, epoch, make_optimizer, resolve_device, train, warmup_factor

__all__ = [
    "CHECKPOINT_DATA_KEY",
    "CHECKPOINT_FILE",
    "DEVICES",
    "DIVERGENCE_FILE",
    "MAX_SEED",
    "METRICS_FILE",
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
