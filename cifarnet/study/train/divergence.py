"""Training that diverges (a non-finite loss) or collapses (one class for every test image):
the exceptions that stop a run, and the record of where it happened."""

from __future__ import annotations

import json
from pathlib import Path

from cifarnet.study.fileio import atomic_write_text
from cifarnet.study.train.config import DIVERGENCE_FILE, REMEDIES, TrainConfig
from cifarnet.study.variants import recipe


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss: the run stopped at that batch.

    Attributes:
        variant: the run's variant.
        epoch: the epoch (from 1) in which the loss was not finite.
        batch: the training batch (from 1) whose loss was not finite, or None where the
            training losses were finite but the test loss of the epoch's model was not.
        loss: the non-finite value (nan, inf or -inf).
        remedies: the remedies to suggest (setting -> value), those the run lacks.
        cause: what the message blames (see :func:`likely_cause`).
    """

    def __init__(
        self, variant: str, epoch: int, batch: int | None, loss: float, remedies: dict,
        cause: str = "the study's schedule is at the edge of stability without batch norm",
    ):  # fmt: skip
        self.variant, self.epoch, self.batch, self.loss, self.remedies = variant, epoch, batch, loss, remedies
        self.cause = cause
        super().__init__(self.describe({name: f"{name}={value}" for name, value in remedies.items()}))

    def _what_happened(self) -> str:
        where = f"batch {self.batch}" if self.batch is not None else "test pass"
        what = "loss" if self.batch is not None else "test loss"
        return f"{self.variant} epoch {self.epoch} {where}: the {what} is {self.loss} (training diverged)"

    def describe(self, remedy_names: dict[str, str]) -> str:
        """The one-line message, naming each remedy as ``remedy_names[setting]`` (e.g. an option)."""
        message = f"{self._what_happened()}; {self.cause}"
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


def likely_cause(config: TrainConfig) -> str:
    """What a divergence message blames: the learning rate where it is not the study's, else
    the study's schedule (at the edge of stability without batch norm, as docs/divergence.md
    measured)."""
    if config.lr != TrainConfig.lr:
        return f"lr {config.lr} is not the study's {TrainConfig.lr}"
    if recipe(config.variant).batch_norm:
        return "the study's schedule diverged here even with batch norm"
    return "the study's schedule is at the edge of stability without batch norm"


def _diverged(
    config: TrainConfig, out: Path, epoch_number: int, batch: int | None, loss: float, *, record: bool = True,
    collapsed: bool = False,
):
    """Records the divergence (or collapse) in ``out`` (beside the last good epoch's files) and
    raises; only ``record``-ing processes (rank 0) write."""
    remedies = {name: value for name, value in REMEDIES.items() if getattr(config, name) in (0, None)}
    error = (TrainingCollapsed if collapsed else TrainingDiverged)(
        config.variant, epoch_number, batch, loss, remedies, likely_cause(config)
    )
    if record:
        entry = {"epoch": epoch_number, "batch": batch, "loss": str(loss), "message": str(error)}
        if collapsed:
            entry["collapsed"] = True
        atomic_write_text(out / DIVERGENCE_FILE, json.dumps(entry) + "\n")
    raise error
