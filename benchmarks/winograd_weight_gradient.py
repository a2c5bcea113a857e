"""The Winograd weight gradient alone, at the layers whose thread plan depends on the cache and
the thread count, in this build or against another build in alternating fresh processes.

    python benchmarks/winograd_weight_gradient.py --threads 2
    python benchmarks/winograd_weight_gradient.py --threads 2 --against /tmp/old --rounds 8

The backward of conv -> batch norm -> ReLU -> max pool is split into phase ops (those
synchronized batch norm uses); statistics, argmax and the reduced sums are computed once and
only the phase that convolves is timed, with only the weight gradient asked for, under
CIFARNET_CONV_ALGORITHM=winograd. ``--against DIR``: DIR holds another build's ``cifarnet``
package (its Python files and ``_C`` library); each round runs one process per build, in
alternating order, each printing the median of ``--calls`` calls per layer, and the table gives
each build's minimum and median over the rounds. Noisy machines need many rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from cifarnet._timing import Stopwatch, interleaved_medians

# name, batch, in channels, out channels, kernel, input side, convolution padding
LAYERS = (
    ("128->128 3x3, 16x16", 32, 128, 128, 3, 16, 1),
    ("study conv3 64->64 5x5, 8x8", 32, 64, 64, 5, 8, 2),
    ("study conv3, batch 128", 128, 64, 64, 5, 8, 2),
    ("64->64 3x3, 56x56", 8, 64, 64, 3, 56, 1),
)


def weight_gradient_call(batch: int, in_channels: int, out_channels: int, kernel: int, side: int, padding: int):
    """The phase op that convolves, asked for the weight gradient only, on fixed random data."""
    from cifarnet import _C  # noqa: F401  (defines the ops)

    ops = torch.ops.cifarnet
    generator = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    input = torch.randn(batch, in_channels, side, side, generator=generator).contiguous(memory_format=cl)
    weight = torch.randn(out_channels, in_channels, kernel, kernel, generator=generator)
    grad_output = torch.randn(batch, out_channels, side // 2, side // 2, generator=generator).contiguous(memory_format=cl)
    geometry = ([1, 1], [padding, padding], [2, 2], [2, 2], False, [0, 0])
    conv_output, mean, var = ops._conv2d_batch_norm_relu_max_pool2d_stats(input, weight, None, *geometry)
    _, argmax = ops._conv2d_batch_norm_relu_max_pool2d_epilogue(input, weight, conv_output, mean, var, None, None, 1e-5, *geometry)
    sums = ops._conv2d_batch_norm_relu_max_pool2d_backward_reduce(grad_output, input, weight, conv_output, mean, argmax, *geometry)
    count = batch * side * side
    return lambda: ops._conv2d_batch_norm_relu_max_pool2d_backward_elementwise(
        grad_output, input, weight, conv_output, mean, var, None, argmax, *sums, count, 1e-5, *geometry, [False, True, False]
    )  # fmt: skip


def worker(threads: int, calls: int) -> None:
    os.environ["CIFARNET_CONV_ALGORITHM"] = "winograd"
    torch.set_num_threads(threads)
    stopwatch = Stopwatch(torch.device("cpu"))
    medians = {name: interleaved_medians({name: weight_gradient_call(*shape)}, stopwatch, 3, calls)[name] for name, *shape in LAYERS}
    print(json.dumps(medians))


def run_worker(threads: int, calls: int, package_dir: str | None) -> dict:
    env = dict(os.environ)
    if package_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_dir, env.get("PYTHONPATH")]))
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--calls", str(calls)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--calls", type=int, default=40, help="calls per layer and process (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4, help="processes per build (default: %(default)s)")
    parser.add_argument("--against", metavar="DIR", help="a folder holding another build's cifarnet package")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.threads, args.calls)
        return
    from cifarnet._cpu import describe_cpu

    builds = {"this build": None, **({f"--against {args.against}": os.path.abspath(args.against)} if args.against else {})}
    results: dict[str, list[dict]] = {name: [] for name in builds}
    names = list(builds)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(run_worker(args.threads, args.calls, builds[name]))
    print(f"CPU: {describe_cpu()}; {args.threads} threads; min / median ms over {args.rounds} processes, "
          f"each the median of {args.calls} calls")  # fmt: skip
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for layer, *_ in LAYERS:
        cells = []
        for name in names:
            values = [result[layer] for result in results[name]]
            cells.append(f"{min(values):.2f} / {statistics.median(values):.2f}")
        print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
