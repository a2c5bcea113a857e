"""Checkpoints and resume: reading a checkpoint, the random-number states it keeps, the checks
that a resumed run continues the same run on the same data, and the per-epoch records."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cifarnet._cpu import cpu_info
from cifarnet.study.data import CIFAR10
from cifarnet.study.fileio import atomic_write_text, describe_file
from cifarnet.study.train.config import (
    BATCH_LOSSES_FILE,
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEYS,
    METRICS_FILE,
    REMEDIES,
    RESUMABLE_CHANGES,
    TrainConfig,
)


# The CUDA random state of the GPU the run trains on. Checkpoints written before it hold "cuda"
# instead, a list of the states of every GPU of rank 0's machine; both load.
CUDA_RNG_KEY = "cuda_device"


def _rng_state(generator: torch.Generator, device: torch.device) -> dict:
    """The random states a resumed run needs to continue as the uninterrupted one would: torch's
    CPU, Python's and numpy's, the data generator's and, on CUDA, the state of ``device``."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": _numpy_state_to_python(np.random.get_state()),
        "data": generator.get_state(),
    }
    if device.type == "cuda":
        # NB: the run's GPU only, not every GPU of the machine, so that the checkpoint resumes
        # on a machine with fewer GPUs (the state moves to whichever GPU the resumed run uses).
        state[CUDA_RNG_KEY] = torch.cuda.get_rng_state(device)
    return state


def _numpy_state_to_python(state) -> tuple:
    # Plain Python types, so checkpoints load with weights_only=True.
    name, keys, position, has_gauss, cached_gaussian = state
    return (name, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian))


