"""Training throughput of several processes on one machine against one process using all cores.

    python benchmarks/distributed_throughput.py --data-dir ../shared/cifar10-jpeg --rounds 3 --json dist.json

Runs `cifarnet-train` for one epoch on `--limit-train` images in three setups, in turn, for
`--rounds` rounds (so a noisy machine's drifts fall on all three alike):

  one        python -m cifarnet.study train --threads CORES            (one process, every core)
  sync       torchrun --nproc-per-node P -m cifarnet.study train       (P processes, synchronized batch norm)
  no-sync    the same with --no-sync-bn                          (each process's own batch statistics)

and reads each epoch's training images/s from the trainer's epoch line (the training pass
alone: no test pass, no start-up). Prints every round, the medians and each setup's median
over the one-process median. The trainer's own defaults apply otherwise (the processes share
the cores: CORES / P threads each).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import cifarnet

RATE = re.compile(r"\((\d+) training images/s\)")


def setups(processes: int, cores: int) -> dict[str, list[str]]:
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc-per-node={processes}"]
    return {
        "one": [sys.executable, "-m", "cifarnet.study", "train", "--threads", str(cores)],
        "sync": [*torchrun, "-m", "cifarnet.study", "train"],
        "no-sync": [*torchrun, "-m", "cifarnet.study", "train", "--no-sync-bn"],
    }


def images_per_second(command: list[str], out: Path) -> float:
    """Runs one epoch of ``command`` into ``out``; its training pass's images/s."""
    finished = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True)
    rates = RATE.findall(finished.stdout)
    if finished.returncode != 0 or not rates:
        raise SystemExit(f"{' '.join(command)} failed (exit {finished.returncode}):\n{finished.stderr[-2000:]}")
    return float(rates[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--ops", default="fused", choices=["fused", "native"])
    parser.add_argument("--limit-train", type=int, default=10240)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    common = ["--variant", args.variant, "--ops", args.ops, "--data-dir", args.data_dir,
              "--limit-train", str(args.limit_train), "--epochs", "1", "--overwrite"]  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in setups(args.processes, cores)}
    cpu = cifarnet.build_info()["cpu"]
    print(f"{args.variant} ({args.ops} ops), {args.limit_train} training images, one epoch per run; "
          f"{cpu['model']}, {cores} cores; {args.processes} processes against one")  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        for round_index in range(1, args.rounds + 1):
            for name, command in setups(args.processes, cores).items():
                rates[name].append(images_per_second([*command, *common], Path(scratch) / name))
                print(f"round {round_index}: {name:8s} {rates[name][-1]:7.0f} training images/s", flush=True)
    reference = statistics.median(rates["one"])
    print(f"\n| setup | training images/s ({args.rounds} runs) | median | vs one process |\n|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {' / '.join(f'{v:.0f}' for v in values)} | {median:.0f} | {median / reference:.2f}× |")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": vars(args), "cpu": cpu, "cores": cores, "images_per_second": rates}, file, indent=2)


if __name__ == "__main__":
    main()
