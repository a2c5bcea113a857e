"""The study's figures, drawn with matplotlib's Agg canvas and written atomically as PNG.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so no global backend
is chosen and nothing is kept open between epochs. Every PNG carries :data:`PNG_SOFTWARE` in
its ``Software`` text chunk, so a command can tell its own plots (which it may redraw) from a
user's files (which it must not replace unasked); see :func:`is_cifarnet_plot`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from cifarnet.study.fileio import atomic_write

__all__ = [
    "PNG_SOFTWARE",
    "is_cifarnet_plot",
    "plot_batch_losses",
    "plot_confusion_matrix",
    "plot_curves",
    "plot_test_accuracy",
]

DPI = 100
# The configurations of one variant share a colour and take these styles in turn.
LINE_STYLES = ("-", "--", ":", "-.")
PNG_SOFTWARE = "cifarnet"
"""The ``Software`` entry of the PNGs written here."""


def _save(figure: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    atomic_write(
        path,
        lambda temporary: figure.savefig(temporary, format="png", dpi=DPI, metadata={"Software": PNG_SOFTWARE}),
    )


def is_cifarnet_plot(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PNG written by this module (it carries :data:`PNG_SOFTWARE`)."""
    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == PNG_SOFTWARE
    except (OSError, ValueError):  # missing, a folder, not an image
        return False


def plot_curves(history: Sequence[Mapping[str, float]], path: str | os.PathLike, title: str = "") -> None:
    """"Accuracy / epoch" beside "Loss / epoch", train and test, from ``metrics.jsonl`` records.

    Args:
        history: one mapping per epoch with ``epoch``, ``train_top1``, ``test_top1``,
            ``train_loss`` and ``test_loss``.
        path: the PNG to write.
        title: shown above both panels.
    """
    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(11, 4.2))
    accuracy, loss = figure.subplots(1, 2)
    for split, style in (("train", "-o"), ("test", "-s")):
        accuracy.plot(epochs, [r[f"{split}_top1"] for r in history], style, markersize=3, label=split)
        loss.plot(epochs, [r[f"{split}_loss"] for r in history], style, markersize=3, label=split)
    accuracy.set(title="Accuracy / epoch", xlabel="epoch", ylabel="top-1 accuracy (%)")
    loss.set(title="Loss / epoch", xlabel="epoch", ylabel="cross-entropy loss")
    for axes in (accuracy, loss):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_batch_losses(batch_losses: Sequence[Sequence[float]], path: str | os.PathLike, title: str = "") -> None:
    """The training loss of every mini-batch, epoch after epoch, with epoch boundaries marked.

    Args:
        batch_losses: per epoch, the loss of each of its training batches.
        path: the PNG to write.
        title: the figure title.
    """
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots()
    losses = [loss for epoch_losses in batch_losses for loss in epoch_losses]
    batches_per_epoch = max((len(e) for e in batch_losses), default=1) or 1
    # x in epochs, so the curve lines up with the per-epoch plots.
    positions = np.arange(len(losses)) / batches_per_epoch
    axes.plot(positions, losses, linewidth=0.6)
    axes.set(title=title or "Training loss / batch", xlabel="epoch", ylabel="cross-entropy loss")
    axes.grid(alpha=0.3)
    _save(figure, path)


def plot_test_accuracy(
    curves: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    path: str | os.PathLike,
    notes: Mapping[str, str] | None = None,
) -> None:
    """The test top-1 accuracy per epoch of several configurations in one axes.

    Args:
        curves: configuration name (e.g. ``momentum-fused``, or a variant) -> the
            ``metrics.jsonl`` records of each of its runs (seeds). One run is drawn as it is;
            several as their mean per epoch (over the epochs all of them reached) with their
            range shaded. Names that share their first ``-``-separated word (the variant)
            share a colour and differ in line style.
        path: the PNG to write.
        notes: name -> a remark shown in the legend beside the name ("diverged ...",
            "not run"); a name without curves gets a legend entry and no curve.
    """
    notes = notes or {}
    # The legend goes under the axes, where it hides no curve; the figure grows with it.
    entries = len(curves) + sum(name not in curves for name in notes)
    figure = Figure(figsize=(9, 5 + 0.2 * entries))
    axes = figure.subplots()
    colours, styles = {}, {}
    for name, histories in curves.items():
        variant = name.split("-", 1)[0]
        colour = colours.setdefault(variant, f"C{len(colours) % 10}")
        style = LINE_STYLES[sum(other.split("-", 1)[0] == variant for other in styles) % len(LINE_STYLES)]
        styles[name] = style
        epochs = min(len(history) for history in histories)
        x = [record["epoch"] for record in histories[0][:epochs]]
        runs = np.array([[record["test_top1"] for record in history[:epochs]] for history in histories])
        label = name if len(histories) == 1 else f"{name} ({len(histories)} runs: mean, range shaded)"
        label = f"{label}: {notes[name]}" if name in notes else label
        # A marker where a run has one epoch: a line through one point draws nothing.
        marker = "o" if len(x) == 1 else None
        axes.plot(x, runs.mean(0), color=colour, linestyle=style, marker=marker, markersize=4, label=label)
        if len(histories) > 1:
            axes.fill_between(x, runs.min(0), runs.max(0), color=colour, alpha=0.15, linewidth=0)
    for name, note in notes.items():
        if name not in curves:
            axes.plot([], [], linestyle="none", marker="x", color="grey", label=f"{name}: {note}")
    axes.set(title="Test accuracy / epoch", xlabel="epoch", ylabel="test top-1 accuracy (%)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.1), frameon=False)
    _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """A confusion matrix as a heat map with counts.

    Args:
        matrix: ``int`` ``[C, C]``, ``matrix[true, predicted]`` = number of test images.
        classes: the C class names, in label order.
        path: the PNG to write.
        title: the figure title.
    """
    figure = Figure(figsize=(8, 7))
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axes)
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    axes.set(xlabel="predicted class", ylabel="true class", title=title or "Confusion matrix")
    threshold = matrix.max() / 2 if matrix.size else 0
    for true in range(matrix.shape[0]):
        for predicted in range(matrix.shape[1]):
            count = int(matrix[true, predicted])
            colour = "white" if count > threshold else "black"
            axes.text(predicted, true, str(count), ha="center", va="center", fontsize=7, color=colour)
    _save(figure, path)
