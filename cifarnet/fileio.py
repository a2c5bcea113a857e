"""Writing files so that a crash at any moment leaves either the old file or the whole new one.

Each writer puts the data in a temporary file in the destination's folder (so the final
``os.replace`` is a rename within one file system, which POSIX makes atomic) and renames it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_save", "atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Calls ``write(temporary_path)`` and then renames the temporary file to ``path``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically."""
    atomic_write(path, lambda temporary: torch.save(obj, temporary))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` (UTF-8) to ``path``, atomically."""
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
