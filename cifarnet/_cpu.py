"""What CPU this is: model, the instruction sets the kernels care about, last-level cache.

Benchmarks name the machine beside every figure (the same code runs at different speeds on an
AVX2-only CPU and on one with AVX-512 and AMX), and ``cifarnet.build_info()`` reports it.
Linux only (``/proc/cpuinfo``, sysfs); elsewhere the fields are ``None`` / empty.
"""

from __future__ import annotations

import glob
import os
import platform

# cpuinfo flag -> the name people know; in the order of the ISA ladder.
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_bf16": "AMX-BF16",
    "amx_fp16": "AMX-FP16",
}


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def _size_bytes(text: str) -> int:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    return int(text.rstrip("KkMmGg")) * scale


def last_level_cache_bytes() -> int | None:
    """The largest data or unified cache of cpu0 (sysfs), or None where unknown."""
    sizes = []
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{index}/type") as kind, open(f"{index}/size") as size:
                if kind.read().strip() != "Instruction":
                    sizes.append(_size_bytes(size.read().strip()))
        except (OSError, ValueError):
            continue
    return max(sizes, default=None)


def cpu_info() -> dict:
    """``{"model": ..., "isa": ["AVX2", "AVX-512", ...], "last_level_cache_bytes": ...}``."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return {
        "model": _cpuinfo_field("model name") or platform.processor() or None,
        "isa": [name for flag, name in ISA_FLAGS.items() if flag in flags],
        "last_level_cache_bytes": last_level_cache_bytes(),
    }


def describe_cpu() -> str:
    """One line: ``Intel(R) Xeon(R) Processor, AVX2 AVX-512 AVX512-BF16 AMX-BF16, 480 MiB L3``."""
    info = cpu_info()
    cache = info["last_level_cache_bytes"]
    parts = [info["model"] or "unknown CPU", " ".join(info["isa"]) or "no AVX2"]
    if cache:
        parts.append(f"{cache / 2**20:g} MiB last-level cache")
    return ", ".join(parts)


def thread_count_problem(threads: int) -> str | None:
    """Why ``threads`` cannot be the CPU thread count, or None where it can: from 1 to the CPUs
    this machine has. NB: far above that, OpenMP fails to create its threads and aborts the
    process ("libgomp: Thread creation failed"), where torch.set_num_threads accepts any value."""
    limit = os.cpu_count() or 1
    if 1 <= threads <= limit:
        return None
    return f"expected 1 to {limit} (the CPUs this machine has), got {threads}"
