"""Normalisation of the int-or-pair arguments that conv and pool layers take, and of the
convolution's padding strings, with native's exception types: layers store what they are
given, as torch.nn's do, and the functional ops check it when they run, as F.conv2d and
F.max_pool2d do."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

PADDING_STRINGS = ("valid", "same")


def pair(value, name: str) -> list[int]:
    """Returns ``[h, w]`` from an int or a sequence of one or two ints (one: the same for both,
    as F.conv2d and F.max_pool2d take it); raises naming ``name``.

    A sequence of another length raises ``RuntimeError`` and a non-integer ``TypeError``, as
    F.conv2d and F.max_pool2d raise them. Value checks (positive sizes, non-negative padding)
    are the ops' own, so C++ callers get them too; this only checks the form.
    """
    # NB: the exact types first: the ABC checks below take microseconds, a share of every
    # small layer's call.
    if type(value) is int:
        return [value, value]
    if type(value) in (tuple, list) and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return [value[0], value[1]]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [int(value), int(value)]
    if isinstance(value, Sequence) and not isinstance(value, str):
        items = list(value)
        if len(items) not in (1, 2):
            raise RuntimeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items):
            return [int(items[0]), int(items[-1])]
    raise TypeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


def check_bool(value, name: str) -> bool:
    """``value`` where it is a bool; else ``TypeError``, as F.max_pool2d refuses 1, a NumPy
    bool or a tensor for its ``ceil_mode``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be bool, not {type(value).__name__}")
    return value


def is_window_stride(pool_stride) -> bool:
    """Whether a pool's ``stride`` means the window's size: None, or an empty sequence (which
    F.max_pool2d and nn.MaxPool2d read so)."""
    return pool_stride is None or (isinstance(pool_stride, Sequence) and not isinstance(pool_stride, str) and len(pool_stride) == 0)


def pool_stride_pair(pool_stride) -> list[int]:
    """``pair(pool_stride)``, or ``[]`` (the ops' "the window's size") where it means the window."""
    return [] if is_window_stride(pool_stride) else pair(pool_stride, "pool_stride")


def stored_pair(value) -> tuple:
    """``value`` as an ``nn.Conv2d`` or ``nn.MaxPool2d`` attribute holds it (torch's ``_pair``):
    an int twice, a sequence as a tuple; the ops check the form when the layer runs."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return (value, value)


def check_padding_string(padding, stride) -> None:
    """``nn.Conv2d``'s constructor checks of a padding string, with its ``ValueError``s."""
    if not isinstance(padding, str):
        return
    if padding not in PADDING_STRINGS:
        raise ValueError(f"Invalid padding string {padding!r}, should be one of {set(PADDING_STRINGS)}")
    if padding == "same" and any(s != 1 for s in stored_pair(stride)):
        raise ValueError("padding='same' is not supported for strided convolutions")


def conv_padding(input: Tensor, weight: Tensor, stride, padding) -> tuple[Tensor, list[int]]:
    """The input to convolve and the symmetric ``[h, w]`` padding of ``F.conv2d``'s ``padding``
    (an int, a pair, ``'valid'`` or ``'same'``).

    ``'same'`` pads ``kernel - 1`` in all; where that is odd, native pads the extra row or
    column at the bottom or right, which the ops' symmetric padding cannot, so the input is
    padded by that one row or column first, as F.conv2d does it.
    """
    if not isinstance(padding, str):
        return input, pair(padding, "padding")
    if padding not in PADDING_STRINGS:
        raise RuntimeError(f"Invalid padding string: {padding!r}")
    if padding == "valid" or weight.dim() != 4:  # the op refuses a weight of another rank
        return input, [0, 0]
    if pair(stride, "stride") != [1, 1]:
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    totals = [size - 1 for size in weight.shape[2:]]
    before = [total // 2 for total in totals]
    extra_h, extra_w = (total - 2 * b for total, b in zip(totals, before))
    if extra_h or extra_w:
        input = F.pad(input, [0, extra_w, 0, extra_h])
    return input, before
