"""CIFAR-10 for the study: loading, a decode cache, batch-wise augmentation and mini-batches.

Two layouts of ``data_dir`` are recognised:

* the official pickles, ``data_dir/cifar-10-batches-py/{data_batch_1..5, test_batch,
  batches.meta}`` (torchvision's ``datasets.CIFAR10`` format; ``data_dir`` may also be the
  ``cifar-10-batches-py`` folder itself). When ``data_dir`` holds no data set, it is downloaded
  there with ``torchvision.datasets.CIFAR10(download=True)``, which checks the archive's md5.
* image folders, ``data_dir/train/<class>/*`` and ``data_dir/test/<class>/*`` with the ten
  CIFAR-10 class names (as in ``../shared/cifar10-jpeg``). These are decoded once and cached as
  uint8 tensors under :func:`default_cache_dir` (never next to the data, which may be
  read-only), keyed by the folder's absolute path and the names, sizes and mtimes of its files.
  Classes are interleaved (the first file of each class, then the second, ...), so the first
  N images, as ``limit_train`` takes them, are balanced like the official shuffled batches.

Everything is held in memory as ``uint8`` ``Tensor[N, 3, 32, 32]``; cropping, flipping,
scaling and normalisation run on whole mini-batches (:class:`BatchLoader`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import warnings
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from cifarnet.study.distributed import shard_bounds
from cifarnet.study.fileio import atomic_save
from cifarnet.study.variants import Recipe

__all__ = [
    "CLASSES",
    "CROP_SIZE",
    "IMAGE_SIZE",
    "MEAN",
    "STD",
    "BatchLoader",
    "CIFAR10",
    "DataError",
    "Split",
    "center_crop",
    "crop_flip",
    "default_cache_dir",
    "default_data_dir",
    "detect_layout",
    "load_cifar10",
    "make_loaders",
    "normalize",
    "random_crop_flip",
    "to_float",
]

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
"""Class names in CIFAR-10's label order: ``CLASSES[label]``."""

IMAGE_SIZE = 32
CROP_SIZE = 28
MEAN = (0.491, 0.482, 0.447)
"""Per-channel mean of the training images (RGB, pixels in [0, 1]), as the study uses it."""
STD = (0.202, 0.199, 0.201)
"""Per-channel standard deviation of the training images (RGB, pixels in [0, 1])."""

PICKLE_FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
ARCHIVE_FILE = "cifar-10-python.tar.gz"  # what a download leaves next to cifar-10-batches-py
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

CACHE_FORMAT = 2  # bump when the cached arrays change meaning, so old caches are not reused
DECODE_CHUNK = 500  # images per task sent to a decode worker
POOL_MIN_IMAGES = 2000  # below this, starting worker processes costs more than it saves
# Batches are prepared this many images at a time (about 40 MB of float32 crops): per-batch
# tensor ops are small enough that their fixed costs dominate, and on a machine whose cores
# are shared, each parallel op's thread synchronisation can cost more than its work.
PREPARE_CHUNK = 4096


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


# --- finding and reading the data -------------------------------------------------------------


def detect_layout(data_dir: str | os.PathLike) -> tuple[str, Path] | None:
    """``("pickle", batches_folder)``, ``("folders", data_dir)``, or None if neither is there.

    Only says which layout ``data_dir`` claims to have; reading it checks that it is complete.
    """
    data_dir = Path(data_dir)
    if (data_dir / "data_batch_1").exists() or (data_dir.name == PICKLE_FOLDER and data_dir.is_dir()):
        return "pickle", data_dir
    if (data_dir / PICKLE_FOLDER).is_dir():
        return "pickle", data_dir / PICKLE_FOLDER
    if any((data_dir / split).exists() for split in SPLITS):
        return "folders", data_dir
    return None


