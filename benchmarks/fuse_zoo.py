"""cifarnet.fuse over torchvision's classification models: the Markdown table of
docs/library.md#the-torchvision-zoo.

    python benchmarks/fuse_zoo.py

One model of each family (two configurations of GoogLeNet and Inception v3), built without
weights (10 classes): the max pools its forward calls (counted over one 224x224 image), the
chains `cifarnet.fuse(model, report=True)` found, fused (pool chains by name, batch norm ->
ReLU -> conv chains counted, with the first) and left (with the report's reason), the modules
it could not trace, and a note on the max pools that end no chain. The note is written here by
hand, from torchvision's source; the other columns come from the run.
tests/test_fuse_zoo.py checks the chains of the models that have any against their
architecture, and the fused models against the originals.
"""

from __future__ import annotations

import collections
import re
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch.overrides import TorchFunctionMode

import cifarnet

# aux_logits: True by default without weights; with weights, googlenet drops the auxiliary
# classifiers unless asked for them, inception_v3 keeps them unless asked not to.
AUXILIARY_OFF = {"aux_logits": False, "init_weights": True}
AUXILIARY_ON = {"aux_logits": True, "init_weights": True}
AUXILIARY = (
    "forward returns the auxiliary classifiers' outputs in training mode only: fused in training "
    "mode (the mode fuse found it in), its own forward in evaluation mode"
)
STRIDED = "no max pool: strided convolutions downsample"
STOCHASTIC_DEPTH = "; StochasticDepth branches on self.training (no chain to fuse in either mode)"

# (torchvision.models name, constructor arguments, note)
MODELS = [
    ("resnet18", {}, ""),
    ("resnet50", {}, ""),
    ("resnext50_32x4d", {}, ""),
    ("wide_resnet50_2", {}, ""),
    ("densenet121", {}, "the transitions between dense blocks pool by averaging"),
    ("vgg11", {}, ""),
    ("vgg11_bn", {}, ""),
    ("vgg16", {}, ""),
    ("alexnet", {}, ""),
    ("squeezenet1_0", {}, "the later max pools take Fire modules' concatenations"),
    ("squeezenet1_1", {}, "the later max pools take Fire modules' concatenations"),
    ("googlenet", AUXILIARY_OFF, "maxpool3, maxpool4 and the Inception blocks' pooling branches take concatenations"),
    ("googlenet", AUXILIARY_ON, AUXILIARY),
    ("inception_v3", AUXILIARY_OFF, "the Inception blocks' max pools take concatenations"),
    ("inception_v3", AUXILIARY_ON, AUXILIARY),
    ("shufflenet_v2_x1_0", {}, ""),
    ("mobilenet_v2", {}, STRIDED),
    ("mobilenet_v3_large", {}, STRIDED),
    ("mnasnet1_0", {}, STRIDED),
    ("efficientnet_b0", {}, STRIDED + STOCHASTIC_DEPTH),
    ("regnet_y_400mf", {}, STRIDED),
    ("convnext_tiny", {}, "no max pool: a 4x4/4 stem convolution and strided convolutions" + STOCHASTIC_DEPTH),
]


class MaxPoolCalls(TorchFunctionMode):
    """Counts the max pools a forward calls, as modules or functions."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)
        return func(*args, **(kwargs or {}))


def max_pool_calls(model: torch.nn.Module) -> int:
    counter = MaxPoolCalls()
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, 224, 224))
    return counter.count


def chain_text(names: tuple[str, ...]) -> str:
    """``features.0–3`` for a run of a Sequential's children, else ``conv1 → bn1 → relu → maxpool``."""
    parents, indices = zip(*(name.rpartition(".")[::2] for name in names))
    numbered = all(index.isdigit() for index in indices) and len(set(parents)) == 1
    if numbered and [int(index) for index in indices] == list(range(int(indices[0]), int(indices[-1]) + 1)):
        return f"`{parents[0]}.{indices[0]}–{indices[-1]}`"
    return "`" + " → ".join(names) + "`"


def untraced_text(untraced: dict[str, str]) -> str:
    """``the model and 24 submodules: <reason>``, one entry per reason."""
    by_reason = collections.defaultdict(list)
    for name, reason in untraced.items():
        by_reason[reason].append(name)
    parts = []
    for reason, names in by_reason.items():
        who = ["the model"] if "" in names else []
        submodules = len(names) - len(who)
        if submodules:
            who.append(f"{submodules} submodule{'s' if submodules > 1 else ''}")
        parts.append(f"{' and '.join(who)}: {reason}")
    return "; ".join(parts)


def left_text(unfused: list, shown: int = 3) -> str:
    """The chains left, with their reasons: the first ``shown``, then how many more."""
    lines = [f"{chain_text(chain.names)}: {chain.reason}" for chain in unfused[:shown]]
    if len(unfused) > shown:
        lines.append(f"and {len(unfused) - shown} more ({len(unfused)} in all)")
    return "<br>".join(lines) or "–"


def bn_relu_conv_text(fused: list) -> str:
    pairs = [chain for chain in fused if chain.kind == "bn_relu_conv"]
    return f"{len(pairs)}, the first {chain_text(pairs[0].names)}" if pairs else "–"


def row(name: str, arguments: dict, note: str) -> str:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10, **arguments)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("cifarnet.fuse: cannot trace"))
        _, report = cifarnet.fuse(model, report=True)
    shown = ", ".join(f"{key}={value}" for key, value in arguments.items() if key != "init_weights")
    cells = [
        f"`{name}`" + (f" ({shown})" if shown else ""),
        str(max_pool_calls(model)),
        str(len(report.fused) + len(report.unfused)),
        "<br>".join(chain_text(chain.names) for chain in report.fused if chain.kind == "pool") or "–",
        bn_relu_conv_text(report.fused),
        left_text(report.unfused),
        untraced_text(report.untraced) or "–",
        note,
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}\n")
    print("| model | max pools | chains found | pool chains fused | BN → ReLU → conv fused | left, and why | not traced | note |")
    print("|---|--:|--:|---|---|---|---|---|")
    for name, arguments, note in MODELS:
        print(row(name, arguments, note), flush=True)


if __name__ == "__main__":
    main()
