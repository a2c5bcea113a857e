"""Time whole training steps of the study's ConvNet: fused ops against every native setup.

    python benchmarks/train_steps.py --device cpu --rounds 8 --steps 10 --json steps.json

Synthetic CIFAR-sized batches (28x28 crops, batch 128) and the study's optimiser (SGD with
momentum, made as cifarnet-train makes it), so the network's forward, backward and update are
timed, nothing else. Each configuration below is one model (all start from the same weights); the configurations take
turns, `--steps` steps each per round, so drifts of a noisy machine fall on all of them alike.
Prints each configuration's median step time and the fused ones' speedups over the fastest
native one measured in the same run.

`--profile NAME` instead runs NAME's steps under torch.profiler and prints where one step's
time goes: every top-level call of the forward, the backward (one autograd node each) and the
optimiser, in milliseconds per step, grouped by phase.

`--isa-caps` runs the whole table once per CPU class this CPU can stand in for, each in a fresh
process with the instruction set capped (ONEDNN_MAX_CPU_ISA for oneDNN, CIFARNET_CPU_ISA for
cifarnet's loops): AMX, AVX512-BF16 without AMX, AVX2 only. A cap emulates the instructions,
not the caches or the clock of another CPU.

`--load busy` or `--load torch` times the steps while another process keeps one core busy: a
Python busy loop, or a second PyTorch process training the study's ConvNet on one thread.

Configurations (`--configs`, comma-separated; default: all but the compiled ones with
--no-compile, and the CUDA-only ones on the CPU):
  native-fp32, native-fp32-cl, native-fp32-compile     float32, contiguous / channels-last / torch.compile
  native-bf16-cl, native-bf16-cl-compile               torch.autocast bfloat16, channels-last (eager / compiled)
  fused-fp32, fused-fp32-cl, fused-bf16, fused-bf16-cl cifarnet's ops, float32 or bfloat16 autocast
  floor-fp32, floor-fp32-cl, floor-bf16, floor-bf16-cl the step's floor (below), contiguous / channels-last
CUDA only:
  native-{fp32,bf16}-cl-autotune                       torch.compile(mode="max-autotune-no-cudagraphs")
  native-{fp32,bf16}-cl-graph, fused-{fp32,bf16}-cl-graph
                                                       the step replayed from CUDA graphs, as cifarnet-train
                                                       runs it (cifarnet.study.train.cuda_graph)
On CUDA each configuration's steps of a round are timed together with CUDA events (the host
queues them without waiting), and the report states torch's TF32 settings, which float32
convolutions and matrix products follow.
Only with --configs (what cifarnet's dropout changes, against the same steps with torch's):
  fused-fp32-cl-torch-dropout, fused-bf16-cl-torch-dropout   the fused model with nn.Dropout

The floor of a step is what no fusion removes: the three convolutions alone, forward and
backward (native, on inputs of the sizes the network gives them), plus the layers cifarnet does
not fuse (fc4, its ReLU, fc5, the loss) and the optimiser. The fused steps are reported as a
multiple of the faster floor measured in their precision (either layout: the fastest native
way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import cifarnet
from cifarnet.study.models import ConvNet
from cifarnet.study.train import TrainConfig, make_optimizer
from cifarnet.study.train.cuda_graph import GraphedTrainingStep


@dataclass(frozen=True)
class Config:
    ops: str  # "native", "fused" or "floor" (the convolutions and the unfused layers alone)
    bfloat16: bool
    channels_last: bool
    compiled: bool = False
    torch_dropout: bool = False  # the fused model with nn.Dropout instead of cifarnet.nn.Dropout
    default: bool = True  # in the default set of --configs
    compile_mode: str | None = None  # torch.compile's mode (None: its default)
    graph: bool = False  # the step replayed from CUDA graphs
    cuda_only: bool = False


CONFIGS = {
    "native-fp32": Config("native", False, False),
    "native-fp32-cl": Config("native", False, True),
    "native-fp32-compile": Config("native", False, True, compiled=True),
    "native-bf16-cl": Config("native", True, True),
    "native-bf16-cl-compile": Config("native", True, True, compiled=True),
    "fused-fp32": Config("fused", False, False),
    "fused-fp32-cl": Config("fused", False, True),
    "fused-bf16": Config("fused", True, False),
    "fused-bf16-cl": Config("fused", True, True),
    "floor-fp32": Config("floor", False, False),
    "floor-fp32-cl": Config("floor", False, True),
    "floor-bf16": Config("floor", True, False),
    "floor-bf16-cl": Config("floor", True, True),
    "fused-fp32-cl-torch-dropout": Config("fused", False, True, torch_dropout=True, default=False),
    "fused-bf16-cl-torch-dropout": Config("fused", True, True, torch_dropout=True, default=False),
    "native-fp32-cl-autotune": Config("native", False, True, compiled=True, compile_mode="max-autotune-no-cudagraphs", cuda_only=True),
    "native-bf16-cl-autotune": Config("native", True, True, compiled=True, compile_mode="max-autotune-no-cudagraphs", cuda_only=True),
    "native-fp32-cl-graph": Config("native", False, True, graph=True, cuda_only=True),
    "native-bf16-cl-graph": Config("native", True, True, graph=True, cuda_only=True),
    "fused-fp32-cl-graph": Config("fused", False, True, graph=True, cuda_only=True),
    "fused-bf16-cl-graph": Config("fused", True, True, graph=True, cuda_only=True),
}


class Trainer:
    """One configuration's model, optimiser and batches; `run(n)` times n training steps."""

    def __init__(self, config: Config, variant: str, batches, device: torch.device):
        torch.manual_seed(0)
        model = ConvNet(variant, "native" if config.ops == "floor" else config.ops).to(device).train()
        if config.torch_dropout and isinstance(model.dropout, nn.Dropout):
            model.dropout = nn.Dropout(model.dropout.p)
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=memory_format)
        self.step_fn = torch.compile(self.model, mode=config.compile_mode) if config.compiled else self.model
        # cifarnet-train's optimiser (fused SGD where the device has it), for every configuration
        self.optimizer, _ = make_optimizer(self.model, TrainConfig(variant=variant, lr=0.01))
        self.criterion = nn.CrossEntropyLoss()
        self.batches = [(x.contiguous(memory_format=memory_format), y) for x, y in batches]
        self.autocast_dtype = torch.bfloat16 if config.bfloat16 else None
        self.device = device
        self.next = 0
        self.floor = None
        if config.ops == "floor":
            self.floor = FloorInputs(self.model, self.batches[0][0], self.autocast_dtype)
        self.graphed = None
        if config.graph:
            # Held open for the trainer's life: its learning rates stay device tensors.
            self.graphed = GraphedTrainingStep(self.model, self.criterion, self.optimizer, autocast_dtype=self.autocast_dtype)
            self.graphed.__enter__()

    def step(self) -> None:
        images, labels = self.batches[self.next % len(self.batches)]
        self.next += 1
        if self.graphed is not None:
            self.graphed.forward_backward(images, labels)
            self.graphed.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.floor is not None:
                roots, grads = self.floor.forward(self.model, images, labels, self.criterion)
            else:
                roots, grads = [self.criterion(self.step_fn(images), labels)], [None]
        with torch.profiler.record_function("backward"):
            torch.autograd.backward(roots, grads)
        self.optimizer.step()

    def run(self, steps: int) -> list[float]:
        """Times `steps` steps: each on the CPU; on CUDA, all of them between two events (one
        figure, their mean), so the host queues them as a training loop does."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                self.step()
            end.record()
            end.synchronize()
            return [start.elapsed_time(end) / steps]
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            self.step()
            times.append((time.perf_counter() - begin) * 1e3)
        return times


class FloorInputs:
    """What the floor's step computes on: each convolution's input at the size, layout and dtype
    the network gives it (the image, then the pooled outputs; in the autocast dtype under
    autocast, so the floor casts no more than the network does), the input of fc4, and
    gradients for the convolutions' outputs; the inputs after the first ask for a gradient, as
    in the network."""

    def __init__(self, model: ConvNet, images: Tensor, autocast_dtype: torch.dtype | None):
        autocast = torch.autocast(images.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        with torch.no_grad(), autocast:
            self.conv_inputs = [images]
            for conv, pool in ((model.conv1, model.pool1), (model.conv2, model.pool2)):
                self.conv_inputs.append(pool(conv(self.conv_inputs[-1])).requires_grad_())
            self.conv_grads = [torch.randn_like(conv(x)) for conv, x in zip((model.conv1, model.conv2, model.conv3), self.conv_inputs)]
            self.fc_input = torch.flatten(model.pool3(model.conv3(self.conv_inputs[-1])), 1).contiguous().requires_grad_()

    def forward(self, model: ConvNet, images: Tensor, labels: Tensor, criterion) -> tuple[list[Tensor], list]:
        """The roots of the floor's backward and their gradients: the three convolution
        outputs, and the loss of the unfused head."""
        convs = (model.conv1, model.conv2, model.conv3)
        outputs = [conv(x) for conv, x in zip(convs, [images, *self.conv_inputs[1:]])]
        logits = model.fc5(torch.relu(model.fc4(self.fc_input)))
        return [*outputs, criterion(logits, labels)], [*self.conv_grads, None]


def _phase(name: str) -> str:
    if name.startswith("autograd::engine::evaluate_function") or name == "backward":
        return "backward"
    if name.startswith("Optimizer."):
        return "optimizer"
    return "forward"


def profile(trainer: Trainer, steps: int) -> None:
    """Prints the top-level calls of `steps` training steps, in ms per step, by phase.

    Each autograd node and each optimiser call is its own top-level event; the forward's are
    the ops the model and the loss call (their own children, e.g. a cast inside a convolution,
    count towards them).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step()
    totals: dict[tuple[str, str], float] = {}

    def visit(event) -> None:
        if event.name == "backward":  # our marker: its children are the autograd nodes
            for child in event.cpu_children:
                visit(child)
            return
        key = (_phase(event.name), event.name)
        totals[key] = totals.get(key, 0.0) + event.cpu_time_total / 1e3 / steps

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    by_phase: dict[str, float] = {}
    for (phase, _), ms in totals.items():
        by_phase[phase] = by_phase.get(phase, 0.0) + ms
    step_ms = sum(by_phase.values())
    print(f"profile: {steps} steps; {step_ms:.2f} ms per step in top-level calls")
    for phase in ("forward", "backward", "optimizer"):
        print(f"{phase:<10} {by_phase.get(phase, 0.0):8.2f} ms  {100 * by_phase.get(phase, 0.0) / step_ms:5.1f}%")
        rows = sorted(((ms, name) for (p, name), ms in totals.items() if p == phase), reverse=True)
        for ms, name in rows:
            if ms >= 0.005 * step_ms:
                print(f"    {ms:8.2f} ms  {100 * ms / step_ms:5.1f}%  {name}")


