"""The distributed parts of a run: work done on the main process only, and the checks that
every process trains the same run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

from cifarnet.study.distributed import EveryProcessError, Peers
from cifarnet.study.train.config import TrainConfig


def _on_main(peers: Peers | None, work: Callable[[], object]):
    """Runs ``work()`` on rank 0 (the one process that owns the output folder) and gives every
    process its result; a ``ValueError`` it raises is raised on every process, so that all of
    them stop with the same message instead of waiting for rank 0."""
    result, problem = None, None
    if peers is None or peers.is_main:
        try:
            result = work()
        except ValueError as error:
            problem = error
    if peers is not None:
        result, message = peers.broadcast((result, None if problem is None else str(problem)))
        if message is not None and problem is None:
            problem = EveryProcessError(message)
    if problem is not None:
        raise problem
    return result


def _check_processes_agree(peers: Peers, config: TrainConfig, trained_on: dict) -> None:
    """Refuses to start where a process was given other settings, or reads other images, than
    rank 0 (e.g. a machine with another copy of the data). Raises the same error everywhere."""
    everyone = peers.gather((asdict(config), trained_on["sha256"]))
    main_config, main_data = everyone[0]
    for rank, (rank_config, rank_data) in enumerate(everyone):
        changed = [
            f"{name}: {main_config.get(name)!r} on rank 0, {value!r}"
            for name, value in rank_config.items()
            if main_config.get(name) != value
        ]
        if changed:
            raise EveryProcessError(
                f"rank {rank} was started with other settings than rank 0 ({'; '.join(changed)}); "
                "start every process with the same options"
            )
        if rank_data != main_data:
            raise EveryProcessError(
                f"rank {rank} reads other images than rank 0 (another sha256 of their pixels and labels); "
                "every process must read the same data"
            )


def _check_last_batch(train_count: int, batch_size: int, world_size: int) -> None:
    """With several processes, each must get at least one sample of every training batch."""
    last = train_count % batch_size
    if world_size > 1 and 0 < last < world_size:
        raise EveryProcessError(
            f"the last training batch holds {last} image{'s' if last > 1 else ''} ({train_count} training images in "
            f"batches of {batch_size}), fewer than the {world_size} processes, so a process would have none; "
            f"choose a limit_train (--limit-train) that leaves 0 or at least {world_size} images for the last batch"
        )
