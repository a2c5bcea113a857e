"""``cifarnet-bench --model``: whole models, forward+backward in training mode, before and after
:func:`cifarnet.fuse`, with the bytes each keeps for its backward."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

import cifarnet
from cifarnet._timing import MEMORY_FORMAT_NAMES, MEMORY_FORMATS, Stopwatch, interleaved_medians, saved_tensor_bytes, under_autocast

MODEL_INPUT_SIZES = {"convnet": 28, "vgg11": 32, "vgg11_bn": 32, "alexnet": 64, "resnet18": 224, "resnet50": 224}
"""The models ``--model`` times, and the side of their square inputs by default (``--input-size``
changes it): the study's ``full`` ConvNet trains on 28x28 crops; VGG pools 32x32 down to 1x1;
AlexNet's stride-4 11x11 stem needs 64x64 to keep its three pools; the ResNets at ImageNet's
224x224, where their stem's activation is largest."""


def make_model(name: str) -> nn.Module:
    """A ``--model`` with random weights: the study's ``full`` ConvNet built from native torch
    layers, or a torchvision model (1000 classes)."""
    if name == "convnet":
        from cifarnet.study.models import ConvNet

        return ConvNet("full", "native")
    if name not in MODEL_INPUT_SIZES:
        raise ValueError(f"model must be one of {', '.join(MODEL_INPUT_SIZES)}, got {name!r}")
    import torchvision

    return getattr(torchvision.models, name)()


def input_size_problem(name: str, size: int, batch_size: int) -> str | None:
    """Why ``name`` cannot take a batch of ``size`` x ``size`` inputs in training mode (its
    first error, found on the meta device: shapes only, nothing computed), or None."""
    with torch.device("meta"):
        model = make_model(name).train()
        try:
            model(torch.empty(batch_size, 3, size, size))
        except (RuntimeError, ValueError) as error:
            return (str(error).strip().splitlines() or [type(error).__name__])[0]
    return None


def model_forward_backward(model: nn.Module, input: Tensor, autocast_dtype: torch.dtype | None = None) -> Callable[[], object]:
    """A zero-argument forward (under CPU autocast in ``autocast_dtype`` where given) then
    backward of ``model`` on ``input``, with a fixed output gradient and fresh parameter
    gradients each call."""
    forward = under_autocast(model, autocast_dtype)
    grad_output = torch.randn_like(forward(input))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        forward(input).backward(grad_output)

    return forward_backward


def benchmark_model(name: str, batch_size: int, dtype, device, warmup: int, repeats: int, autocast_dtype: torch.dtype | None = None, memory_format: torch.memory_format = torch.contiguous_format, input_size: int | None = None) -> list[dict]:
    """Times forward+backward of a model (training mode) before and after ``cifarnet.fuse``,
    interleaved, and counts the bytes saved for its backward; for ``vgg11_bn`` also its
    ``features`` alone (the classifier's linear layers would hide the convolutions). Model and
    input in ``memory_format`` (channels_last: the layout native is fastest in on CPUs with AMX);
    native is also timed in the other layout (``native_other_layout``), and ``speedup_vs_best_native``
    compares the fused model with the faster of the two."""
    torch.manual_seed(0)
    model = make_model(name).to(device=device, dtype=dtype, memory_format=memory_format).train()
    size = input_size or MODEL_INPUT_SIZES[name]
    input = torch.randn(batch_size, 3, size, size, dtype=dtype, device=device).contiguous(memory_format=memory_format)
    other_format = next(f for f in MEMORY_FORMATS.values() if f != memory_format)
    other_input = input.contiguous(memory_format=other_format)
    parts = {"model": model}
    if name == "vgg11_bn":
        parts["features"] = model.features
    stopwatch = Stopwatch(device)
    rows = []
    for part, native in parts.items():
        fused, report = cifarnet.fuse(native, report=True)
        native_other_layout = copy.deepcopy(native).to(memory_format=other_format)
        versions = {"native": native, "fused": fused}
        calls = {key: model_forward_backward(module, input, autocast_dtype) for key, module in versions.items()}
        calls["native_other_layout"] = model_forward_backward(native_other_layout, other_input, autocast_dtype)
        times = interleaved_medians(calls, stopwatch, warmup, repeats)
        saved = {key: saved_tensor_bytes(lambda module=module: under_autocast(module, autocast_dtype)(input)) for key, module in versions.items()}
        rows.append(
            {
                "model": name,
                "part": part,
                "shape": f"3x{size}x{size} (N={batch_size})",
                "memory_format": MEMORY_FORMAT_NAMES[memory_format],
                "fused_chains": len(report.fused),
                "unfused_chains": len(report.unfused),
                "forward_backward_ms": times,
                "other_memory_format": MEMORY_FORMAT_NAMES[other_format],
                "speedup": times["native"] / times["fused"],
                "speedup_vs_best_native": min(times["native"], times["native_other_layout"]) / times["fused"],
                "saved_bytes": saved,
                "saved_ratio": saved["fused"] / saved["native"],
            }
        )
    return rows


def format_model_table(rows: list[dict]) -> str:
    """A Markdown table of ``benchmark_model``'s rows: ms, speedups (> 1 is faster) against native
    in the same layout and against the faster of native's two layouts, MiB."""
    header = [
        "model", "part", "input", "chains fused", "fwd+bwd native ms", "native, other layout ms", "fwd+bwd fused ms",
        "speedup", "vs best native", "saved native MiB", "saved fused MiB", "saved ratio",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        times, saved = row["forward_backward_ms"], row["saved_bytes"]
        cells = [
            row["model"], row["part"], row["shape"], str(row["fused_chains"]),
            f"{times['native']:.2f}", f"{times['native_other_layout']:.2f} ({row['other_memory_format']})",
            f"{times['fused']:.2f}", f"{row['speedup']:.2f}x", f"{row['speedup_vs_best_native']:.2f}x",
            f"{saved['native'] / 2**20:.1f}", f"{saved['fused'] / 2**20:.1f}", f"{row['saved_ratio']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