def parse_configs(text: str | None, no_compile: bool, device: torch.device) -> list[str]:
    if text is None:
        return [
            name for name, config in CONFIGS.items()
            if config.default and not (no_compile and config.compiled) and (device.type == "cuda" or not config.cuda_only)
        ]
    names = text.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        raise SystemExit(f"train_steps: unknown --configs {unknown}; expected some of {list(CONFIGS)}")
    cuda_only = [name for name in names if CONFIGS[name].cuda_only and device.type != "cuda"]
    if cuda_only:
        raise SystemExit(f"train_steps: --configs {cuda_only} need --device cuda")
    return names


# The CPU classes --isa-caps stands in for: (name, the cpuinfo flag the CPU needs, environment).
# Every library's own cap: oneDNN's convolutions, cifarnet's loops, ATen's kernels (batch norm,
# pooling, the loss, the optimiser) and the code torch.compile generates (ATEN_CPU_CAPABILITY),
# MKL's matrix products; uncapped, native's non-convolution work would run AVX-512 in the AVX2
# class while cifarnet's loops ran AVX2.
ISA_CAPS = [
    ("AMX", "amx_bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}),
    ("AVX512-BF16, no AMX", "avx512_bf16", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "CIFARNET_CPU_ISA": "avx512"}),
    ("AVX2 only", "avx2", {
        "ONEDNN_MAX_CPU_ISA": "AVX2", "CIFARNET_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }),
]
CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "CIFARNET_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")

# What --load runs beside the timed steps, on one core. Each prints "ready" once it loads the
# core (the torch one after its first step: importing torch takes seconds) and ends when its
# parent does (a benchmark killed by a signal must not leave a core busy).
_LOAD_PROLOGUE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the parent\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(1)  # the parent died before prctl\n"
)
LOADS = {
    "busy": _LOAD_PROLOGUE + "print('ready', flush=True)\nwhile True: pass\n",
    "torch": _LOAD_PROLOGUE + (
        "import torch\n"
        "from cifarnet.study.models import ConvNet\n"
        "torch.set_num_threads(1)\n"
        "model = ConvNet('full', 'native').train()\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.01)\n"
        "images, labels = torch.randn(32, 3, 28, 28), torch.randint(0, 10, (32,))\n"
        "ready = False\n"
        "while True:\n"
        "    optimizer.zero_grad()\n"
        "    torch.nn.functional.cross_entropy(model(images), labels).backward()\n"
        "    optimizer.step()\n"
        "    if not ready:\n"
        "        print('ready', flush=True)\n"
        "        ready = True\n"
    ),
}


def cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    return set()


def run_under_isa_caps(argv: list[str], json_path: str | None) -> None:
    """Runs this script once per CPU class the CPU can stand in for, and prints every table."""
    flags = cpu_flags()
    caps = [(name, env) for name, flag, env in ISA_CAPS if flag in flags]
    if not caps:
        raise SystemExit("train_steps: --isa-caps needs an x86-64 CPU with at least AVX2")
    forwarded = [a for a in argv if a != "--isa-caps"]
    if "--json" in forwarded:  # each run writes its own file; this one writes them all
        at = forwarded.index("--json")
        del forwarded[at : at + 2]
    combined, failed = {}, []
    with tempfile.TemporaryDirectory() as folder:
        for name, env in caps:
            path = os.path.join(folder, "run.json")
            caps_env = {k: v for k, v in os.environ.items() if k not in CAP_VARIABLES}
            print(f"== {name}: " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)
            run = subprocess.run([sys.executable, __file__, *forwarded, "--json", path], env={**caps_env, **env})
            if run.returncode != 0:  # the other classes' tables still count
                failed.append(name)
                combined[name] = {"environment": env, "failed": f"exit status {run.returncode}"}
                continue
            with open(path) as file:
                combined[name] = {"environment": env, **json.load(file)}
    if json_path:
        with open(json_path, "w") as file:
            json.dump(combined, file, indent=2)
    if failed:
        raise SystemExit(f"train_steps: --isa-caps: the run of {', '.join(failed)} failed (see above)")


