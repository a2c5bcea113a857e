"""Finds a usable CUDA toolkit for building cifarnet, with no variables set by the user.

torch guesses the toolkit as ``CUDA_HOME``, else the grandparent folder of the first ``nvcc``
on ``PATH``. That guess fails when ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` that
execs ``/usr/local/cuda-13.0/bin/nvcc`` gives ``/usr/local``, which has no ``libcudart``). Here
each candidate must hold what the build needs — ``bin/nvcc``, ``include/cuda_runtime.h`` and
``libcudart`` — and, for ``nvcc`` on ``PATH``, the folder the compiler really runs from is asked
of the compiler itself (``nvcc --dryrun`` prints it).

Used by ``setup.py`` and ``tools/run_tests.sh`` (CMake); run as a script it prints the root of
the toolkit it finds, or nothing when none is usable (exit status 0 either way).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

_CUDART_PATTERNS = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*")


@dataclass
class ToolkitSearch:
    """The outcome of a search: the toolkit found (or None) and why each candidate was refused."""

    root: str | None = None
    version: str | None = None
    refused: dict[str, str] = field(default_factory=dict)

    def explain(self) -> str:
        """One line naming every folder looked at and what it lacked."""
        if not self.refused:
            return "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda*"
        return "; ".join(f"{root}: {reason}" for root, reason in self.refused.items())


def _run(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


def nvcc_root(nvcc: str) -> str | None:
    """The toolkit an ``nvcc`` executable really belongs to, even when it is a wrapper script."""
    # NB: `--dryrun` lists the commands nvcc would run without running them; `_HERE_` is the
    # folder of the real compiler binary, whatever scripts or links led to it.
    match = re.search(r"^#\$ _HERE_=(.+)$", _run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull]), re.MULTILINE)
    if match is None:
        return None
    return os.path.dirname(os.path.normpath(match.group(1).strip()))


def toolkit_version(root: str) -> str | None:
    """``"13.0"`` from ``nvcc --version`` of the toolkit at ``root``."""
    match = re.search(r"release (\d+\.\d+)", _run([os.path.join(root, "bin", "nvcc"), "--version"]))
    return match.group(1) if match else None


def missing_parts(root: str) -> str | None:
    """What the build needs that the folder ``root`` lacks, or None when it has everything."""
    if not os.path.isfile(os.path.join(root, "bin", "nvcc")):
        return "no bin/nvcc"
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return "no include/cuda_runtime.h"
    if not any(glob.glob(os.path.join(root, pattern)) for pattern in _CUDART_PATTERNS):
        return "no libcudart (lib64/, lib/ or targets/*/lib/)"
    return None


def candidate_roots() -> list[str]:
    """Folders to try, most explicit first: CUDA_HOME / CUDA_PATH, the nvcc on PATH (resolved
    and as torch would guess it), then the usual install places, newest version first."""
    candidates = [os.environ.get(name) for name in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates += [nvcc_root(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    versioned = sorted(glob.glob("/usr/local/cuda-*"), key=_version_key, reverse=True)
    candidates += ["/usr/local/cuda", *versioned, "/opt/cuda"]
    unique = []
    for root in candidates:
        if root and os.path.isdir(root) and os.path.realpath(root) not in map(os.path.realpath, unique):
            unique.append(root)
    return unique


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", os.path.basename(path)))


def arch_list_of(arch_names: list[str]) -> str | None:
    """A ``TORCH_CUDA_ARCH_LIST`` for the GPUs a torch build runs on, from its
    ``torch.cuda.get_arch_list()`` (``['sm_75', ..., 'sm_120']`` -> ``'7.5;...;12.0+PTX'``): machine
    code for each, and PTX of the newest for GPUs newer than all of them. None if it names none."""
    archs = []
    for name in arch_names:
        match = re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", name)
        if match:
            archs.append((int(match[1]), int(match[2]), match[3]))
    if not archs:
        return None
    archs.sort()
    versions = [f"{major}.{minor}{suffix}" for major, minor, suffix in archs]
    plain = [v for v, (_, _, suffix) in zip(versions, archs) if not suffix]
    if plain:  # PTX only of a portable target ('9.0a' code runs on 9.0 alone)
        versions[versions.index(plain[-1])] += "+PTX"
    return ";".join(versions)


def all_targets_notice(cuda_files: int, arch_list: str) -> str:
    """The one line a build compiling for every target of torch's CUDA build starts with: what
    it compiles, and the two ways to a shorter build."""
    targets = len(arch_list.split(";"))
    return (
        f"cifarnet: no GPU visible, so the {cuda_files} CUDA files are compiled for all {targets} GPU targets of "
        f"torch's build ({arch_list}), which takes many times as long as the CPU kernels; to shorten it, set "
        "TORCH_CUDA_ARCH_LIST to your GPUs' targets (e.g. TORCH_CUDA_ARCH_LIST=9.0 for an H100) or CIFARNET_CUDA=0 "
        "(CPU kernels only)"
    )


def tell_user(line: str) -> None:
    """Prints ``line`` to the build's output and to the terminal of the person installing.

    pip shows a build's output only with ``-v`` or when it fails; a line about how long the
    build takes is needed before it ends, so it also goes to the controlling terminal, where
    there is one (none in CI or a service: then the build log alone has it).
    """
    print(line, flush=True)
    if sys.stdout.isatty():  # a direct `python setup.py ...`: already on the terminal
        return
    try:
        with open("/dev/tty", "w") as terminal:
            terminal.write(line + "\n")
    except OSError:
        pass


def find_cuda_toolkit(required_major: str | None = None, candidates: list[str] | None = None) -> ToolkitSearch:
    """The first usable toolkit among ``candidates`` (default ``candidate_roots()``).

    Args:
        required_major: the CUDA major version torch was built with (``"13"``); a toolkit of
            another major version is refused, as torch's extension builder would refuse it.
    """
    search = ToolkitSearch()
    for root in candidate_roots() if candidates is None else candidates:
        reason = missing_parts(root)
        version = toolkit_version(root) if reason is None else None
        if reason is None and version is None:
            reason = "nvcc --version did not answer"
        if reason is None and required_major is not None and version.split(".")[0] != required_major:
            reason = f"CUDA {version}, torch was built with CUDA {required_major}.x"
        if reason is None:
            search.root, search.version = root, version
            return search
        search.refused[root] = reason
    return search


def torch_cuda_arch_names() -> list[str]:
    """The GPU architectures the installed torch's CUDA build holds code for (``['sm_75', ...,
    'sm_120']``), also where no GPU is visible: ``torch.cuda.get_arch_list()`` answers ``[]``
    there in torch 2.11 (it asks for a device first), so the build's own flags are read then."""
    import torch

    names = torch.cuda.get_arch_list()
    if not names:
        flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
        names = flags.split() if flags else []
    return names


def torch_cuda_major() -> str | None:
    """The CUDA major version of the installed torch, or None for a CPU build (or no torch)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.version.cuda.split(".")[0] if torch.version.cuda else None


if __name__ == "__main__":
    found = find_cuda_toolkit(torch_cuda_major())
    if found.root is not None:
        print(found.root)
