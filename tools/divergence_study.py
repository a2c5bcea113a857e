"""How often do the study's first epochs diverge? Short runs over seeds, fused and native ops.

    python tools/divergence_study.py --data-dir ../shared/cifar10-jpeg --seeds 0-7
    python tools/divergence_study.py --data-dir ../shared/cifar10-jpeg --seeds 0-7 --remedy warmup1

Trains `--epochs` epochs (default 2) of each variant x ops x seed with `cifarnet-train`, one run
at a time, each in its own folder under `--out` (default runs/divergence), and records the
outcome there (`outcome.json`: completed or diverged, at which epoch and batch, the epochs'
test top-1). Runs that already have an outcome are skipped, so an interrupted study continues
where it stopped; a run cut off mid-way starts again. After every run the summary table
(`--summary`, default docs/results/divergence.md, plus a .json beside it) is rewritten from
all outcomes found.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

# Off by default in cifarnet-train; the study's schedule is "none".
REMEDIES = {
    "none": [],
    "warmup1": ["--warmup-epochs", "1"],
    "clip5": ["--clip-grad-norm", "5"],
}
OUTCOME_FILE = "outcome.json"
# The trainer's one-line errors: a non-finite loss (at a batch, or in the test pass: batch None),
# and a collapse (one class for every test image, no gradient reaching the first layer).
DIVERGED_LINE = re.compile(r"epoch (\d+) (?:batch (\d+)|test pass): the (?:test )?loss is (\S+)")
COLLAPSED_LINE = re.compile(r"epoch (\d+) test pass: the model gives every test image the same class")


def seed_range(text: str) -> list[int]:
    """ "0-7" or "0,3,5" -> the seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def run_name(variant: str, ops: str, seed: int, remedy: str) -> str:
    return f"{variant}-{ops}-{remedy}-seed{seed}"


def train_one(args, variant: str, ops: str, seed: int, remedy: str) -> dict:
    """Trains one short run with cifarnet-train and returns its outcome."""
    out = args.out / run_name(variant, ops, seed, remedy)
    command = [
        sys.executable, "-m", "cifarnet.study.cli", "train",
        "--variant", variant, "--ops", ops, "--seed", str(seed), "--epochs", str(args.epochs),
        "--threads", str(args.threads), "--out", str(out), "--overwrite", "--no-progress",
        *(["--data-dir", str(args.data_dir)] if args.data_dir else []),
        *REMEDIES[remedy],
    ]
    finished = subprocess.run(command, capture_output=True, text=True)
    metrics = out / "metrics.jsonl"
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    outcome = {
        "variant": variant, "ops": ops, "seed": seed, "remedy": remedy, "epochs": args.epochs,
        "returncode": finished.returncode,
        "test_top1": [row["test_top1"] for row in epochs],
        "train_loss": [row["train_loss"] for row in epochs],
    }
    diverged, collapsed = DIVERGED_LINE.search(finished.stderr), COLLAPSED_LINE.search(finished.stderr)
    if diverged:
        batch = int(diverged[2]) if diverged[2] else None
        outcome.update(status="diverged", epoch=int(diverged[1]), batch=batch, loss=diverged[3])
    elif collapsed:
        outcome.update(status="collapsed", epoch=int(collapsed[1]))
    elif finished.returncode == 0:
        outcome["status"] = "completed"
    else:
        raise SystemExit(f"divergence_study: {out.name} failed (exit {finished.returncode}):\n{finished.stderr[-2000:]}")
    (out / OUTCOME_FILE).write_text(json.dumps(outcome, indent=2) + "\n")
    return outcome


CHANCE_TOP1 = 10.5  # ten classes: a run whose last test top-1 is at most this learnt nothing


def summarise(outcomes: list[dict]) -> str:
    """One row per variant x ops x remedy: seeds whose loss became non-finite, seeds that
    finished at chance (no NaN, but nothing learnt: dead units or saturated logits), and the
    last test top-1 of the others."""
    groups: dict[tuple, list[dict]] = {}
    for outcome in outcomes:
        groups.setdefault((outcome["variant"], outcome["ops"], outcome["remedy"], outcome["epochs"]), []).append(outcome)
    lines = [
        "| variant | ops | remedy | epochs | seeds run | non-finite loss: seeds (epoch, batch) | at chance: seeds | the others' last test top-1: median (range) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (variant, ops, remedy, epochs), group in sorted(groups.items()):
        group.sort(key=lambda outcome: outcome["seed"])
        diverged = [o for o in group if o["status"] == "diverged"]
        completed = [o for o in group if o["status"] == "completed" and o["test_top1"]]
        # A collapsed run stopped at chance; a completed one may have ended there too (dead units
        # that still let some gradient through, or saturated logits).
        at_chance = [o for o in group if o["status"] == "collapsed"]
        at_chance += [o for o in completed if o["test_top1"][-1] <= CHANCE_TOP1]
        at_chance.sort(key=lambda outcome: outcome["seed"])
        finals = sorted(o["test_top1"][-1] for o in completed if o["test_top1"][-1] > CHANCE_TOP1)
        where = ", ".join(f"{o['seed']} ({o['epoch']}, {'test pass' if o['batch'] is None else o['batch']})" for o in diverged)
        chance = ", ".join(str(o["seed"]) for o in at_chance)
        spread = f"{finals[len(finals) // 2]:.1f}% ({finals[0]:.1f}-{finals[-1]:.1f}%)" if finals else "-"
        lines.append(
            f"| {variant} | {ops} | {remedy} | {epochs} | {len(group)} | {len(diverged)}{': ' + where if where else ''} "
            f"| {len(at_chance)}{': ' + chance if chance else ''} | {spread} |"
        )
    return "\n".join(lines) + "\n"


def write_summary(args) -> None:
    outcomes = [json.loads(path.read_text()) for path in sorted(args.out.glob(f"*/{OUTCOME_FILE}"))]
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(
        "# Divergence in the first epochs (tools/divergence_study.py)\n\n" + summarise(outcomes)
    )
    args.summary.with_suffix(".json").write_text(json.dumps(outcomes, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="momentum,dropout")
    parser.add_argument("--ops", default="fused,native")
    parser.add_argument("--seeds", type=seed_range, default=seed_range("0-7"))
    parser.add_argument("--remedy", choices=REMEDIES, default="none")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/divergence"))
    parser.add_argument("--summary", type=Path, default=Path("docs/results/divergence.md"))
    args = parser.parse_args()
    for seed in args.seeds:  # seeds outermost: a partial study still covers every variant
        for variant in args.variants.split(","):
            for ops in args.ops.split(","):
                out = args.out / run_name(variant, ops, seed, args.remedy)
                if (out / OUTCOME_FILE).exists():
                    continue
                outcome = train_one(args, variant, ops, seed, args.remedy)
                print(f"{out.name}: {outcome['status']}"
                      + (f" at epoch {outcome['epoch']} batch {outcome['batch']}" if outcome["status"] == "diverged"
                         else f" at epoch {outcome['epoch']}" if outcome["status"] == "collapsed"
                         else f", test top-1 {outcome['test_top1']}"), flush=True)
                write_summary(args)
    write_summary(args)


if __name__ == "__main__":
    main()
