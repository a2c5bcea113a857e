"""The ``cifarnet-train`` and ``cifarnet-eval`` commands.

Both print problems with the data, the settings, a checkpoint or an output path as one line
on stderr and exit with status 2, without a traceback. Output paths are checked before any
work starts, and neither command replaces what it did not write unless told to
(``--overwrite``).

``cifarnet-train`` (and ``python -m cifarnet.study train``, the same command) trains data parallel
when ``torchrun`` starts it (see :mod:`cifarnet.study.distributed`): every process runs the command
with the same options, rank 0 writes the run's files and prints, and an error that every
process meets alike is printed once, by rank 0; a process that fails on its own says so with
its rank.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe
from cifarnet._cpu import thread_count_problem
from cifarnet.study.data import CIFAR10, CLASSES, BatchLoader, DataError, default_data_dir, load_cifar10, shortfall
from cifarnet.study.distributed import (
    DEFAULT_TIMEOUT_SECONDS,
    EveryProcessError,
    Launch,
    PeerFailure,
    Peers,
    default_threads,
    launch_from_environment,
    process_group,
)
from cifarnet.study.fileio import describe_file, output_file_problem, output_folder_problem
from cifarnet.study.models import OPS, ConvNet
from cifarnet.study.plots import is_cifarnet_plot, plot_confusion_matrix
from cifarnet.study.results import write_report
from cifarnet.study.train import (
    CHECKPOINT_DATA_KEY,
    CHECKPOINT_FILE,
    DEVICES,
    MAX_SEED,
    PRECISIONS,
    REMEDIES,
    TrainConfig,
    TrainingDiverged,
    data_record,
    earlier_run_files,
    epoch,
    load_checkpoint,
    resolve_device,
    train,
)
from cifarnet.study.variants import VARIANTS, recipe

__all__ = ["eval_main", "train_main"]

ALL = "all"
CONFUSION_PLOT = "confusion_matrix.png"
ERROR_STATUS = 2
# How a divergence message names each remedy: as the option, with its suggested value.
REMEDY_OPTIONS = {
    "warmup_epochs": f"--warmup-epochs {REMEDIES['warmup_epochs']}",
    "clip_grad_norm": f"--clip-grad-norm {REMEDIES['clip_grad_norm']:g}",
}
# A stopped run exits as a shell reports a process that the signal ended (128 + its number), so
# a script or scheduler tells Ctrl-C and SIGTERM from an error (2) and from a finished run (0).
INTERRUPTED_STATUS = 128 + signal.SIGINT  # 130
TERMINATED_STATUS = 128 + signal.SIGTERM  # 143


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _threads(text: str) -> int:
    value = _positive_int(text)
    if problem := thread_count_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer of 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {value}")
    return value


def _train_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="cifarnet-train",
        description="Train the study's CIFAR-10 ConvNet (one variant, or all six in turn).",
    )
    parser.add_argument("--variant", choices=(*VARIANTS, ALL), default=defaults.variant,
                        help="study step to train; 'all' trains the six in turn (default: %(default)s)")
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs, help="default: %(default)s")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="images per step, over all processes under torchrun (default: %(default)s)")
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr, help="initial learning rate (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"cifar-10-batches-py/ or train/ and test/ image folders; downloaded when empty "
                             f"(default: {default_data_dir()})")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<variant>)")
    parser.add_argument("--seed", type=_seed, default=defaults.seed, help="0 to 2**32 - 1 (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: %(default)s")
    parser.add_argument("--ops", choices=OPS, default=defaults.ops,
                        help="fused cifarnet ops or native torch layers (default: %(default)s)")
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision,
                        help="float32 (the study as published) or bfloat16: forward passes under torch.autocast, "
                             "parameters kept in float32 (default: %(default)s)")
    remedies = parser.add_argument_group(
        "remedies", "off by default, so the study's schedule stays exact; for runs that diverge (a non-finite loss)")
    remedies.add_argument("--warmup-epochs", type=_non_negative_int, default=defaults.warmup_epochs, metavar="E",
                          help="raise the learning rate linearly, batch by batch, to its scheduled value over the "
                               f"first E epochs (suggested: {REMEDIES['warmup_epochs']}; default: %(default)s, none)")
    remedies.add_argument("--clip-grad-norm", type=_positive_float, default=defaults.clip_grad_norm, metavar="MAX",
                          help="clip each batch's gradients to total 2-norm MAX before the step "
                               f"(suggested: {REMEDIES['clip_grad_norm']:g}; default: none)")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads (default: torch's choice; under torchrun, the machine's cores shared "
                             "among its processes)")
    parser.add_argument("--limit-train", type=_positive_int, default=None, metavar="N",
                        help="train on the first N training images only")
    distributed = parser.add_argument_group(
        "several processes", "under torchrun (e.g. torchrun --nproc-per-node 2 -m cifarnet.study train ...); "
        "--batch-size is the global batch, which the processes share")
    distributed.add_argument("--dist-timeout", type=_positive_float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                             help="stop when another process has not answered for this long (it died or stalled) "
                                  "(default: %(default)g)")
    distributed.add_argument("--no-sync-bn", action="store_true",
                             help="batch norm with each process's own statistics (default: statistics of the whole "
                                  "global batch, cifarnet.nn.convert_sync_batchnorm)")
    earlier_run = parser.add_mutually_exclusive_group()
    earlier_run.add_argument("--resume", action="store_true",
                             help="continue from OUT/checkpoint.pt where it exists (with --variant all, each "
                                  "OUT/VARIANT/checkpoint.pt; same data and settings; --epochs and --ops may change)")
    earlier_run.add_argument("--overwrite", action="store_true",
                             help="where OUT already holds a run, replace it (without this, or --resume, such "
                                  "a folder is refused)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, run every training step eagerly (default: replay the steps from CUDA graphs, "
                        "one process only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines")
    return parser


def _warnings_in_one_line(program: str):
    """Decorates a command so that warnings print as ``program: warning: message`` on stderr,
    one line as its errors do (naming the process under torchrun), not in Python's
    ``file:line: UserWarning`` form with a line of source."""

    def decorate(command):
        @functools.wraps(command)
        def run(argv: list[str] | None = None) -> int:
            try:
                several = int(os.environ.get("WORLD_SIZE") or 1) > 1
            except ValueError:  # the command itself reports a malformed WORLD_SIZE
                several = False
            where = f"rank {os.environ.get('RANK', '?')}: " if several else ""

            def show(message, category, filename, lineno, file=None, line=None):
                print(f"{program}: warning: {where}{message}", file=sys.stderr, flush=True)

            with warnings.catch_warnings():
                warnings.showwarning = show
                return command(argv)

        return run

    return decorate


def _fail(program: str, message: object) -> int:
    print(f"{program}: error: {message}", file=sys.stderr)
    return ERROR_STATUS


@ends_quietly_on_a_closed_pipe
@_warnings_in_one_line("cifarnet-train")
def train_main(argv: list[str] | None = None) -> int:
    """``cifarnet-train``: trains one variant into ``--out``, or all six into ``--out/<variant>``
    followed by ``results.md`` and ``test_accuracy.png``. Returns the exit status.

    With ``--variant all`` a variant that diverges is reported (one line) and the next one
    trains; the exit status is then an error. With ``--variant all --resume`` the six runs can
    be made over several sessions: a complete run is kept (whatever remedies it was trained
    with), an interrupted or diverged one continues from its last complete epoch and a missing
    one starts. The table and plot are written from whatever runs exist, also when the command
    stops early (an interruption), with the missing and diverged ones marked.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the processes train each run
    together (see :func:`cifarnet.study.train.train`), in a process group that waits at most
    ``--dist-timeout`` seconds for a process that stopped answering.
    """
    args = _train_parser().parse_args(argv)
    try:
        launch = launch_from_environment()
    except ValueError as error:
        return _fail("cifarnet-train", error)
    world_size = launch.world_size if launch is not None else 1
    is_main = launch is None or launch.is_main
    every_variant = args.variant == ALL
    variants = VARIANTS if every_variant else (args.variant,)
    out = args.out if args.out is not None else Path("runs") / args.variant
    run_folders = {variant: out / variant if every_variant else out for variant in variants}
    progress = not args.no_progress
    # Problems every process finds alike are reported once, by rank 0.
    problem = None
    if is_main:
        problem = _train_output_problem(out, run_folders.values(), args.resume, args.overwrite, every_variant)
    if problem is None and args.batch_size % world_size:
        problem = (
            f"--batch-size {args.batch_size} does not split evenly among the {world_size} processes (WORLD_SIZE="
            f"{world_size}): it is the global batch, of which each process takes --batch-size / {world_size} samples "
            f"per step; expected a multiple of {world_size}"
        )
    try:
        configs = {variant: _train_config(args, variant, world_size) for variant in variants}
    except ValueError as error:
        problem = problem or str(error)
    if problem:
        return _fail("cifarnet-train", problem) if is_main else ERROR_STATUS
    try:
        device = resolve_device(args.device)
    except ValueError as error:
        return _fail("cifarnet-train", _on_rank(launch, error))
    threads = args.threads
    distributed = world_size > 1
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", launch.local_rank)
        threads = threads or default_threads(launch)
    status, started = 0, False
    # SIGTERM (a plain kill, a scheduler, timeout; torchrun stopping the other processes when one
    # fails) stops the run as Ctrl-C does, saying where the completed epochs are. Python can
    # only install handlers in the main thread; elsewhere SIGTERM keeps its default.
    handle_sigterm = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if handle_sigterm else None
    try:
        with process_group(launch, device, args.dist_timeout) if distributed else contextlib.nullcontext():
            peers = Peers(device, args.dist_timeout) if distributed else None
            data = _load_data(args.data_dir, progress and is_main, launch, peers)
            for variant in variants:
                run_out = run_folders[variant]
                started = True
                try:
                    train(
                        configs[variant], run_out, data=data, device=device, threads=threads, resume=args.resume,
                        overwrite=args.overwrite, progress=progress, peers=peers, cuda_graph=not args.no_cuda_graph,
                    )
                except TrainingDiverged as error:
                    if not every_variant:
                        raise
                    # The other variants still train (a diverged momentum run would otherwise keep
                    # dropout and full from ever starting, --resume reaching the same divergence).
                    failed = _fail("cifarnet-train", error.describe(REMEDY_OPTIONS)) if is_main else ERROR_STATUS
                    status = status or failed
                    continue
                if is_main:
                    print(f"{variant}: results in {run_out}")
    except (TrainingDiverged, EveryProcessError) as error:
        # Met alike by every process: rank 0 reports it.
        message = error.describe(REMEDY_OPTIONS) if isinstance(error, TrainingDiverged) else error
        status = _fail("cifarnet-train", message) if is_main else ERROR_STATUS
    except (DataError, ValueError, OSError, PeerFailure) as error:
        status = _fail("cifarnet-train", _on_rank(launch, error))
    except KeyboardInterrupt:
        print(f"cifarnet-train: {_on_rank(launch, 'interrupted')}; {_what_was_saved(out)}", file=sys.stderr)
        status = INTERRUPTED_STATUS
    except _Terminated:
        why = " (torchrun sends it to every process when one fails, or when it is stopped itself)" if distributed else ""
        print(f"cifarnet-train: {_on_rank(launch, 'stopped by SIGTERM')}{why}; {_what_was_saved(out)}", file=sys.stderr)
        status = TERMINATED_STATUS
    finally:
        if handle_sigterm:
            # None: the handler was not installed from Python (an embedding program's); the default then.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)
    if every_variant and started and is_main:
        try:
            table, plot = write_report(out, epochs=args.epochs)
            print(f"summary: {table}, {plot}")
        except (ValueError, OSError) as error:
            # After an earlier failure its line is the one that matters; the summary is a bonus.
            if status == 0:
                status = _fail("cifarnet-train", f"cannot write the summary: {error}")
    return status


def _train_config(args: argparse.Namespace, variant: str, world_size: int) -> TrainConfig:
    return TrainConfig(
        variant=variant,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ops=args.ops,
        limit_train=args.limit_train,
        precision=args.precision,
        warmup_epochs=args.warmup_epochs,
        clip_grad_norm=args.clip_grad_norm,
        world_size=world_size,
        sync_batch_norm=not args.no_sync_bn,
    )


def _load_data(data_dir: Path | None, progress: bool, launch: Launch | None, peers: Peers | None):
    """The data set, with a note where it is not the whole of CIFAR-10; with several processes,
    each machine's first process reads it first (it may download or decode it into the cache),
    then the others read what it left."""
    if peers is None:
        data = load_cifar10(data_dir, progress=progress)
    else:
        first_on_machine = launch.local_rank == 0
        if not first_on_machine:
            peers.barrier()
        data = load_cifar10(data_dir, progress=progress and first_on_machine)
        if first_on_machine:
            peers.barrier()
    if launch is None or launch.rank == 0:
        _note_shortfall(data)
    return data


def _note_shortfall(data: CIFAR10) -> None:
    if (difference := shortfall(data)) is not None:
        print(f"note: {difference}", flush=True)


def _on_rank(launch: Launch | None, message: object) -> str:
    """``message``, naming this process where several run (a PeerFailure names it already)."""
    if launch is None or launch.world_size == 1 or isinstance(message, PeerFailure):
        return str(message)
    return f"rank {launch.rank}: {message}"


class _Terminated(BaseException):
    """SIGTERM arrived. A BaseException, as KeyboardInterrupt is, so that no ``except Exception``
    on the way (a download cleaned up and reported as failed, a cache deemed damaged) takes it
    for an error."""


def _what_was_saved(out: Path) -> str:
    """What a stopped cifarnet-train leaves in ``out`` (a run's folder, or --variant all's)."""
    if (out / CHECKPOINT_FILE).exists() or any(out.glob(f"*/{CHECKPOINT_FILE}")):
        return f"completed epochs are saved in {out}, continue with --resume"
    return "no epoch had completed, so nothing was saved"


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _train_output_problem(
    out: Path, run_folders: Iterable[Path], resume: bool, overwrite: bool, every_variant: bool = False
) -> str | None:
    """Why cifarnet-train must not write into ``out``, in its own words, or None."""
    problem = output_folder_problem(out)
    if problem:
        return f"--out {out}: {problem}"
    earlier = earlier_run_files(out)
    if every_variant and earlier:
        # Checked now: the summary of the six runs could not be written there after they train.
        return (f"--out {out} holds a single run ({', '.join(earlier)}); --variant all writes a folder of "
                f"run folders: choose another folder")
    for folder in run_folders:
        problem = output_folder_problem(folder)
        if problem:
            return f"{folder}: {problem}"
        earlier = earlier_run_files(folder)
        if earlier and not (resume or overwrite):
            return (
                f"{folder} already holds a run ({', '.join(earlier)}); continue it with --resume, "
                f"or pass --overwrite to replace it"
                + (" (with --variant all, --resume keeps complete runs and continues the others, "
                   "--overwrite replaces every run)" if every_variant else "")
            )
        if earlier and resume and CHECKPOINT_FILE not in earlier:
            # --resume would start afresh and rewrite the metrics: the recorded epochs would be lost.
            return f"{folder} holds {', '.join(earlier)} but no {CHECKPOINT_FILE} to resume from; pass --overwrite to replace it"
    return None


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifarnet-eval",
        description="Test a checkpoint written by cifarnet-train: loss, top-1/top-5, per-class accuracy, confusion matrix.",
    )
    parser.add_argument("checkpoint", type=Path, help=f"a {CHECKPOINT_FILE} written by cifarnet-train")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help=f"as for cifarnet-train (default: the folder the checkpoint was trained on, which "
                             f"must still hold the same images; where it is gone, {default_data_dir()})")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="default: %(default)s")
    parser.add_argument("--ops", choices=OPS, default=None, help="default: the checkpoint's")
    parser.add_argument("--batch-size", type=_positive_int, default=None, help="default: the checkpoint's")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the checkpoint's")
    parser.add_argument("--threads", type=_threads, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"confusion-matrix PNG (default: {CONFUSION_PLOT} beside the checkpoint); an "
                             "existing file is replaced only where it is a plot cifarnet drew")
    parser.add_argument("--overwrite", action="store_true", help="replace --out whatever it is")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


@ends_quietly_on_a_closed_pipe
@_warnings_in_one_line("cifarnet-eval")
def eval_main(argv: list[str] | None = None) -> int:
    """``cifarnet-eval``: tests a checkpoint and prints the figures, a per-class table and the
    path of the confusion-matrix PNG. Returns the exit status."""
    args = _eval_parser().parse_args(argv)
    progress = not args.no_progress
    plot_path = args.out if args.out is not None else args.checkpoint.parent / CONFUSION_PLOT
    problem = _plot_output_problem(plot_path, explicit=args.out is not None, overwrite=args.overwrite)
    if problem:
        return _fail("cifarnet-eval", problem)
    try:
        device = resolve_device(args.device)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        checkpoint = load_checkpoint(args.checkpoint)
        config = TrainConfig(**checkpoint["config"])
        ops = args.ops or config.ops
        precision = args.precision or config.precision
        model = ConvNet(config.variant, ops)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            # torch's first line only names the model; the missing, unexpected or mis-sized keys follow.
            lines = [line.strip() for line in str(error).strip().splitlines()]
            details = "; ".join(lines[1:]) or lines[0]
            details = details if len(details) <= 400 else details[:400] + "..."
            raise ValueError(f"{args.checkpoint} does not fit a {config.variant} ConvNet: {details}") from None
        model.to(device)
        data = _eval_data(args.data_dir, checkpoint, args.checkpoint, progress)
        loader = BatchLoader(data.test, args.batch_size or config.batch_size, recipe(config.variant), train=False, device=device)
        confusion = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.int64)
        result = epoch(loader, model, nn.CrossEntropyLoss(), progress=progress, description="test", confusion=confusion,
                       autocast_dtype=PRECISIONS[precision])
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_confusion_matrix(
            confusion.numpy(), CLASSES, plot_path,
            title=f"{config.variant}, epoch {checkpoint['epoch']}: test top-1 {result.top1:.2f}%",
        )
    except (DataError, ValueError, OSError) as error:
        return _fail("cifarnet-eval", error)
    except KeyboardInterrupt:
        print("cifarnet-eval: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    print(f"checkpoint {args.checkpoint}: variant {config.variant}, epoch {checkpoint['epoch']}, ops {ops}, {precision}")
    print(f"test loss {result.loss:.4f}  top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  ({len(data.test):,} images)")
    print()
    print(_per_class_table(confusion))
    print()
    print(f"confusion matrix: {plot_path}")
    return 0


def _eval_data(data_dir: Path | None, checkpoint: dict, path: Path, progress: bool) -> CIFAR10:
    """The data cifarnet-eval tests on: ``data_dir``; without it, the folder the checkpoint
    records it was trained on, where that still exists, else :func:`default_data_dir`
    (downloaded when empty). Without ``data_dir`` it says in one line which folder it reads and
    why; where the images are not those the run trained on (the record's hash), it says so,
    and refuses the recorded folder (what it holds now is not what it recorded).

    Raises:
        ValueError: the recorded folder holds other images now.
        DataError: as :func:`load_cifar10`.
    """
    record = checkpoint.get(CHECKPOINT_DATA_KEY)
    record = record if isinstance(record, dict) else {}
    recorded_root = record.get("root")
    reads_recorded = False
    if data_dir is None:
        default = f"data: {default_data_dir()}, since"
        fallback = "(downloaded there when empty; --data-dir names another folder)"
        if recorded_root is None:
            print(f"{default} {path} does not record the folder it was trained on (written by an older cifarnet) "
                  f"{fallback}", flush=True)
        elif not Path(recorded_root).is_dir():
            print(f"{default} {recorded_root}, the folder {path} was trained on, no longer exists {fallback}", flush=True)
        else:
            data_dir, reads_recorded = Path(recorded_root), True
    data = load_cifar10(data_dir, progress=progress)
    _note_shortfall(data)
    if "sha256" not in record:
        if reads_recorded:
            print(f"data: {recorded_root}, the folder {path} was trained on (its images unchecked: the checkpoint "
                  "records no hash of them)", flush=True)
        return data
    limit_train = TrainConfig(**checkpoint["config"]).limit_train
    same_images = data_record(data, limit_train)["sha256"] == record["sha256"]
    if reads_recorded and not same_images:
        raise ValueError(
            f"{recorded_root}, the folder {path} was trained on, no longer holds its images (another sha256 of their "
            f"pixels and labels); pass --data-dir {recorded_root} to test on what it holds now, or --data-dir with "
            "a copy of the run's data"
        )
    if reads_recorded:
        print(f"data: {recorded_root}, the folder {path} was trained on (the same images)", flush=True)
    elif not same_images:
        print(f"note: {data.root} holds other images than {path} was trained on (another sha256 of their pixels "
              "and labels); the figures are those of these images", flush=True)
    return data


def _plot_output_problem(path: Path, *, explicit: bool, overwrite: bool) -> str | None:
    """Why cifarnet-eval must not write its PNG to ``path``, or None.

    An existing file is replaced only where it is a plot cifarnet drew (tagged, see
    :func:`cifarnet.study.plots.is_cifarnet_plot`), or, at the default path, any PNG (earlier
    versions drew untagged ones there), or with ``--overwrite``.
    """
    option = "--out " if explicit else "the confusion-matrix plot "
    problem = output_file_problem(path)
    if problem:
        return f"{option}{path}: {problem}"
    if not path.exists() or overwrite or is_cifarnet_plot(path):
        return None
    what = describe_file(path)
    if not explicit and what == "a PNG image":
        return None
    return (
        f"{option}{path} exists and is {what}, not a plot cifarnet drew; choose another --out, "
        f"or pass --overwrite to replace it"
    )


def _per_class_table(confusion: torch.Tensor) -> str:
    width = max(len(name) for name in CLASSES)
    lines = [f"{'class':<{width}}  accuracy  correct / total"]
    for label, name in enumerate(CLASSES):
        total = int(confusion[label].sum())
        correct = int(confusion[label, label])
        accuracy = f"{100 * correct / total:.2f}%" if total else "-"
        lines.append(f"{name:<{width}}  {accuracy:>8}  {correct:>7} / {total}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m cifarnet.study {train,eval} ...`` (and ``python -m cifarnet.study.cli ...``): the two
    commands under one entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "eval": eval_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m cifarnet.study {train,eval} [options]  (or cifarnet-train / cifarnet-eval)", file=sys.stderr)
        return ERROR_STATUS
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