def load_cifar10(
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> CIFAR10:
    """Loads CIFAR-10 from ``data_dir`` in either layout (see the module docstring).

    Args:
        data_dir: folder holding ``cifar-10-batches-py/`` or ``train/`` and ``test/`` image
            folders; default :func:`default_data_dir`.
        download: when ``data_dir`` holds no data set (missing, or empty), download the
            official pickles into it. Never downloads over other files; a failed download
            leaves nothing behind (no folder it created, no partial archive).
        cache_dir: where decoded image folders are cached; default :func:`default_cache_dir`.
        workers: processes decoding images (default: the usable CPUs, at most 8).
        progress: show a progress bar while decoding.

    Returns:
        :class:`CIFAR10` with ``uint8`` ``Tensor[N, 3, 32, 32]`` images and ``int64`` labels.

    Raises:
        DataError: the data set is missing (and cannot be downloaded), incomplete, truncated or
            corrupt, or laid out otherwise than expected.
    """
    data_dir = Path(data_dir if data_dir is not None else default_data_dir()).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} is a file; expected a folder holding CIFAR-10")
    found = detect_layout(data_dir)
    if found is None:
        _check_nothing_else_there(data_dir, download)
        _download(data_dir)
        found = ("pickle", data_dir / PICKLE_FOLDER)
    layout, root = found
    if layout == "pickle":
        return _load_pickles(root)
    return _load_folders(root, Path(cache_dir) if cache_dir is not None else default_cache_dir(), workers, progress)


def _check_nothing_else_there(data_dir: Path, download: bool) -> None:
    """Refuses to download into a folder that holds something that is not CIFAR-10."""
    expected = f"{PICKLE_FOLDER}/ (the official pickles) or train/<class>/ and test/<class>/ image folders"
    ours = {ARCHIVE_FILE, default_cache_dir().name}
    others = sorted(p.name for p in data_dir.iterdir() if p.name not in ours and not p.name.startswith(".")) if (
        data_dir.is_dir()
    ) else []
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise DataError(f"no CIFAR-10 in {data_dir} (it holds {shown}); expected {expected}")
    if not download:
        raise DataError(f"no CIFAR-10 in {data_dir}; expected {expected} (downloading is off)")


def _download(data_dir: Path) -> None:
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


def _load_pickles(root: Path) -> CIFAR10:
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


def _load_folders(root: Path, cache_dir: Path, workers: int | None, progress: bool) -> CIFAR10:
    listing = _list_image_folders(root)
    cache_file = cache_dir / f"{_fingerprint(root, listing)}.pt"
    cached = _read_cache(cache_file)
    if cached is not None:
        train, test = cached
    else:
        paths = [entry.path for split in SPLITS for entry, _ in listing[split]]
        images = _decode_images(paths, root, workers, progress)
        train_count = len(listing["train"])
        train = Split(images[:train_count], torch.tensor([label for _, label in listing["train"]], dtype=torch.int64))
        test = Split(images[train_count:], torch.tensor([label for _, label in listing["test"]], dtype=torch.int64))
        _write_cache(cache_file, train, test)
    return CIFAR10(train=train, test=test, layout="folders", root=root)


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


def _write_cache(path: Path, train: Split, test: Split) -> None:
    arrays = {"train_images": train.images, "train_labels": train.labels}
    arrays.update({"test_images": test.images, "test_labels": test.labels})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(arrays, path)
    except OSError as error:
        warnings.warn(f"could not write the decode cache {path} ({error}); images will be decoded again", stacklevel=3)


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


# --- batch-wise augmentation ------------------------------------------------------------------


def crop_flip(images: Tensor, top: Tensor, left: Tensor, flip: Tensor, size: int) -> Tensor:
    """Crops each image at its own offset and mirrors the chosen ones, in one gather.

    Equal to ``torchvision.transforms.functional.crop(image, top[n], left[n], size, size)``
    followed by ``hflip`` where ``flip[n]``, for every image ``n``.

    Args:
        images: ``Tensor[N, C, H, W]`` of any dtype.
        top, left: ``int64`` ``Tensor[N]``, crop offsets in ``0..H-size`` and ``0..W-size``.
        flip: ``bool`` ``Tensor[N]``, which crops to mirror left-right.
        size: side of the square crop.

    Returns:
        ``Tensor[N, C, size, size]``, same dtype and device as ``images``.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be a Tensor[N, C, H, W]; got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if not (0 < size <= min(height, width)):
        raise ValueError(f"size must be in 1..{min(height, width)} for {height}x{width} images; got {size}")
    for name, value in (("top", top), ("left", left), ("flip", flip)):
        if value.shape != (count,):
            raise ValueError(f"{name} must be a Tensor[{count}] (one per image); got shape {tuple(value.shape)}")
    device = images.device
    steps = torch.arange(size, device=device)
    rows = (top.to(device)[:, None] + steps) * width  # [N, size]
    columns = left.to(device)[:, None] + torch.where(flip.to(device)[:, None], steps.flip(0), steps)  # [N, size]
    # NB: a flat gather is ~25x faster than indexing with four broadcast index tensors.
    index = (rows[:, :, None] + columns[:, None, :]).reshape(count, 1, size * size)
    flat = images.reshape(count, channels, height * width)
    return torch.gather(flat, 2, index.expand(count, channels, size * size)).reshape(count, channels, size, size)


def random_crop_flip(images: Tensor, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Random ``size``×``size`` crop (no padding) and random horizontal flip (p=0.5) per image.

    The distribution of ``torchvision.transforms.RandomCrop(size)`` followed by
    ``RandomHorizontalFlip()``: offsets uniform over ``0..H-size`` and ``0..W-size``
    independently, each image mirrored with probability ½, all independent across images.

    Args:
        images: ``Tensor[N, C, H, W]`` of any dtype, on the CPU if ``generator`` is a CPU one.
        size: side of the square crop.
        generator: source of the random draws (for reproducible, resumable runs).

    Returns:
        ``Tensor[N, C, size, size]``, same dtype and device as ``images``.
    """
    count, _, height, width = images.shape
    return crop_flip(images, *_draw_crop_flip(count, height, width, size, generator), size)


