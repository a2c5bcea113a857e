"""The official pickles (torchvision's ``datasets.CIFAR10`` format): reading them, and
downloading them where no data set is."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import torch

from cifarnet.study.data.dataset import CIFAR10, CLASSES, IMAGE_SIZE, DataError, Split

PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
ARCHIVE_FILE = "cifar-10-python.tar.gz"  # what a download leaves next to cifar-10-batches-py


def download(data_dir: Path) -> None:
    """Downloads and extracts the official pickles into ``data_dir``; on failure, or Ctrl-C,
    removes everything it wrote and raises :class:`DataError` (or the interrupt)."""
    from torchvision.datasets import CIFAR10 as TorchvisionCIFAR10

    # What a failed download must remove: the outermost folder it creates, or else whatever
    # appears in the existing folder (a partial archive, a half-extracted batches folder).
    created = next((folder for folder in reversed((data_dir, *data_dir.parents)) if not folder.exists()), None)
    present = set() if created is not None else {entry.name for entry in data_dir.iterdir()}
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Downloads and md5-checks the archive, extracts it and md5-checks every batch.
        TorchvisionCIFAR10(str(data_dir), train=True, download=True)
    except BaseException as error:
        _remove_download_leftovers(data_dir, created, present)
        if not isinstance(error, Exception):  # Ctrl-C: cleaned up, and still an interrupt
            raise
        # Network, disk and checksum failures all end the same way.
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(
            f"no CIFAR-10 in {data_dir} and downloading {TorchvisionCIFAR10.url} failed ({reason}); "
            f"put {PICKLE_FOLDER}/ or train/ and test/ image folders there"
        ) from None


def _remove_download_leftovers(data_dir: Path, created: Path | None, present: set[str]) -> None:
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for entry in data_dir.iterdir():
        if entry.name in present:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def load_pickles(root: Path) -> CIFAR10:
    """The data set in the batches folder ``root``, checked batch by batch."""
    meta = _read_pickle(root / META_FILE)
    label_names = meta.get("label_names") if isinstance(meta, dict) else None
    if label_names is None or tuple(label_names) != CLASSES:
        raise DataError(f"{root / META_FILE} does not list label_names {', '.join(CLASSES)}; got {label_names!r}")
    train = [_read_batch(root / name) for name in TRAIN_BATCHES]
    test = _read_batch(root / TEST_BATCH)
    return CIFAR10(
        train=Split(torch.cat([s.images for s in train]), torch.cat([s.labels for s in train])),
        test=test,
        layout="pickle",
        root=root,
    )


def _read_pickle(path: Path):
    # NB: unpickling runs code from the file; these are the official batches, which
    # torchvision reads the same way.
    if not path.is_file():
        raise DataError(f"{path} is missing; expected the official CIFAR-10 file {path.name} in {path.parent}")
    try:
        with open(path, "rb") as file:
            return pickle.load(file, encoding="latin1")
    except Exception as error:
        reason = " ".join(str(error).split()) or "no details"
        raise DataError(
            f"{path} is not a readable pickle ({type(error).__name__}: {reason}); it may be truncated, "
            f"delete {path.parent} to download it again"
        ) from None


def _read_batch(path: Path) -> Split:
    """One official batch: a dict with ``data`` (uint8 [N, 3072]) and ``labels`` (N ints)."""
    entry = _read_pickle(path)
    data = entry.get("data") if isinstance(entry, dict) else None
    labels = entry.get("labels") if isinstance(entry, dict) else None
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == pixels):
        got = f"{type(data).__name__} {getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}".strip()
        raise DataError(f"{path} is not a CIFAR-10 batch: expected 'data' as uint8 [N, {pixels}], got {got}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        labels = None
    if labels is None or labels.shape != (data.shape[0],) or (labels.size and not 0 <= labels.min() <= labels.max() < 10):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected 'labels' as {data.shape[0]} ints in 0..9")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).copy())
    return Split(images, torch.from_numpy(labels))
