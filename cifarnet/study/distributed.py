"""Data-parallel training under ``torchrun``: where this process stands, the process group, and
the few collectives the training loop needs.

``torchrun`` starts one process per device and tells each its place through environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``); :func:`launch_from_environment` reads them, and without them a command runs
as one process, as before. :func:`process_group` joins the default process group (gloo on the
CPU, NCCL on CUDA) with a timeout, so that a process whose peer died or stalled stops with
:class:`PeerFailure` instead of waiting forever.

How the training loop splits the work (see :func:`cifarnet.study.train.train`): every process draws
the same shuffled order and augmentation and takes its own slice (:func:`shard_bounds`) of each
global batch; gradients are averaged by ``DistributedDataParallel``; metrics are summed over all
processes with :meth:`Peers.sum`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "EveryProcessError",
    "Launch",
    "PeerFailure",
    "Peers",
    "backend_for",
    "default_threads",
    "epoch_seed",
    "is_communication_error",
    "launch_from_environment",
    "process_group",
    "shard_bounds",
]

DEFAULT_TIMEOUT_SECONDS = 300.0
"""How long a process waits in a collective for its peers before it gives up (torch's own
default is 30 minutes). Long enough for rank 0 to write a checkpoint and plots while the others
wait at the next step; short enough that a stalled peer does not hold the rest for long."""

# The variables torchrun sets for every worker; RANK and WORLD_SIZE are the ones that matter.
REQUIRED_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class EveryProcessError(ValueError):
    """A problem every process meets alike (bad settings, other data on one machine, a refused
    checkpoint), raised with the same message by all of them: rank 0 reports it, the others
    stop quietly, so the message is printed once."""


class PeerFailure(RuntimeError):
    """A collective failed: another process stopped (killed, out of memory, an error) or did
    not answer within the process group's timeout."""


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes ``torchrun`` started.

    Attributes:
        rank: this process, from 0 (rank 0 writes the run's files).
        world_size: processes in all, over all machines.
        local_rank: this process on its machine, from 0 (picks the GPU).
        local_world_size: processes on this machine.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0


def launch_from_environment(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The :class:`Launch` that ``torchrun``'s environment variables describe, or None where
    none of them is set (a plain, single-process command).

    Raises:
        ValueError: some of the variables are set but not all, or one is not a valid number;
            the message names the variable and its value.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in REQUIRED_VARIABLES if name in environ]
    if not present:
        return None
    missing = [name for name in REQUIRED_VARIABLES if name not in environ]
    if missing:
        raise ValueError(
            f"{', '.join(present)} set but not {', '.join(missing)}: a distributed run needs all of "
            f"{', '.join(REQUIRED_VARIABLES)} (torchrun sets them); unset them for a single-process run"
        )
    world_size = _environment_int(environ, "WORLD_SIZE", minimum=1)
    rank = _environment_int(environ, "RANK", minimum=0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={world_size}; expected 0 <= RANK < WORLD_SIZE")
    local_rank = _environment_int(environ, "LOCAL_RANK", minimum=0, default=rank)
    # Launched by hand without LOCAL_WORLD_SIZE: assume every process is on this machine.
    local_world_size = _environment_int(environ, "LOCAL_WORLD_SIZE", minimum=1, default=world_size)
    return Launch(rank, world_size, local_rank, local_world_size)


def _environment_int(environ: Mapping[str, str], name: str, *, minimum: int, default: int | None = None) -> int:
    text = environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer; expected an integer of {minimum} or more") from None
    if value < minimum:
        raise ValueError(f"{name}={value}; expected an integer of {minimum} or more")
    return value


def backend_for(device: torch.device) -> str:
    """The process-group backend for ``device``: ``"nccl"`` on CUDA, ``"gloo"`` on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def default_threads(launch: Launch) -> int:
    """CPU threads per process: this machine's usable cores shared among its processes
    (at least 1), so that the processes of one machine do not oversubscribe it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // launch.local_world_size)


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> Iterator[None]:
    """Joins the default process group for the body of the ``with``, and leaves it after.

    Args:
        launch: this process's place (from :func:`launch_from_environment`).
        device: the device this process trains on; CUDA means NCCL and, where ``device`` has no
            index, the GPU ``launch.local_rank``.
        timeout_seconds: how long a collective waits for the other processes before it fails.

    Raises:
        PeerFailure: the rendezvous failed (the other processes did not come within the timeout).
    """
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else launch.local_rank)
    try:
        dist.init_process_group(
            backend_for(device), timeout=timedelta(seconds=timeout_seconds), rank=launch.rank, world_size=launch.world_size
        )
    except (RuntimeError, dist.DistError) as error:
        raise PeerFailure(
            f"rank {launch.rank} of {launch.world_size}: could not join the other processes at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within {timeout_seconds:g} s "
            f"({_first_line(error)})"
        ) from None
    try:
        yield
    finally:
        # NB: after a peer failed, leaving can itself fail; the first error is the one to report.
        with contextlib.suppress(RuntimeError, dist.DistError):
            dist.destroy_process_group()


def shard_bounds(count: int, world_size: int, rank: int) -> tuple[int, int]:
    """The slice ``start:stop`` of a batch of ``count`` samples that process ``rank`` takes.

    Contiguous slices in rank order, as even as possible (the first ``count % world_size``
    ranks take one more), as ``torch.tensor_split`` cuts: a global batch of 128 over 2
    processes is 0:64 and 64:128.
    """
    share, extra = divmod(count, world_size)
    start = rank * share + min(rank, extra)
    return start, start + share + (rank < extra)


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """A seed for process ``rank``'s own random draws (dropout) in ``epoch``: a hash of the
    three, so runs are reproducible and no two processes or epochs share a stream."""
    digest = hashlib.sha256(f"cifarnet/{seed}/{rank}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # non-negative, as manual_seed wants


# Words in the runtime errors that gloo and NCCL raise (torch passes them on as RuntimeError):
# "Connection closed by peer", "Timed out waiting ... for recv operation", "NCCL error".
_COMMUNICATION_WORDS = ("gloo", "nccl", "c10d", "connection", "timed out", "timeout", "socket", "peer")


def is_communication_error(error: BaseException) -> bool:
    """Whether ``error`` comes from the process group's communication (a collective failed)
    rather than from the computation around it."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in text for word in _COMMUNICATION_WORDS)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Peers:
    """The collectives of data-parallel training, over the default process group.

    Each call is one collective: every process must make the same calls in the same order.
    A failed collective (a peer stopped, or the timeout passed) raises :class:`PeerFailure`.

    Args:
        device: where this process's tensors live (NCCL reduces on the GPU).
        timeout_seconds: the process group's timeout, for messages.
    """

    def __init__(self, device: torch.device, timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Peers needs an initialised default process group (see process_group)")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device(device)
        self.timeout_seconds = timeout_seconds

    @property
    def is_main(self) -> bool:
        """Rank 0."""
        return self.rank == 0

    @contextlib.contextmanager
    def guard(self, what: str, *, only_communication: bool = True) -> Iterator[None]:
        """Turns a failed collective in the body (a peer stopped, the timeout passed) into a
        :class:`PeerFailure` that says ``what`` failed.

        Args:
            what: what the body does, for the message ("training").
            only_communication: convert only errors of the communication backend (torch's
                ``DistError`` and gloo's or NCCL's runtime errors), so that a bug in the body,
                such as a shape error in a model that ``DistributedDataParallel`` runs, keeps its
                own message. False: any ``RuntimeError``, for a body that only communicates.
        """
        try:
            yield
        except (RuntimeError, dist.DistError) as error:
            if only_communication and not is_communication_error(error):
                raise
            raise PeerFailure(
                f"rank {self.rank} of {self.world_size}: {what} failed: another process stopped, or did not answer "
                f"within {self.timeout_seconds:g} s ({_first_line(error)})"
            ) from None

    def _collective(self, what: str):
        return self.guard(what, only_communication=False)

    def sum(self, values: Sequence[float], what: str = "summing metrics") -> list[float]:
        """``values`` summed element-wise over all processes (in float64, so counts stay exact
        and a nan or inf on any process is one on every process); ``what`` they are, for the
        message if it fails."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self._collective(what):
            dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_later(self, values: Sequence[float], what: str = "summing metrics") -> Callable[[], list[float]]:
        """Starts :meth:`sum` of ``values`` and returns at once; call what it returns for the
        sums (it waits for them), so the collective overlaps the work in between."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        with self._collective(what):
            work = dist.all_reduce(tensor, async_op=True)

        def result() -> list[float]:
            with self._collective(what):
                work.wait()
            return tensor.tolist()

        return result

    def broadcast(self, obj):
        """Rank 0's ``obj``, on every process (any picklable object; others pass anything)."""
        holder = [obj]
        with self._collective("receiving rank 0's state"):
            dist.broadcast_object_list(holder, src=0, device=self.device if self.device.type == "cuda" else None)
        return holder[0]

    def gather(self, obj, what: str = "comparing settings") -> list:
        """Every process's ``obj``, in rank order, on every process; ``what`` it is, for the
        message if it fails."""
        gathered = [None] * self.world_size
        with self._collective(what):
            dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Copies rank 0's buffers (batch-norm running statistics) into every process's
        ``module``, so that all of them evaluate, and save, the same model."""
        with self._collective("receiving rank 0's buffers"):
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def data_parallel(self, module: nn.Module) -> nn.parallel.DistributedDataParallel:
        """``module`` wrapped in ``DistributedDataParallel`` (which starts from rank 0's
        parameters and buffers, and averages the gradients of every backward pass).

        DDP does not copy rank 0's buffers to the others before every forward pass: in this
        model they are the batch norm's running statistics, read only in evaluation, and the
        trainer gives every process rank 0's before that (:meth:`broadcast_buffers`). That
        saves a collective per step.
        """
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # torch 2.14 renamed the option (the old name warns there); 2.11 knows only the old one.
        ddp_options = inspect.signature(nn.parallel.DistributedDataParallel).parameters
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
        with self._collective("starting DistributedDataParallel"):
            # Gradients as views of the communication buckets: no copy into and out of them.
            return nn.parallel.DistributedDataParallel(
                module, device_ids=device_ids, gradient_as_bucket_view=True, **{no_buffer_sync: False}
            )

    def barrier(self) -> None:
        """Waits until every process gets here."""
        with self._collective("waiting for the other processes"):
            dist.barrier()
