"""The data set in memory (its splits, class names and image size), where it lives by default,
and the one error every loading problem raises."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""Class names in CIFAR-10's label order: ``CLASSES[label]``."""

IMAGE_SIZE = 32


class DataError(Exception):
    """The data set is missing, incomplete or unreadable; the message is one line saying what,
    where, and what was expected."""


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/cifarnet`` (``~/.cache/cifarnet``): where CIFAR-10 is downloaded."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifarnet"


def default_cache_dir() -> Path:
    """``default_data_dir()/decoded``: where decoded image folders are cached."""
    return default_data_dir() / "decoded"


@dataclass(frozen=True)
class Split:
    """One split of the data set, in memory.

    Attributes:
        images: ``uint8`` ``Tensor[N, 3, 32, 32]`` (RGB, channels first).
        labels: ``int64`` ``Tensor[N]`` with values in ``0..9`` (see :data:`CLASSES`).
    """

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, count: int) -> Split:
        """The first ``count`` examples (all of them if there are fewer)."""
        if count < 1:
            raise ValueError(f"count must be at least 1; got {count}")
        return Split(self.images[:count], self.labels[:count])


@dataclass(frozen=True)
class CIFAR10:
    """The training and test splits, and where they were read from.

    Attributes:
        train: the 50,000 training images (fewer in test data sets).
        test: the 10,000 test images.
        layout: ``"pickle"`` or ``"folders"``.
        root: the folder the images were read from.
    """

    train: Split
    test: Split
    layout: str
    root: Path


# The whole data set: images per split, a tenth of them in each class.
FULL_SPLIT_SIZES = {"training": 50_000, "test": 10_000}


def shortfall(data: CIFAR10) -> str | None:
    """How ``data`` differs from the whole CIFAR-10 (50,000 training and 10,000 test images,
    a tenth of each split per class), in one line, or None where it does not: a copy cut short
    trains and tests without error, on figures that are not the study's."""
    parts = []
    for name, split in (("training", data.train), ("test", data.test)):
        expected = FULL_SPLIT_SIZES[name]
        counts = torch.bincount(split.labels, minlength=len(CLASSES)).tolist()
        if len(split) != expected or any(count != expected // len(CLASSES) for count in counts):
            fewest = min(range(len(CLASSES)), key=counts.__getitem__)
            parts.append(f"{len(split):,} {name} images ({counts[fewest]:,} of class {CLASSES[fewest]})")
    if not parts:
        return None
    return (
        f"{data.root} holds {' and '.join(parts)}, where CIFAR-10 has 50,000 and 10,000, 5,000 and 1,000 of each "
        "class: the figures are not comparable with the study's"
    )