def _set_rng_state(state: dict, generator: torch.Generator, device: torch.device, *, quiet: bool = False) -> None:
    """Restores what :func:`_rng_state` saved; ``quiet``: no note (processes other than rank 0)."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    generator.set_state(state["data"])
    if device.type != "cuda":
        return
    if CUDA_RNG_KEY in state:
        torch.cuda.set_rng_state(state[CUDA_RNG_KEY], device)
    elif "cuda" in state:
        # Written by an older cifarnet: one state per GPU of the machine that saved it.
        every_gpu, count = state["cuda"], torch.cuda.device_count()
        torch.cuda.set_rng_state_all(every_gpu[:count])
        if len(every_gpu) > count and not quiet:
            restored = "GPU 0's is" if count == 1 else f"those of GPUs 0-{count - 1} are"
            _note(
                f"the checkpoint holds the CUDA random states of {len(every_gpu)} GPUs and this machine has {count}: "
                f"{restored} restored; a run that trained on another GPU continues with other CUDA random draws "
                "(dropout masks), so it will not match an uninterrupted run bit for bit"
            )


def _as_tuples(value):
    """``random.setstate`` needs tuples where a round trip may have given lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Reads a checkpoint written by :func:`train`.

    Returns:
        dict with ``format``, ``epoch`` (epochs completed), ``config`` (a
        :class:`TrainConfig` as dict), ``model``, ``optimizer``, ``scheduler`` (None for a
        constant learning rate), ``rng``, ``history`` (the ``metrics.jsonl`` records),
        ``batch_losses`` (per epoch, the loss of each training batch) and, in checkpoints that
        record it, ``data`` (see :func:`data_record`).

    Raises:
        ValueError: ``path`` is not a readable cifarnet checkpoint; the message says what it is
            instead.
    """
    path = Path(path)
    expected = f"expected a {CHECKPOINT_FILE} written by cifarnet-train"
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist; {expected}")
    if path.is_dir() and (path / CHECKPOINT_FILE).is_file():
        raise ValueError(f"checkpoint {path} is a folder; did you mean {path / CHECKPOINT_FILE}?")
    if not zipfile.is_zipfile(path):
        # torch.save writes a ZIP archive; anything else (an image, a text file) is not ours.
        what = describe_file(path)
        if what == "a ZIP archive":  # its start, without the directory at its end: cut short
            raise ValueError(
                f"{path} is a damaged or truncated checkpoint: a ZIP archive of {path.stat().st_size:,} bytes "
                "without its end (a copy cut short?); it cannot be read: copy it again, or train afresh with --overwrite"
            )
        raise ValueError(f"{path} is not a checkpoint: it is {what}; {expected} (a torch.save ZIP archive)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a checkpoint: {_torch_load_failure(error)}; {expected}") from None
    if not isinstance(checkpoint, dict) or "format" not in checkpoint:
        raise ValueError(
            f"{path} is a torch file but not a cifarnet checkpoint: it holds {_describe_object(checkpoint)}; {expected} "
            f"(a dict with format {CHECKPOINT_FORMAT} and {', '.join(CHECKPOINT_KEYS)})"
        )
    if checkpoint["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} has format {checkpoint['format']!r}; this cifarnet reads format {CHECKPOINT_FORMAT}"
        )
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    if missing:
        raise ValueError(f"checkpoint {path} lacks {', '.join(missing)}")
    try:
        TrainConfig(**checkpoint["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"checkpoint {path} holds an unusable config ({error})") from None
    return checkpoint


def _torch_load_failure(error: Exception) -> str:
    """One clause saying why ``torch.load(weights_only=True)`` refused a ZIP archive."""
    message = " ".join(str(error).split())
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if unsupported:
        # weights_only refuses pickled Python objects; a cifarnet checkpoint holds none.
        return f"it is a torch file holding a Python object of type {unsupported.group(1)}"
    return f"it is a ZIP archive torch cannot load ({message[:200] or type(error).__name__})"


def _describe_object(value) -> str:
    if isinstance(value, dict):
        keys = [str(key) for key in list(value)[:6]]
        return f"a dict with keys {', '.join(keys)}{', ...' if len(value) > 6 else ''}" if keys else "an empty dict"
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _resumable_config(saved: dict, config: TrainConfig, path: Path, *, complete: bool = False) -> None:
    # A setting a checkpoint predates (precision, the remedies) had its default then.
    def differs(name: str, default) -> bool:
        return saved.get(name, default) != getattr(config, name)

    allowed = RESUMABLE_CHANGES + (tuple(REMEDIES) if complete else ())
    changed = [
        f"{f.name}: {saved.get(f.name, f.default)!r} -> {getattr(config, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in allowed and differs(f.name, f.default)
    ]
    kept = [f"{f.name}={saved.get(f.name, f.default)!r}" for f in fields(TrainConfig) if f.name in REMEDIES]
    if complete and any(differs(f.name, f.default) for f in fields(TrainConfig) if f.name in REMEDIES):
        _note(f"{path} is a complete run trained with {', '.join(kept)}; it is kept as it is")
    if changed:
        raise ValueError(
            f"cannot resume {path} with different settings ({'; '.join(changed)}); "
            "resume with the run's settings, or train into another folder"
        )
    if saved.get("ops") != config.ops:
        _note(
            f"{path} was trained with {saved.get('ops')} ops and continues with {config.ops} ops: the two compute "
            "the same function on the same weights, but round differently in float32, so the result will not "
            "match an uninterrupted run bit for bit"
        )
    saved_world_size = saved.get("world_size", 1)
    if saved_world_size != config.world_size:
        _note(
            f"{path} was trained by {_processes(saved_world_size)} and continues with {_processes(config.world_size)}: "
            "the same samples and crops make each step, but gradients are summed in another order and dropout "
            "draws other masks, so the result will not match an uninterrupted run bit for bit"
        )


def _processes(count: int) -> str:
    return f"{count} process{'es' if count != 1 else ''}"


def data_record(data: CIFAR10, limit_train: int | None = None) -> dict:
    """What a run trains and tests on, as stored in its checkpoint under ``"data"``.

    Args:
        data: the loaded data set.
        limit_train: the run's ``TrainConfig.limit_train``.

    Returns:
        dict with ``root`` (the folder read, resolved), ``layout``, ``train_images`` (those
        used), ``test_images`` and ``sha256``, a hash of the pixels and labels of both (so the
        same images read from another place are recognised as the same data).
    """
    train_split = data.train.head(limit_train) if limit_train is not None else data.train
    digest = hashlib.sha256()
    for tensor in (train_split.images, train_split.labels, data.test.images, data.test.labels):
        digest.update(tensor.contiguous().numpy())
    return {
        "root": str(Path(data.root).resolve()),
        "layout": data.layout,
        "train_images": len(train_split),
        "test_images": len(data.test),
        "sha256": digest.hexdigest(),
    }


def compute_record(device: torch.device) -> dict | None:
    """What computes a run's epochs where that changes their rounding, as stored in its
    checkpoint under ``"compute"``: on the CPU, the threads (float sums split among them add in
    another order) and the instruction sets (which choose the kernels; see
    :func:`cifarnet._cpu.cpu_info`); None on a GPU."""
    if device.type != "cpu":
        return None
    return {"threads": torch.get_num_threads(), "isa": cpu_info()["isa"]}


def _check_same_compute(saved, current: dict | None, path: Path) -> None:
    """Says where a resumed run is computed otherwise than its earlier epochs were (threads,
    instruction sets), so the result will not match an uninterrupted run bit for bit."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return
    changes = []
    if saved.get("threads") != current["threads"]:
        changes.append(f"{saved.get('threads')} threads -> {current['threads']}")
    if saved.get("isa") != current["isa"]:
        changes.append(f"a CPU with {'/'.join(saved.get('isa') or ['x86-64'])} -> {'/'.join(current['isa'] or ['x86-64'])}")
    if changes:
        _note(
            f"{path} continues on other compute ({'; '.join(changes)}): float sums add in another order (and the "
            "kernels may differ), so the result will not match an uninterrupted run bit for bit"
        )


