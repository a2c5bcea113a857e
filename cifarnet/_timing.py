"""Measuring calls for the benchmarks (``cifarnet-bench`` and ``benchmarks/``): wall-clock or
CUDA-event milliseconds, round-robin medians, autocast wrapping, glibc's malloc kept from
returning memory, and the bytes autograd saves for a backward."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import statistics
import time
from collections.abc import Callable

import torch

# The layouts the benchmarks take their inputs in, by the name their options give.
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MEMORY_FORMAT_NAMES = {format: name for name, format in MEMORY_FORMATS.items()}


def under_autocast(fn: Callable, autocast_dtype: torch.dtype | None) -> Callable:
    """``fn`` run under ``torch.autocast("cpu", autocast_dtype)``; ``fn`` itself where None."""
    if autocast_dtype is None:
        return fn

    @functools.wraps(fn)
    def autocast_fn(*args):
        with torch.autocast("cpu", dtype=autocast_dtype):
            return fn(*args)

    return autocast_fn


class Stopwatch:
    """Wall-clock milliseconds of a call; on CUDA, measured with events around the call."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse rather than return it to the system,
    and serve large blocks from its heap, as jemalloc and tcmalloc do by default.

    By default glibc returns the top of its heap once more than twice the largest recent block
    is free there; the next large tensor then page-faults in afresh (2048 faults, about 1 ms,
    for 8 MiB here), on whichever variant happens to allocate next. Returns False where the C
    library is not glibc (nothing changed).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, TypeError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Older glibc caps the mmap threshold at 32 MiB: larger blocks are then mapped afresh on
    # every side alike.
    heap_blocks = mallopt(m_mmap_threshold, 1 << 30) or mallopt(m_mmap_threshold, 32 << 20)
    return bool(heap_blocks and mallopt(m_trim_threshold, 2**31 - 1))


def interleaved_medians(calls: dict[str, Callable[[], object]], stopwatch: Stopwatch, warmup: int, repeats: int) -> dict[str, float]:
    """Median milliseconds of each call, timing them round-robin so drift hits all alike.

    Each round starts one call later: a call that always ran right after the same other one
    (whose freed memory or cache state it inherits) would carry that as a bias.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(stopwatch(calls[name]))
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(fn: Callable[[], object]) -> int:
    """Bytes autograd keeps for the backward of ``fn()``: distinct storages saved by any node."""
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())
