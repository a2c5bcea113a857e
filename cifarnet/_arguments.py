"""Normalisation of the int-or-pair arguments that conv and pool layers take."""

from __future__ import annotations

import numbers
from collections.abc import Sequence


def pair(value, name: str) -> list[int]:
    """Returns ``[h, w]`` from an int or a sequence of two ints; raises naming ``name``.

    Value checks (positive sizes, non-negative padding) are the ops' own, so C++ callers get
    them too; this only checks the form.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value), int(value)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        if len(items) != 2:
            raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            return [int(items[0]), int(items[1])]
    raise TypeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
