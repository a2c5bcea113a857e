"""Benchmarks of the fused ops against native PyTorch: the ``cifarnet-bench`` command.

For each layer of the study's ConvNet it times, in one interleaved run (so machine noise hits
every implementation alike), the op's implementations, forward and forward+backward (batch norm
in training mode), and counts the bytes autograd saves for the backward. Ratios are what to
read; absolute times are context.

The implementations (``IMPLEMENTATIONS``; ``--help`` lists them): on the CPU, native eager,
``torch.compile``d native and the fused op; on CUDA also native compiled with
``mode="max-autotune-no-cudagraphs"``, and native and the fused op each captured in a CUDA graph
(the timed call is the graph's replay: no host work, no launch overhead). Each is compared with
native eager, and the fastest fused one with the fastest native one (``fused_vs_best_native``);
with ``--memory-format both`` also over both layouts (``best_across_layouts`` in the JSON).

With ``--model`` it times a whole model instead, forward+backward in training mode, before and
after :func:`cifarnet.fuse` (and, for ``vgg11_bn``, its convolution stack ``features`` alone),
native also in the other layout, so the fused model is compared with native's faster layout.

    cifarnet-bench --batch-size 128 --threads 2 --json bench.json
    cifarnet-bench --device cuda --dtype bfloat16 --memory-format channels_last --batch-size 1024
    cifarnet-bench --model vgg11_bn --batch-size 128 --threads 2
    cifarnet-bench --model resnet50 --batch-size 8 --memory-format channels_last --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

import cifarnet
from cifarnet._closed_pipe import ends_quietly_on_a_closed_pipe
from cifarnet._cpu import describe_cpu, thread_count_problem
from cifarnet._timing import MEMORY_FORMATS, keep_freed_memory
from cifarnet.benchmark_models import MODEL_INPUT_SIZES, benchmark_model, format_model_table, input_size_problem
from cifarnet.benchmark_ops import (
    GRAPH_WARMUP,
    IMPLEMENTATIONS,
    OPS,
    STUDY_LAYERS,
    benchmark_layer,
    check_implementations,
    device_implementations,
    stack_saved_bytes,
)
from cifarnet.benchmark_report import best_across_layouts, format_table, plot_speedups, summarise
from cifarnet.study.fileio import output_file_problem


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    implementations = "\n".join(
        f"  {name:<18} {spec.description}{' (CUDA only)' if spec.cuda_only else ''}" for name, spec in IMPLEMENTATIONS.items()
    )
    parser = argparse.ArgumentParser(
        prog="cifarnet-bench", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"implementations (the per-op tables' columns; on the CPU by default native, compiled, fused; on CUDA "
        f"all):\n{implementations}\nA CUDA graph captures one call after {GRAPH_WARMUP} warm-up calls on a side stream; "
        "forward+backward captures the fresh leaves, the forward and the backward with a fixed output gradient.",
    )
    parser.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op to benchmark (default: all)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "float16", "bfloat16"), default="float32",
        help="float16/bfloat16: on the CPU, float32 tensors under torch.autocast in that dtype (how one "
        "trains in low precision there); on CUDA, tensors in that dtype. float32 on CUDA: torch's TF32 settings, "
        "which the header states",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--memory-format", choices=[*MEMORY_FORMATS, "both"], default="contiguous", help="layout of the inputs"
    )
    parser.add_argument(
        "--model",
        choices=list(MODEL_INPUT_SIZES),
        help="time this whole model before and after cifarnet.fuse instead of the per-op tables "
        "(in --memory-format contiguous or channels_last; --op, --no-compile, --implementations and --plot do not apply)",
    )
    parser.add_argument(
        "--input-size", type=int, metavar="PIXELS",
        help=f"with --model: the side of its square inputs (default per model: "
        f"{', '.join(f'{name} {size}' for name, size in MODEL_INPUT_SIZES.items())})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per implementation, median reported (default: 20; 5 with --model)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3; 1 with --model)")
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out the torch.compile'd native implementations (compiled, compiled_autotune)"
    )
    parser.add_argument(
        "--implementations", metavar="NAMES",
        help="comma-separated implementations to time (below; native and fused always among them; default: all the "
        "device runs, less the compiled ones with --no-compile)",
    )
    parser.add_argument(
        "--malloc-trim",
        action="store_true",
        help="leave glibc's malloc returning freed memory to the system, as it does by default (timings "
        "then include page faults on fresh tensors, which land on one variant or another)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="PATH.png", help="also draw the speedups as a PNG")
    args = parser.parse_args(argv)
    # A whole model takes seconds per call at batch 128: fewer calls still give a steady median.
    if args.repeats is None:
        args.repeats = 5 if args.model else 20
    if args.warmup is None:
        args.warmup = 1 if args.model else 3
    if args.model and args.plot:
        parser.error("--plot draws the per-op speedups; it does not apply with --model")
    if args.model and args.memory_format == "both":
        parser.error("--model times one layout per run: --memory-format contiguous or channels_last")
    if args.input_size is not None and not args.model:
        parser.error("--input-size sizes the inputs of --model; the per-op tables use the study's layer shapes")
    if args.input_size is not None and args.input_size < 1:
        parser.error(f"--input-size must be positive, got {args.input_size}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    if args.threads is not None and (problem := thread_count_problem(args.threads)):
        parser.error(f"--threads: {problem}")
    if args.repeats < 1:
        parser.error(f"--repeats must be positive, got {args.repeats}")
    if args.warmup < 0:
        parser.error(f"--warmup must not be negative, got {args.warmup}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: cifarnet-bench times the CPU and CUDA kernels; expected cpu or cuda[:N]")
    if args.model:
        size = args.input_size or MODEL_INPUT_SIZES[args.model]
        problem = input_size_problem(args.model, size, args.batch_size)
        if problem:
            parser.error(f"--input-size {size}: {args.model} cannot take {size}x{size} inputs ({problem})")
    if args.implementations is None:
        args.implementations = device_implementations(device, compile=not args.no_compile)
    else:
        try:
            names = check_implementations(args.implementations.split(","), device)
        except ValueError as error:
            parser.error(f"--implementations {args.implementations}: {error}")
        args.implementations = [name for name in names if not (args.no_compile and IMPLEMENTATIONS[name].compiled)]
    # Checked now, not after minutes of timing; missing folders are created when writing.
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        problem = output_file_problem(path) if path is not None else None
        if problem:
            parser.error(f"{option} {path}: {problem}")
    if args.plot is not None and Path(args.plot).suffix.lower() != ".png":
        parser.error(f"--plot {args.plot}: expected a .png file")
    return args


def _make_parent(path: str) -> str:
    """Creates the folders ``path`` is to go in, and returns it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return path


