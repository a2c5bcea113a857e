"""Latency of one small gloo collective after a stretch of computation, as synchronized batch
norm meets it: every process is released by a barrier, computes for a while on one thread,
then all-gathers 3 x 64 float64 values (one layer's count, mean and M2).

    torchrun --standalone --nproc-per-node 2 benchmarks/collective_latency.py --rounds 60

Prints, for each amount of computation before the collective (0 ms: back to back) and each way
of waiting (blocking in ``wait()``, or spinning on ``is_completed()``), the median and 10th
percentile of the collective's time on every process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def compute(milliseconds: float, matrix: torch.Tensor) -> None:
    begin = time.perf_counter()
    while time.perf_counter() - begin < milliseconds * 1e-3:
        matrix @ matrix


def all_gather(values: torch.Tensor, gathered: list[torch.Tensor], spin: bool) -> None:
    if not spin:
        dist.all_gather(gathered, values)
        return
    work = dist.all_gather(gathered, values, async_op=True)
    while not work.is_completed():
        pass
    work.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--work-ms", default="0,3,10", help="computation before each collective, comma-separated")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    values = torch.zeros(3, 64, dtype=torch.float64)
    gathered = [torch.empty_like(values) for _ in range(world)]
    matrix = torch.randn(200, 200)
    if rank == 0:
        print(f"{world} processes, gloo, all_gather of {values.numel()} float64; median / p10 in microseconds per process")
    for spin in (False, True):
        for milliseconds in (float(m) for m in args.work_ms.split(",")):
            times = []
            for _ in range(args.rounds):
                dist.barrier()
                compute(milliseconds, matrix)
                begin = time.perf_counter()
                all_gather(values, gathered, spin)
                times.append(time.perf_counter() - begin)
            times.sort()
            mine = torch.tensor([statistics.median(times), times[len(times) // 10]])
            everyone = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(everyone, mine)
            if rank == 0:
                cells = "  ".join(f"rank {r}: {t[0] * 1e6:5.0f} / {t[1] * 1e6:5.0f}" for r, t in enumerate(everyone))
                print(f"{'spin' if spin else 'wait'}  after {milliseconds:4.1f} ms of work   {cells}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
