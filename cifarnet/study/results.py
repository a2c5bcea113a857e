"""The study's table and test-accuracy plot, from whatever runs a folder holds.

``python -m cifarnet.study.results DIR`` reads every run folder in ``DIR`` and writes
``DIR/results.md`` (one row per run, and one per variant with no run, marked so; then one
row per configuration, over its seeds, beside the study's figures) and
``DIR/test_accuracy.png`` (test top-1 per epoch, one curve per configuration: its seeds'
mean, their range shaded). A run folder is named after its
variant, ``<variant>`` as ``cifarnet-train --variant all`` writes them, or
``<variant>-<anything>`` (``full-fused-seed0``, as in ``docs/results``), and holds the run's
``metrics.jsonl``; where the run diverged, its ``diverged.json``; where the run is in the folder
it was trained in, its ``checkpoint.pt`` (which says how many epochs the run was meant to have,
so a run stopped early is marked partial). Both tables state each run's epochs and training
images (``metrics.jsonl``'s ``train_images``, else the checkpoint's record of its data), so that
a short run on part of the data is not taken for one of the study's. So the table and plot of the study's page
(``docs/study.md``) can be regenerated from the small files kept in ``docs/results``:
``python -m cifarnet.study.results docs/results --page docs/study.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe
from cifarnet.study.fileio import atomic_write_text
from cifarnet.study.plots import plot_test_accuracy
from cifarnet.study.train import CHECKPOINT_DATA_KEY, CHECKPOINT_FILE, DIVERGENCE_FILE, METRICS_FILE, load_checkpoint
from cifarnet.study.variants import VARIANTS

__all__ = [
    "COMPARISON_PLOT", "RESULTS_FILE", "Run", "SEEDS_TABLE_MARKER", "configuration_of", "main", "read_runs",
    "results_table", "seeds_table", "update_page", "write_report",
]  # fmt: skip

RESULTS_FILE = "results.md"
COMPARISON_PLOT = "test_accuracy.png"
NOT_RUN = "not run"
UNKNOWN = "?"  # a figure the run's files do not give

# What the runs are measured against (SEED.md): the study's test top-1 (%) and test loss per
# variant, read off its plots, and the best test top-1 (%) of an independent reproduction.
STUDY = {
    "baseline": (70, 2.5), "normalized": (75, 2.5), "augmented": (80, 1.1),
    "momentum": (80, 0.85), "dropout": (80, 0.65), "full": (85, 0.55),
}  # fmt: skip
REPRODUCTION = {"baseline": 72.7, "normalized": 75.2, "augmented": 81.4, "momentum": 78.8, "dropout": 83.0, "full": 85.0}


@dataclass
class Run:
    """What one run folder says about its run.

    Attributes:
        name: the folder's name (``momentum``, ``full-fused-seed0``).
        variant: the study variant, the name up to its first ``-``.
        history: the ``metrics.jsonl`` records, one per completed epoch.
        epochs: the epochs the run was meant to reach (from its checkpoint), or None where
            unknown.
        divergence: the ``diverged.json`` record (``epoch``, ``batch``, ``loss``), or None.
        train_images: the training images the run was trained on (``metrics.jsonl``'s
            ``train_images``, else its checkpoint's data record), or None where unknown.
    """

    name: str
    variant: str
    history: list[dict] = field(default_factory=list)
    epochs: int | None = None
    divergence: dict | None = None
    train_images: int | None = None

    @property
    def status(self) -> str | None:
        """Why the run is not a complete one ("diverged ...", "partial: ..."), or None."""
        if self.divergence is not None:
            if self.divergence.get("collapsed"):
                return f"collapsed (one class for every test image, stopped after epoch {self.divergence['epoch']})"
            where = f", batch {self.divergence['batch']}" if self.divergence.get("batch") is not None else ""
            return f"diverged ({self.divergence['loss']} loss in epoch {self.divergence['epoch']}{where})"
        if self.epochs is not None and len(self.history) < self.epochs:
            return f"partial: {len(self.history)} of {self.epochs} epochs"
        return None


def _variant_of(name: str) -> str | None:
    variant = name.split("-", 1)[0]
    return variant if variant in VARIANTS else None


# What the tables and plots read of each epoch's record in metrics.jsonl.
RECORD_KEYS = ("epoch", "train_loss", "test_loss", "test_top1", "seconds")


def read_run(folder: str | Path, epochs: int | None = None) -> Run | None:
    """The run in ``folder``, or None where it holds none (no metrics and no divergence).

    Args:
        folder: a run folder, named ``<variant>`` or ``<variant>-<anything>``.
        epochs: the epochs the run was meant to reach; None: as its checkpoint says, if any.

    Raises:
        ValueError: ``folder``'s name starts with no variant, or a file in it is unreadable.
    """
    folder = Path(folder)
    variant = _variant_of(folder.name)
    if variant is None:
        raise ValueError(f"{folder}: a run folder's name starts with a variant ({', '.join(VARIANTS)})")
    metrics, divergence = folder / METRICS_FILE, folder / DIVERGENCE_FILE
    history = []
    if metrics.is_file():
        try:
            history = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise ValueError(f"{metrics}: not one JSON object per line ({error})") from None
        for number, line in enumerate(history, 1):
            missing = [key for key in RECORD_KEYS if key not in line] if isinstance(line, dict) else list(RECORD_KEYS)
            if missing:
                raise ValueError(f"{metrics}: epoch record {number} lacks {', '.join(missing)}; expected cifarnet-train's metrics")
    record = json.loads(divergence.read_text(encoding="utf-8")) if divergence.is_file() else None
    if not history and record is None:
        return None
    train_images = next((line["train_images"] for line in reversed(history) if "train_images" in line), None)
    if (epochs is None or train_images is None) and (folder / CHECKPOINT_FILE).is_file():
        checkpoint = load_checkpoint(folder / CHECKPOINT_FILE)
        epochs = checkpoint["config"]["epochs"] if epochs is None else epochs
        if train_images is None:
            train_images = (checkpoint.get(CHECKPOINT_DATA_KEY) or {}).get("train_images")
    return Run(folder.name, variant, history, epochs, record, train_images)


def read_runs(folder: str | Path, epochs: int | None = None) -> list[Run]:
    """The runs in the subfolders of ``folder`` named after a variant, in the study's order of
    variants, then by name; see :func:`read_run`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder of runs")
    if (folder / METRICS_FILE).is_file():
        raise ValueError(
            f"{folder} is a run's folder (it holds {METRICS_FILE}); expected a folder of run folders, such as the "
            "--out of cifarnet-train --variant all"
        )
    runs = [
        read_run(path, epochs)
        for path in sorted(folder.iterdir())
        if path.is_dir() and _variant_of(path.name) is not None
    ]
    return sorted((run for run in runs if run is not None), key=lambda run: (VARIANTS.index(run.variant), run.name))


def _images(count: int | None) -> str:
    return UNKNOWN if count is None else f"{count:,}"


def results_table(runs: list[Run]) -> str:
    """A Markdown table: per run, the epochs it completed and the training images it used,
    its best and final test figures and median epoch time; a diverged or partial run says so,
    and a variant without any run is listed as not run.

    Args:
        runs: as :func:`read_runs` gives them.
    """
    lines = [
        "| run | epochs | training images | best test top-1 (%) | final test top-1 (%) | final test loss "
        "| median seconds / epoch | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant in VARIANTS:
        of_variant = [run for run in runs if run.variant == variant]
        if not of_variant:
            lines.append(f"| {variant} | 0 | | | | | | {NOT_RUN} |")
        for run in of_variant:
            note = run.status or ""
            images = "" if run.train_images is None and not run.history else _images(run.train_images)
            if not run.history:
                lines.append(f"| {run.name} | 0 |{f' {images} ' if images else ' '}| | | | | {note} |")
                continue
            final = run.history[-1]
            best = max(record["test_top1"] for record in run.history)
            seconds = statistics.median(record["seconds"] for record in run.history)
            lines.append(
                f"| {run.name} | {len(run.history)} | {images} | {best:.2f} | {final['test_top1']:.2f} | "
                f"{final['test_loss']:.4f} | {seconds:.1f} | {note} |"
            )
    return "\n".join(lines) + "\n"


def configuration_of(name: str) -> str:
    """A run's name without its seed: ``momentum-fused-clip5-seed2`` -> ``momentum-fused-clip5``."""
    return re.sub(r"-seed\d+$", "", name)


def _configurations(runs: list[Run], variant: str) -> dict[str, list[Run]]:
    """The runs of ``variant`` by configuration (see :func:`configuration_of`), in order."""
    configurations: dict[str, list[Run]] = {}
    for run in runs:
        if run.variant == variant:
            configurations.setdefault(configuration_of(run.name), []).append(run)
    return configurations


def _complete(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.status is None and run.history]


def _mean_and_range(values: list[float], digits: int) -> str:
    if not values:
        return ""
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _distinct(values: list[str]) -> str:
    """The values, each once, in order: ``50``, or ``2, 50`` where runs differ."""
    return ", ".join(dict.fromkeys(values))


def seeds_table(runs: list[Run]) -> str:
    """A Markdown table with one row per configuration (runs named alike but for their seed):
    the epochs and training images of its complete runs, how many runs completed and failed
    (diverged or collapsed), the mean and range over the complete runs of the best and final
    test top-1 and the final test loss, and the study's and the independent reproduction's
    figures beside; a variant without any run has a row of its own.

    Args:
        runs: as :func:`read_runs` gives them.
    """
    lines = [
        "| configuration | epochs | training images | runs | complete | failed | best test top-1 (%) "
        "| final test top-1 (%) | final test loss | study: top-1 (%) / loss | reproduction: best top-1 (%) |",
        "|---|---:|---:|---:|---:|---:|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        study = f"≈{STUDY[variant][0]} / ≈{STUDY[variant][1]}"
        configurations = _configurations(runs, variant)
        if not configurations:
            lines.append(f"| {variant} | | | 0 | | | | | | {study} | {REPRODUCTION[variant]} |")
        for configuration, members in configurations.items():
            complete = _complete(members)
            failed = sum(run.divergence is not None for run in members)
            epochs = _distinct([str(len(run.history)) for run in sorted(complete, key=lambda run: len(run.history))])
            images = _distinct([_images(run.train_images) for run in
                                sorted(complete, key=lambda run: (run.train_images is None, run.train_images or 0))])  # fmt: skip
            best = [max(record["test_top1"] for record in run.history) for run in complete]
            final = [run.history[-1]["test_top1"] for run in complete]
            loss = [run.history[-1]["test_loss"] for run in complete]
            lines.append(
                f"| {configuration} | {epochs} | {images} | {len(members)} | {len(complete)} | {failed} | "
                f"{_mean_and_range(best, 2)} | {_mean_and_range(final, 2)} | {_mean_and_range(loss, 3)} | {study} | "
                f"{REPRODUCTION[variant]} |"
            )
    return "\n".join(lines) + "\n"


def write_report(
    folder: str | Path, epochs: int | None = None, runs: list[Run] | None = None
) -> tuple[Path, Path]:
    """Writes ``results.md`` and ``test_accuracy.png`` into ``folder`` from the runs it holds.

    Args:
        folder: a folder of run folders (see :func:`read_runs`).
        epochs: the epochs every run was meant to reach (None: as each checkpoint says).
        runs: ``read_runs(folder, epochs)``, when the caller has read them already.

    Returns:
        The paths of the table and the plot.
    """
    folder = Path(folder)
    runs = read_runs(folder, epochs) if runs is None else runs
    table, plot = folder / RESULTS_FILE, folder / COMPARISON_PLOT
    atomic_write_text(
        table,
        results_table(runs)
        + "\n## Over seeds\n\nRuns named alike but for their `-seed<N>`, as one configuration; the figures "
        "are the mean (and range) over its complete runs, trained for the epochs and on the training images "
        f"stated (`{UNKNOWN}` where a run's files do not say; the study's figures beside are of 50 epochs on all "
        "50,000 images); "
        "a failed run diverged (a non-finite loss) or "
        "collapsed (one class for every test image, no gradient reaching the first layer). Beside them, "
        "the study's test top-1 and loss (read off its plots) and an independent reproduction's best test "
        "top-1.\n\n"
        + seeds_table(runs),
    )
    # One curve per configuration: a run alone, or the seeds' mean and range (complete runs
    # only, where there are any); the others' states in the legend.
    curves, notes = {}, {}
    for variant in VARIANTS:
        configurations = _configurations(runs, variant)
        if not configurations:
            notes[variant] = NOT_RUN
        for configuration, members in configurations.items():
            shown = _complete(members) or [run for run in members if run.history]
            if shown:
                curves[configuration] = [run.history for run in shown]
            remarks = [
                run.status if run.name == configuration else f"{run.name.removeprefix(configuration + '-')} {run.status}"
                for run in members if run.status
            ]  # fmt: skip
            if remarks:
                notes[configuration] = "; ".join(remarks)
    plot_test_accuracy(curves, plot, notes=notes)
    return table, plot


SEEDS_TABLE_MARKER = '<!-- generated: the "Over seeds" table of docs/results/results.md -->'
"""The line of a markdown page (``docs/study.md``) after which :func:`update_page` puts the table."""


def update_page(page: str | Path, runs: list[Run]) -> None:
    """Replaces the table that follows :data:`SEEDS_TABLE_MARKER` in the markdown file ``page``
    (e.g. ``docs/study.md``) with :func:`seeds_table` of ``runs``; the rest of the page is kept.

    Raises:
        ValueError: ``page`` has no such marker.
    """
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    if SEEDS_TABLE_MARKER not in text:
        raise ValueError(f"{page} has no line {SEEDS_TABLE_MARKER} to put the table after")
    before, after = text.split(SEEDS_TABLE_MARKER, 1)
    lines = after.lstrip("\n").splitlines(keepends=True)
    rest = "".join(lines[next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines)):])
    atomic_write_text(page, f"{before}{SEEDS_TABLE_MARKER}\n{seeds_table(runs)}{rest}")


@ends_quietly_on_a_closed_pipe
def main(argv: list[str] | None = None) -> int:
    """``python -m cifarnet.study.results DIR``: writes the table and plot of the runs in DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m cifarnet.study.results",
        description=f"Write {RESULTS_FILE} and {COMPARISON_PLOT} from the run folders in DIR "
                    "(<variant> or <variant>-<anything>, each with its metrics.jsonl).",
    )
    parser.add_argument("folder", type=Path, metavar="DIR", help="e.g. docs/results, or the --out of --variant all")
    parser.add_argument("--page", type=Path, metavar="PATH",
                        help="also put the table over seeds into the markdown page PATH (e.g. docs/study.md), "
                             "after its line " + SEEDS_TABLE_MARKER)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        runs = read_runs(args.folder)
        if not runs:
            raise ValueError(
                f"{args.folder} holds no run folders (<variant> or <variant>-<anything>, each with its {METRICS_FILE})"
            )
        table, plot = write_report(args.folder, runs=runs)
        if args.page is not None:
            update_page(args.page, runs)
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print(f"{table}, {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