def allocator_note(args: argparse.Namespace) -> str:
    return "; malloc keeps freed memory" if args.keeps_freed_memory else ""


def tf32_settings() -> dict[str, bool]:
    """torch's TF32 switches, which float32 convolutions (cuDNN) and matrix products on CUDA
    follow, the same for every implementation; cifarnet-bench leaves them as torch sets them
    (by default: cuDNN's on, matmul's off)."""
    return {
        "torch.backends.cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "torch.backends.cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def precision_note(dtype_name: str, autocast_dtype: torch.dtype | None, device: torch.device | None = None) -> str:
    """The precision as the header states it: CPU autocast where used; on CUDA in float32, the
    TF32 settings the convolutions run under."""
    if autocast_dtype is not None:
        return f"{dtype_name} (torch.autocast on float32 tensors)"
    if device is not None and device.type == "cuda" and dtype_name == "float32":
        return f"float32 ({', '.join(f'{name}={value}' for name, value in tf32_settings().items())})"
    return dtype_name


def gpu_info(device: torch.device) -> dict | None:
    """The GPU the figures were measured on, with cuDNN's version and the TF32 settings; None on
    the CPU."""
    if device.type != "cuda":
        return None
    return {"name": torch.cuda.get_device_name(device), "cudnn": torch.backends.cudnn.version(), **tf32_settings()}


def machine_line(device: torch.device) -> str:
    """What the figures were measured on: the CPU (model, instruction sets, cache) or the GPU
    (with cuDNN's version)."""
    if device.type == "cuda":
        gpu = gpu_info(device)
        return f"GPU: {gpu['name']}, cuDNN {gpu['cudnn']}; CPU: {describe_cpu()}"
    return f"CPU: {describe_cpu()}"


class _NoCudaRuntimeNote(logging.Filter):
    """Drops torch's "No CUDA runtime is found, using CUDA_HOME=..." record."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def _import_cpp_extension_quietly() -> None:
    """Imports ``torch.utils.cpp_extension`` without its note about CUDA_HOME.

    NB: torch.compile's CPU backend (inductor) imports ``torch.utils.cpp_extension`` for torch's
    include paths, and that import logs "No CUDA runtime is found, using CUDA_HOME=..." wherever
    a CUDA build of torch sees no GPU but finds a toolkit (an ``nvcc`` on ``PATH`` will do). The
    note concerns building CUDA extensions; the compiled native variant needs none, and neither
    does cifarnet at run time. So the module is imported here first, with that one record
    filtered out (tests/test_benchmark.py fails if torch words it otherwise)."""
    if "torch.utils.cpp_extension" in sys.modules:
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    note = _NoCudaRuntimeNote()
    logger.addFilter(note)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.removeFilter(note)


@ends_quietly_on_a_closed_pipe
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.keeps_freed_memory = not args.malloc_trim and keep_freed_memory()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cifarnet-bench: --device cuda asked for, but no GPU is visible", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    # On the CPU a low precision is used through autocast: parameters stay float32.
    autocast_dtype = dtype if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu" else None
    if autocast_dtype is not None:
        dtype = torch.float32
    if args.model:
        return main_model(args, device, dtype, autocast_dtype)
    implementations = args.implementations
    if any(IMPLEMENTATIONS[name].compiled for name in implementations):
        _import_cpp_extension_quietly()
    formats = list(MEMORY_FORMATS) if args.memory_format == "both" else [args.memory_format]
    selected = list(OPS.values()) if args.op == "all" else [OPS[args.op]]

    print(
        f"cifarnet-bench: {precision_note(args.dtype, autocast_dtype, device)}, batch {args.batch_size}, {torch.get_num_threads()} thread(s), "
        f"device {device}; median of {args.repeats} interleaved runs; batch norm in training mode{allocator_note(args)}"
    )
    print(machine_line(device))
    results = []
    progress = tqdm(total=len(selected) * len(formats) * len(STUDY_LAYERS), desc="benchmarking", leave=False)
    for op in selected:
        for format_name in formats:
            memory_format = MEMORY_FORMATS[format_name]
            rows = []
            for layer in STUDY_LAYERS:
                rows.append(benchmark_layer(op, layer, args.batch_size, dtype, device, memory_format, implementations, args.warmup, args.repeats, autocast_dtype))
                progress.update()
            total = summarise(rows, implementations)
            result = {"op": op.name, "memory_format": format_name, "implementations": implementations, "layers": rows, "total": total}
            if op.conv:
                result["stack_saved_bytes"] = stack_saved_bytes(op, args.batch_size, dtype, device, memory_format, autocast_dtype)
            results.append(result)
            progress.clear()
            print(f"\n{op.name}, {format_name}:")
            print(format_table(rows, total, implementations))
            if op.conv:
                stack = result["stack_saved_bytes"]
                print(
                    f"Saved for backward by the three-layer stack: native {stack['native'] / 2**20:.1f} MiB, "
                    f"fused {stack['fused'] / 2**20:.1f} MiB ({stack['fused'] / stack['native']:.3f}x)."
                )
    progress.close()
    across_layouts = best_across_layouts(results)
    for op_name, modes in across_layouts.items():
        best = modes["forward_backward"]
        print(
            f"\n{op_name}, both layouts, forward+backward: fastest native {best['native'][1]} ({best['native'][0]}) "
            f"{best['native'][2]:.2f} ms, fastest fused {best['fused'][1]} ({best['fused'][0]}) {best['fused'][2]:.2f} ms: "
            f"{best['fused_vs_best_native']:.2f}x"
        )
    if args.json:  # first: the figures matter more than their picture
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cifarnet": cifarnet.__version__,
            "build": {k: v for k, v in cifarnet.build_info().items() if k != "parallel"},
            "gpu": gpu_info(device),
            "config": vars(args) | {"threads": torch.get_num_threads()},
            "implementations": {name: IMPLEMENTATIONS[name].description for name in implementations},
            "results": results,
        }
        if across_layouts:
            report["best_across_layouts"] = across_layouts
        with open(_make_parent(args.json), "w") as file:
            json.dump(report, file, indent=2)
    if args.plot:
        plot_speedups(results, _make_parent(args.plot))
    return 0


def main_model(args: argparse.Namespace, device: torch.device, dtype, autocast_dtype: torch.dtype | None) -> int:
    """``cifarnet-bench --model``: one model before and after ``cifarnet.fuse``."""
    print(
        f"cifarnet-bench --model {args.model}: {precision_note(args.dtype, autocast_dtype, device)}, {args.memory_format}, batch {args.batch_size}, {torch.get_num_threads()} "
        f"thread(s), device {device}; forward+backward in training mode, median of {args.repeats} interleaved runs"
        f"{allocator_note(args)}"
    )
    print(machine_line(device))
    rows = benchmark_model(args.model, args.batch_size, dtype, device, args.warmup, args.repeats, autocast_dtype,
                           MEMORY_FORMATS[args.memory_format], args.input_size)
    print(format_model_table(rows))
    if args.json:
        report = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "cifarnet": cifarnet.__version__,
            "build": {k: v for k, v in cifarnet.build_info().items() if k != "parallel"},
            "gpu": gpu_info(device),
            "config": vars(args) | {"threads": torch.get_num_threads()},
            "model": args.model,
            "results": rows,
        }
        with open(_make_parent(args.json), "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
