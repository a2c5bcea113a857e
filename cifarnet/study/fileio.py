"""Writing files so that a crash at any moment leaves either the old file or the whole new one,
and checking output paths before a long computation rather than after it.

Each writer puts the data in a temporary file in the destination's folder (so the final
``os.replace`` is a rename within one file system, which POSIX makes atomic) and renames it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["atomic_save", "atomic_write", "atomic_write_text", "describe_file", "output_file_problem", "output_folder_problem"]


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


# Leading bytes of the formats a user is likely to point a command at by mistake.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x80", "a Python pickle"),
)


def describe_file(path: str | os.PathLike) -> str:
    """What ``path`` is, in a few words for an error message: ``"a folder"``, ``"an empty file"``,
    ``"a PNG image"``, ``"a text file"``, ``"a file of 100 bytes in an unknown format"``..."""
    path = Path(path)
    if path.is_dir():
        return "a folder"
    if not path.exists():
        return "missing"
    try:
        with open(path, "rb") as file:
            head = file.read(4096)
        size = path.stat().st_size
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    if not head:
        return "an empty file"
    for signature, description in _SIGNATURES:
        if head.startswith(signature):
            return description
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        # A multi-byte character cut at the end of the sample is still text.
        text = head[: error.start].decode("utf-8") if error.start >= len(head) - 3 else None
    if text is not None and "\x00" not in text:
        return "a text file"
    return f"a file of {size:,} bytes in an unknown format"


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _creatable_under(path: Path) -> str | None:
    """Why the missing folders above (and including) ``path`` cannot be created, or None."""
    existing = _nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be created under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"the folder {existing} is not writable"
    return None


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (its missing folders created), or None if it can.

    The reason is a clause to put after the path, e.g. ``f"--json {path}: {problem}"``.
    Meant to run before a long computation, so that its result is not lost to a bad path.
    Says nothing about whether replacing an existing file is wanted: that is the caller's call.
    """
    path = Path(path)
    if path.is_dir():
        return "it is a folder; expected the path of a file"
    if path.exists():
        return None if os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK) else "it is not writable"
    return _creatable_under(path.parent)


def output_folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot serve as an output folder (created if missing), or None if it can;
    the reason is a clause to put after the path, as for :func:`output_file_problem`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"it is {describe_file(path)}, not a folder; expected a folder (existing, or one to create)"
    if path.is_dir():
        return None if os.access(path, os.W_OK | os.X_OK) else "the folder is not writable"
    return _creatable_under(path)