def start_load(kind: str | None) -> subprocess.Popen | None:
    """Starts the --load process and returns once it loads its core."""
    if kind is None:
        return None
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = subprocess.Popen([sys.executable, "-c", LOADS[kind], str(os.getpid())], env=environment, stdout=subprocess.PIPE, text=True)
    if load.stdout.readline().strip() != "ready":
        load.kill()
        raise SystemExit(f"train_steps: the --load {kind} process ended before it started (exit status {load.wait()})")
    return load


def check_load_runs(load: subprocess.Popen | None, kind: str | None) -> None:
    if load is not None and load.poll() is not None:
        raise SystemExit(f"train_steps: the --load {kind} process ended during the run (exit status {load.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variant", default="full")
    parser.add_argument("--configs", default=None, help="comma-separated names (see the module docstring)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile configurations")
    parser.add_argument("--rounds", type=int, default=8, help="turns each configuration takes")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration per round")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--profile", metavar="NAME", help="profile this configuration's steps instead of timing")
    parser.add_argument("--isa-caps", action="store_true", help="run the table once per CPU class this CPU can stand in for")
    parser.add_argument("--load", choices=sorted(LOADS), help="time with another process busy on one core")
    args = parser.parse_args()
    if args.isa_caps:
        run_under_isa_caps(sys.argv[1:], args.json)
        return
    if args.profile:
        args.configs = args.profile
    device = torch.device(args.device)
    names = parse_configs(args.configs, args.no_compile, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(args.batch_size, 3, 28, 28, generator=generator).to(device),
         torch.randint(0, 10, (args.batch_size,), generator=generator).to(device))
        for _ in range(8)
    ]
    trainers = {name: Trainer(CONFIGS[name], args.variant, batches, device) for name in names}
    load = start_load(args.load)
    try:
        for name, trainer in trainers.items():
            trainer.run(args.warmup)
        if args.profile:
            profile(trainers[args.profile], args.steps)
            return
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            # Each round starts one configuration later, so none always runs first (after the
            # previous round's last) or always runs last.
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                times[name] += trainers[name].run(args.steps)
            check_load_runs(load, args.load)
    finally:
        if load is not None:
            load.kill()
            load.wait()
    report(args, device, times)


