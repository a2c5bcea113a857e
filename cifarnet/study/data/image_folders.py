"""Image folders (``train/<class>/*``, ``test/<class>/*``): listed with the classes interleaved,
decoded by worker processes, and cached as uint8 tensors keyed by the files' names, sizes and
mtimes."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import re
import signal
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from cifarnet.study.data.dataset import CIFAR10, CLASSES, IMAGE_SIZE, DataError, Split
from cifarnet.study.fileio import atomic_save

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 2  # bump when the cached arrays change meaning, so old caches are not reused
DECODE_CHUNK = 500  # images per task sent to a decode worker
POOL_MIN_IMAGES = 2000  # below this, starting worker processes costs more than it saves


def load_image_folders(root: Path, cache_dir: Path, workers: int | None, progress: bool) -> CIFAR10:
    """The data set in ``root/train`` and ``root/test``, from ``cache_dir`` where its fingerprint
    is cached, else decoded by ``workers`` processes and cached."""
    listing = _list_image_folders(root)
    # One file per folder: named by the folder, then by its files' fingerprint.
    cache_file = cache_dir / f"{_folder_key(root)}-{_fingerprint(root, listing)}.pt"
    cached = _read_cache(cache_file)
    if cached is not None:
        train, test = cached
    else:
        paths = [entry.path for split in SPLITS for entry, _ in listing[split]]
        images = _decode_images(paths, root, workers, progress)
        train_count = len(listing["train"])
        train = Split(images[:train_count], torch.tensor([label for _, label in listing["train"]], dtype=torch.int64))
        test = Split(images[train_count:], torch.tensor([label for _, label in listing["test"]], dtype=torch.int64))
        if _write_cache(cache_file, train, test):
            _remove_older_caches(cache_file)
    return CIFAR10(train=train, test=test, layout="folders", root=root)


def _list_image_folders(root: Path) -> dict[str, list[tuple[os.DirEntry, int]]]:
    """``{split: [(file, label), ...]}``, classes interleaved; checks the layout.

    Example ``k`` of a split is file number ``k // 10`` (in name order) of class ``k % 10``
    while every class has files left.
    """
    listing = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f"{split_dir} is missing; an image-folder data set needs train/<class>/ and test/<class>/ in {root}"
            )
        class_dirs = {p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
        missing = [name for name in CLASSES if name not in class_dirs]
        unexpected = sorted(class_dirs - set(CLASSES))
        if missing or unexpected:
            problem = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(unexpected)}"
            raise DataError(f"{split_dir} has the wrong class folders ({problem}); expected {', '.join(CLASSES)}")
        per_class = []
        for label, name in enumerate(CLASSES):
            with os.scandir(split_dir / name) as entries:
                images = sorted(
                    (e for e in entries if e.is_file() and not e.name.startswith(".") and _is_image(e.name)),
                    key=lambda e: e.name,
                )
            if not images:
                raise DataError(f"{split_dir / name} holds no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
            per_class.append([(entry, label) for entry in images])
        # Round robin over the classes (first file of each class, then the second, ...), so
        # that every prefix, as --limit-train takes, holds the classes in equal shares.
        listing[split] = [item for group in itertools.zip_longest(*per_class) for item in group if item is not None]
    return listing


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_key(root: Path) -> str:
    """Hash of the folder's absolute path: the prefix of its cache files' names."""
    return hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]


# The names of cache files written before they began with their folder's key: the fingerprint
# alone. No later write could tell which folder such a file was for, so none removed them.
_UNKEYED_CACHE_NAME = re.compile(r"[0-9a-f]{32}\.pt")


def _remove_older_caches(cache_file: Path) -> None:
    """Removes the folder's earlier cache files (its files changed since; each holds a whole data
    set, 185 MB for CIFAR-10), keeping ``cache_file``, and any cache file of the older naming."""
    folder_key = cache_file.name.split("-", 1)[0]
    for older in cache_file.parent.glob(f"{folder_key}-*.pt"):
        if older != cache_file:
            older.unlink(missing_ok=True)
    for unkeyed in cache_file.parent.glob("*.pt"):
        if _UNKEYED_CACHE_NAME.fullmatch(unkeyed.name):
            unkeyed.unlink(missing_ok=True)


def _fingerprint(root: Path, listing: dict[str, list[tuple[os.DirEntry, int]]]) -> str:
    """Hash of the folder's absolute path and every file's name, size and mtime."""
    digest = hashlib.sha256(f"cifarnet decoded v{CACHE_FORMAT}\0folders\0{root.resolve()}\0".encode())
    for split in SPLITS:
        for entry, label in listing[split]:
            stat = entry.stat()
            digest.update(f"{split}/{label}/{entry.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _read_cache(path: Path) -> tuple[Split, Split] | None:
    if not path.is_file():
        return None
    try:
        arrays = torch.load(path, weights_only=True)
        splits = tuple(Split(arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS)
        for split in splits:
            if split.images.dtype != torch.uint8 or split.images.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
                raise ValueError("unexpected image array")
            if split.labels.dtype != torch.int64 or split.labels.shape != (split.images.shape[0],):
                raise ValueError("unexpected label array")
        return splits
    except Exception as error:  # a damaged cache is rebuilt, never trusted
        warnings.warn(f"ignoring the unreadable decode cache {path} ({type(error).__name__}: {error})", stacklevel=3)
        return None


def _write_cache(path: Path, train: Split, test: Split) -> bool:
    """Writes the decoded data set to ``path``; False (with a warning) where it cannot."""
    arrays = {"train_images": train.images, "train_labels": train.labels}
    arrays.update({"test_images": test.images, "test_labels": test.labels})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(arrays, path)
    except OSError as error:
        warnings.warn(f"could not write the decode cache {path} ({error}); images will be decoded again", stacklevel=3)
        return False
    return True


def _quiet_worker_signals() -> None:
    """Decode workers leave interruption to the main process, which cancels what is queued and
    waits for them: Ctrl-C reaches the whole process group, and a worker forked from
    cifarnet-train would otherwise inherit the trainer's SIGTERM handler, which raises."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_files(paths: list[str]) -> tuple[np.ndarray | None, str | None]:
    """Decodes images into ``uint8 [len(paths), 32, 32, 3]``; or returns why one failed.

    Runs in worker processes, so failures come back as a message instead of an exception.
    """
    pixels = np.empty((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for index, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    width, height = image.size
                    return None, f"{path} is {width}x{height} pixels; expected {IMAGE_SIZE}x{IMAGE_SIZE}"
                pixels[index] = np.asarray(image.convert("RGB"))
        except Exception as error:
            reason = " ".join(str(error).split()) or type(error).__name__
            return None, f"{path} is not a readable image ({reason})"
    return pixels, None


def _decode_images(paths: list[str], root: Path, workers: int | None, progress: bool) -> Tensor:
    workers = workers or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 8)
    chunks = [paths[i : i + DECODE_CHUNK] for i in range(0, len(paths), DECODE_CHUNK)]
    bar = tqdm(total=len(paths), desc=f"decoding {root}", unit="img", disable=not progress, file=sys.stderr)
    pool = None
    try:
        if workers > 1 and len(paths) >= POOL_MIN_IMAGES:
            # fork, as torch's DataLoader does on Linux: workers start at once and only use PIL
            # (spawn or forkserver would run an unguarded user script again in each worker).
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else None)
            pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_quiet_worker_signals)
            results = pool.map(_decode_files, chunks)
        else:
            results = map(_decode_files, chunks)
        decoded = []
        for pixels, error in results:
            if error is not None:
                raise DataError(error)
            decoded.append(pixels)
            bar.update(len(pixels))
    finally:
        bar.close()
        if pool is not None:
            # Never kills a worker (multiprocessing.Pool.terminate() hung twice in CI on this
            # error path): the queued chunks are cancelled, the running ones (DECODE_CHUNK images
            # each) finish, and every worker exits before this returns.
            pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(np.concatenate(decoded)).permute(0, 3, 1, 2).contiguous()
