"""Small generated CIFAR-10 data sets in both layouts cifarnet reads, for the tests.

The pickles are written the way the official ``cifar-10-batches-py`` files are (dicts with
``data`` uint8 [N, 3072] and ``labels``, ``batches.meta`` with ``label_names``), and the image
folders as ``train/<class>/NNNN.png`` like ``../shared/cifar10-jpeg``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TRAIN_BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)]


def make_split(count: int, seed: int, *, round_robin: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Random ``uint8 [count, 3, 32, 32]`` images and ``int64 [count]`` labels.

    Every class gets ``count // 10`` or one more images (so each class folder has files):
    in the order 0, 1, ..., 9, 0, 1, ... with ``round_robin``, else shuffled.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(count) % 10 if round_robin else rng.permutation(np.arange(count) % 10)
    return images, labels.astype(np.int64)


def write_pickles(root: Path, train, test) -> Path:
    """Writes ``root/cifar-10-batches-py``: train split over five batches, test in one."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = train
    for name, part in zip(TRAIN_BATCH_NAMES, np.array_split(np.arange(len(labels)), 5)):
        _dump(folder / name, {"batch_label": name, "data": images[part].reshape(len(part), -1), "labels": labels[part].tolist()})
    test_images, test_labels = test
    _dump(folder / "test_batch", {"batch_label": "test", "data": test_images.reshape(len(test_labels), -1), "labels": test_labels.tolist()})
    _dump(folder / "batches.meta", {"label_names": list(CLASS_NAMES), "num_cases_per_batch": 10000, "num_vis": 3072})
    return folder


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(entry, file, protocol=2)


def write_folders(root: Path, train, test, extension: str = "png") -> Path:
    """Writes ``root/{train,test}/<class>/NNNN.<extension>``, numbering each class's images
    in split order (so file k of class c is the k-th image labelled c)."""
    for split, (images, labels) in (("train", train), ("test", test)):
        counters = [0] * 10
        for name in CLASS_NAMES:
            (root / split / name).mkdir(parents=True)
        for image, label in zip(images, labels):
            path = root / split / CLASS_NAMES[label] / f"{counters[label]:04d}.{extension}"
            counters[label] += 1
            Image.fromarray(image.transpose(1, 2, 0)).save(path)
    return root
