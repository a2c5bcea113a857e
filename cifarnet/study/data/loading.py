"""``load_cifar10``: finds which layout a folder holds, and downloads the pickles where it
holds none."""

from __future__ import annotations

import os
from pathlib import Path

from cifarnet.study.data import image_folders, pickles
from cifarnet.study.data.dataset import CIFAR10, DataError, default_cache_dir, default_data_dir
from cifarnet.study.data.image_folders import SPLITS
from cifarnet.study.data.pickles import ARCHIVE_FILE, PICKLE_FOLDER


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
    """Loads CIFAR-10 from ``data_dir`` in either layout (see :mod:`cifarnet.study.data`).

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
        pickles.download(data_dir)
        found = ("pickle", data_dir / PICKLE_FOLDER)
    layout, root = found
    if layout == "pickle":
        return pickles.load_pickles(root)
    return image_folders.load_image_folders(root, Path(cache_dir) if cache_dir is not None else default_cache_dir(), workers, progress)


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