def _draw_crop_flip(
    count: int, height: int, width: int, size: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``top``, ``left`` and ``flip`` of :func:`random_crop_flip` for ``count`` images."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    top = torch.randint(0, height - size + 1, (count,), generator=generator, device=gen_device)
    left = torch.randint(0, width - size + 1, (count,), generator=generator, device=gen_device)
    flip = torch.rand(count, generator=generator, device=gen_device) < 0.5
    return top, left, flip


def center_crop(images: Tensor, size: int) -> Tensor:
    """The central ``size``×``size`` crop of ``Tensor[N, C, H, W]``, as torchvision's
    ``CenterCrop(size)`` places it (offset ``round((H - size) / 2)``)."""
    height, width = images.shape[-2:]
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def to_float(images: Tensor) -> Tensor:
    """``uint8`` pixels -> ``float32`` in [0, 1], exactly as ``transforms.ToTensor`` scales."""
    return images.to(torch.float32).div_(255)


def normalize(images: Tensor) -> Tensor:
    """Subtracts :data:`MEAN` and divides by :data:`STD` per channel, in place, as
    ``transforms.Normalize(MEAN, STD)``. ``images``: float ``Tensor[N, 3, H, W]`` in [0, 1]."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images.sub_(mean).div_(std)


class BatchLoader:
    """Mini-batches ``(inputs, labels)`` of a :class:`Split`, prepared as a variant asks.

    Training loaders shuffle with ``generator`` each epoch and, where the recipe augments, take
    random 28×28 crops with random flips; test loaders keep the order and, where the recipe
    augments, take centre crops. Inputs are scaled to [0, 1] and, where the recipe normalises,
    normalised. The last batch may be smaller (nothing is dropped). Batches are prepared a few
    thousand images at a time and yielded as views of that chunk.

    With ``world_size`` > 1 the loader yields process ``rank``'s slice of each batch of
    ``batch_size`` (the global batch; see :func:`cifarnet.study.distributed.shard_bounds`). Every
    process draws the whole order and the whole batch's crops and flips from ``generator``, as a
    single process does, and prepares only its own slice: so a step of ``world_size`` processes
    sees exactly the samples, and crops, of a step of one process, and the generator's state
    does not depend on the number of processes. A slice may be empty in a last batch smaller
    than ``world_size``; it is skipped.

    Args:
        split: the images and labels.
        batch_size: examples per batch.
        recipe: the variant's :class:`cifarnet.study.variants.Recipe`.
        train: training (shuffled, randomly augmented) or test (fixed) batches.
        generator: CPU generator for shuffling and augmentation; required when ``train``.
            Its state after an epoch decides the next epoch, so saving it makes runs resumable.
        device: where the batches go; pixels travel as uint8 and are converted there.
        rank: the process whose slice of each batch to yield, from 0.
        world_size: the processes that share each batch.
        memory_format: the inputs' layout (``torch.channels_last`` for a model that runs in
            it; the pixels are rearranged while still uint8).

    Yields:
        ``float32`` ``Tensor[B, 3, S, S]`` (S = 28 where the recipe augments, else 32) and
        ``int64`` ``Tensor[B]``, on ``device``.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        recipe: Recipe,
        *,
        train: bool,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in 0..world_size-1 and world_size at least 1; got rank {rank}, world_size {world_size}"
            )
        if train and generator is None:
            raise ValueError("generator is required for a training loader (it shuffles and augments)")
        self.split = split
        self.batch_size = batch_size
        self.recipe = recipe
        self.train = train
        self.generator = generator
        self.device = torch.device(device)
        self.rank = rank
        self.world_size = world_size
        self.memory_format = memory_format

    def __len__(self) -> int:
        """The number of (global) batches."""
        return math.ceil(len(self.split) / self.batch_size)

    def global_batch_size(self, index: int) -> int:
        """The examples in batch ``index`` (from 0) over all processes: ``batch_size``, or
        fewer in the last batch."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch index {index} out of range for {len(self)} batches")
        return min(self.batch_size, len(self.split) - index * self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        count = len(self.split)
        order = torch.randperm(count, generator=self.generator) if self.train else None
        # Whole batches per chunk, so the batches do not depend on the chunk size.
        chunk = self.batch_size * max(1, PREPARE_CHUNK // self.batch_size)
        for chunk_start in range(0, count, chunk):
            chunk_stop = min(chunk_start + chunk, count)
            # This process's slice of each batch of the chunk, as positions in the chunk.
            slices = []
            for batch_start in range(0, chunk_stop - chunk_start, self.batch_size):
                batch_count = min(self.batch_size, chunk_stop - chunk_start - batch_start)
                first, last = shard_bounds(batch_count, self.world_size, self.rank)
                slices.append((batch_start + first, batch_start + last))
            keep = None if self.world_size == 1 else torch.cat([torch.arange(a, b) for a, b in slices])
            inputs, labels = self._prepare(order, chunk_start, chunk_stop, keep)
            offset = 0
            for first, last in slices:
                if last > first:
                    yield inputs[offset : offset + last - first], labels[offset : offset + last - first]
                offset += last - first

    def _prepare(self, order: Tensor | None, start: int, stop: int, keep: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inputs and labels of examples ``start:stop`` (of ``order`` where shuffled), only
        those at the positions ``keep`` (of ``start:stop``) where given."""
        if order is not None:
            indices = order[start:stop]
        else:
            indices = None if keep is None else torch.arange(start, stop)
        if keep is not None:
            indices = indices[keep]
        if indices is None:
            images, labels = self.split.images[start:stop], self.split.labels[start:stop]
        else:
            images, labels = self.split.images[indices], self.split.labels[indices]
        if self.recipe.augment:
            if self.train:
                # Drawn for the whole chunk, as one process draws them, whatever this process keeps.
                _, _, height, width = self.split.images.shape
                top, left, flip = _draw_crop_flip(stop - start, height, width, CROP_SIZE, self.generator)
                if keep is not None:
                    top, left, flip = top[keep], left[keep], flip[keep]
                images = crop_flip(images, top, left, flip, CROP_SIZE)
            else:
                images = center_crop(images, CROP_SIZE)
        non_blocking = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=non_blocking).contiguous(memory_format=self.memory_format)
        inputs = to_float(images)  # keeps the layout, as normalize does
        if self.recipe.normalize:
            inputs = normalize(inputs)
        return inputs, labels.to(self.device, non_blocking=non_blocking)


def make_loaders(
    data: CIFAR10,
    recipe: Recipe,
    batch_size: int,
    generator: torch.Generator,
    *,
    device: str | torch.device = "cpu",
    limit_train: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[BatchLoader, BatchLoader]:
    """The training and test :class:`BatchLoader` of a variant.

    Args:
        data: the loaded data set.
        recipe: the variant's recipe (normalisation, augmentation).
        batch_size: examples per batch, for both loaders.
        generator: CPU generator for shuffling and augmenting the training set.
        device: where the batches go.
        limit_train: use only the first ``limit_train`` training images (None: all).
        rank, world_size: yield process ``rank``'s slice of each batch (see :class:`BatchLoader`).
        memory_format: the inputs' layout.

    Returns:
        ``(train_loader, test_loader)``.
    """
    if limit_train is not None and limit_train < 1:
        raise ValueError(f"limit_train must be at least 1; got {limit_train}")
    train = data.train.head(limit_train) if limit_train is not None else data.train
    common = {"device": device, "rank": rank, "world_size": world_size, "memory_format": memory_format}
    return (
        BatchLoader(train, batch_size, recipe, train=True, generator=generator, **common),
        BatchLoader(data.test, batch_size, recipe, train=False, **common),
    )