def _describe_data(record: dict) -> str:
    return f"{record['root']} ({record['train_images']:,} training and {record['test_images']:,} test images)"


def _check_same_data(saved, current: dict, path: Path) -> None:
    """Refuses to resume on other data; says so where it cannot tell, or where only the path moved."""
    if not (isinstance(saved, dict) and saved.keys() >= current.keys()):
        _note(f"{path} does not record the data it was trained on (written by an older cifarnet); continuing on "
              f"{_describe_data(current)} unchecked")
        return
    if saved.get("sha256") != current["sha256"]:
        if _describe_data(saved) == _describe_data(current):
            where = (
                f"{current['root']} no longer holds the images it was trained on (as many images, another "
                "sha256 of their pixels and labels)"
            )
        else:
            where = f"it was trained on {_describe_data(saved)}, not on {_describe_data(current)}"
        raise ValueError(
            f"cannot resume {path} on other data: {where}; point the data folder at the run's data, or train "
            "into another folder"
        )
    if saved.get("root") != current["root"]:
        _note(f"{path} was trained on {saved.get('root')}; {current['root']} holds the same images, so the run continues")


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stdout, flush=True)


def earlier_run_files(out: str | Path) -> list[str]:
    """The names of the files in ``out`` that show an earlier run: its checkpoint, or metrics of
    at least one epoch. Empty where ``out`` holds no run (a run stopped in its first epoch
    leaves nothing worth keeping)."""
    out = Path(out)
    if not out.is_dir():
        return []
    metrics = out / METRICS_FILE
    found = [CHECKPOINT_FILE] if (out / CHECKPOINT_FILE).exists() else []
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_FILE)
    return found


def _write_records(out: Path, history: list[dict], batch_losses: list[list[float]]) -> None:
    atomic_write_text(out / METRICS_FILE, "".join(json.dumps(record) + "\n" for record in history))
    atomic_write_text(out / BATCH_LOSSES_FILE, "epoch,batch,loss\n" + "".join(_batch_loss_rows(batch_losses)))


def _batch_loss_rows(batch_losses: list[list[float]], first_epoch: int = 1) -> Iterable[str]:
    for epoch_number, losses in enumerate(batch_losses, start=first_epoch):
        for batch, loss in enumerate(losses, start=1):
            yield f"{epoch_number},{batch},{loss!r}\n"