def report(args, device: torch.device, times: dict[str, list[float]]) -> None:
    """Prints each configuration's median step, the fused ones against the fastest native one
    and against the floor in their precision, and writes --json."""
    results = {name: {"median_ms": statistics.median(t), "mean_ms": statistics.fmean(t), "steps": len(t)} for name, t in times.items()}
    native = {name: r["median_ms"] for name, r in results.items() if name.startswith("native")}
    best_native = min(native, key=native.get) if native else None
    cpu = cifarnet.build_info()["cpu"]
    cap = " ".join(f"{k}={os.environ[k]}" for k in CAP_VARIABLES if k in os.environ)
    print(f"{args.variant} ConvNet, batch {args.batch_size}, {torch.get_num_threads()} threads, {device}; median ms per step over {args.rounds} rounds of {args.steps}")
    print(f"CPU: {cpu['model']} ({', '.join(cpu['isa'])}){'; capped: ' + cap if cap else ''}{'; load: ' + args.load if args.load else ''}")
    gpu = None
    if device.type == "cuda":
        gpu = {
            "name": torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version(),
            # float32 convolutions and matrix products follow these (torch's defaults: cuDNN TF32 on, matmul off)
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
        print("GPU: " + ", ".join(f"{k} {v}" for k, v in gpu.items()))
    for name, result in results.items():
        line = f"  {name:<24} {result['median_ms']:8.2f} ms"
        if best_native and name.startswith("fused"):
            result["speedup_vs_best_native"] = native[best_native] / result["median_ms"]
            line += f"   {result['speedup_vs_best_native']:.2f}x vs {best_native}"
        floors = {
            n: r["median_ms"] for n, r in results.items() if CONFIGS[n].ops == "floor" and CONFIGS[n].bfloat16 == CONFIGS[name].bfloat16
        }
        if name.startswith("fused") and floors:
            floor = min(floors, key=floors.get)
            result["floor"] = floor
            result["multiple_of_floor"] = result["median_ms"] / floors[floor]
            line += f"   {result['multiple_of_floor']:.2f}x its floor ({floor})"
        print(line)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": vars(args), "cpu": cpu, "gpu": gpu, "cap": cap, "best_native": best_native, "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
