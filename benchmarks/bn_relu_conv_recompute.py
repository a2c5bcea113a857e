"""What a BN→ReLU→conv op that recomputes its normalised input would give a ResNet: the
measurement issue 28 asks for before building one (its item 4).

    python benchmarks/bn_relu_conv_recompute.py --model resnet50 --input-size 224 --batch-size 8 --threads 2 [--impl cifarnet]

In a ResNet's bottleneck the batch norm's output, rectified in place, is kept for the backward
only as the next convolution's input, while the batch norm keeps its own input too. An op that
takes the batch norm's input, normalises, rectifies and convolves, and keeps only that input
(recomputing the rectified tensor in the backward, one elementwise pass) keeps one tensor
fewer per pair. This script builds that op from native ATen calls (a Python autograd.Function,
not cifarnet's C++), rewrites every BatchNorm2d → ReLU → Conv2d of the model with it through
torch.fx, checks the rewritten model against the original in float64, and times both, float32
channels-last, interleaved: forward+backward medians and the bytes saved for the backward. The
original traced by torch.fx without rewriting is timed too: tracing alone makes each block's
residual `+=` an out-of-place add, a cost the rewritten model pays that is not the op's.
``--impl cifarnet`` computes the rewritten pairs with the op built since,
``cifarnet.ops.batch_norm_relu_conv2d``, instead of that prototype (``--impl python``).

    python benchmarks/bn_relu_conv_recompute.py --micro --threads 2

``--micro`` times the op alone instead, forward+backward against native F.batch_norm ->
F.relu (in place, as torchvision's) -> F.conv2d at two of ResNet-50's bottleneck pairs at 224,
batch 8, float32 channels-last: the op's own share of the model's figure, without the
convolutions' noise around it.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.fx
import torch.nn.functional as F
import torchvision
from torch import nn

from cifarnet import ops
from cifarnet._timing import Stopwatch, interleaved_medians, saved_tensor_bytes
from cifarnet.nn import batch_norm_arguments


class BatchNormReLUConv2dFunction(torch.autograd.Function):
    """relu(batch_norm(x)) convolved, keeping x and the batch statistics, not the rectified
    tensor."""

    @staticmethod
    def forward(ctx, x, bn_weight, bn_bias, running_mean, running_var, momentum, eps, conv_weight, stride, padding):
        normalised, mean, invstd = torch.native_batch_norm(x, bn_weight, bn_bias, running_mean, running_var, True, momentum, eps)
        output = F.conv2d(normalised.relu_(), conv_weight, None, stride, padding)
        ctx.save_for_backward(x, bn_weight, bn_bias, mean, invstd, conv_weight)
        ctx.geometry = (stride, padding)
        ctx.eps = eps
        return output

    @staticmethod
    def backward(ctx, grad_output):
        x, bn_weight, bn_bias, mean, invstd, conv_weight = ctx.saved_tensors
        stride, padding = ctx.geometry
        shape = (1, -1, 1, 1)
        rectified = ((x - mean.view(shape)) * (invstd * bn_weight).view(shape) + bn_bias.view(shape)).relu_()
        grad_rectified, grad_conv_weight, _ = torch.ops.aten.convolution_backward(
            grad_output, rectified, conv_weight, None, stride, padding, (1, 1), False, (0, 0), 1, (True, True, False)
        )
        grad_normalised = grad_rectified.masked_fill_(rectified == 0, 0)
        del rectified
        grad_x, grad_bn_weight, grad_bn_bias = torch.ops.aten.native_batch_norm_backward(
            grad_normalised, x, bn_weight, None, None, mean, invstd, True, ctx.eps, (True, True, True)
        )
        return grad_x, grad_bn_weight, grad_bn_bias, None, None, None, None, grad_conv_weight, None, None


IMPLEMENTATIONS = ("python", "cifarnet")


class BatchNormReLUConv2d(nn.Module):
    """Holds the batch norm and the convolution it replaces (their parameters and buffers), and
    computes them with ``impl``: the Python prototype above or cifarnet's op."""

    def __init__(self, bn: nn.BatchNorm2d, conv: nn.Conv2d, impl: str = "python"):
        super().__init__()
        assert conv.bias is None and conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
        assert impl in IMPLEMENTATIONS, impl
        self.bn, self.conv, self.impl = bn, conv, impl

    def forward(self, x):
        if not self.training:
            return self.conv(F.relu(self.bn(x)))
        bn = self.bn
        if self.impl == "cifarnet":
            return ops.batch_norm_relu_conv2d(
                x, bn_weight=bn.weight, bn_bias=bn.bias, weight=self.conv.weight, bias=None,
                stride=self.conv.stride, padding=self.conv.padding, **batch_norm_arguments(bn),
            )  # fmt: skip
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        return BatchNormReLUConv2dFunction.apply(
            x, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps, self.conv.weight,
            self.conv.stride, self.conv.padding,
        )


def rewrite(model: nn.Module, impl: str = "python") -> tuple[torch.fx.GraphModule, int]:
    """``model`` traced, each BatchNorm2d → ReLU → Conv2d (the ReLU's output used by the
    convolution alone) computed by one BatchNormReLUConv2d of ``impl``; and how many."""
    graph_module = torch.fx.symbolic_trace(model)
    modules = dict(graph_module.named_modules())

    def is_module(node, module_type):
        return node.op == "call_module" and isinstance(modules[node.target], module_type)

    count = 0
    for conv in list(graph_module.graph.nodes):
        if not is_module(conv, nn.Conv2d):
            continue
        relu = conv.args[0]
        if not (is_module(relu, nn.ReLU) and len(relu.users) == 1 and is_module(relu.args[0], nn.BatchNorm2d)):
            continue
        bn = relu.args[0]
        if len(bn.users) != 1:
            continue
        name = f"bn_relu_conv_{count}"
        graph_module.add_submodule(name, BatchNormReLUConv2d(modules[bn.target], modules[conv.target], impl))
        with graph_module.graph.inserting_before(conv):
            fused = graph_module.graph.call_module(name, (bn.args[0],))
        conv.replace_all_uses_with(fused)
        for node in (conv, relu, bn):
            graph_module.graph.erase_node(node)
        count += 1
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, count


def forward_backward(model: nn.Module, input: torch.Tensor):
    grad = torch.randn_like(model(input))

    def call():
        model.zero_grad(set_to_none=True)
        model(input).backward(grad)

    return call


def check_float64(name: str, impl: str) -> float:
    """Largest relative difference of output and parameter gradients, original against
    rewritten, float64, training mode."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().double().train()
    rewritten, _ = rewrite(copy.deepcopy(model), impl)
    input = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    results = []
    for candidate in (model, rewritten):
        output = candidate(input)
        output.sum().backward()
        results.append({"output": output, **{name: p.grad for name, p in candidate.named_parameters()},
                        **dict(candidate.named_buffers())})
    original, mine = results
    assert original.keys() == mine.keys()
    return max(((mine[key].double() - value.double()).abs().max() / value.double().abs().max().clamp_min(1e-30)).item()
               for key, value in original.items())


# (batch, channels, size, out_channels, kernel, padding): the 1x1 reduction that opens a
# bottleneck of ResNet-50's 56x56 stage (after the previous block's output, 256 channels) and
# its 3x3 convolution (after bn1 -> relu).
MICRO_SHAPES = ((8, 256, 56, 64, 1, 0), (8, 64, 56, 64, 3, 1))


def micro(warmup: int, repeats: int) -> None:
    """Forward+backward medians of the op and of native BN -> ReLU -> conv, interleaved, and
    their ratio, at MICRO_SHAPES."""
    stopwatch = Stopwatch(torch.device("cpu"))
    for batch, channels, size, out_channels, kernel, padding in MICRO_SHAPES:
        torch.manual_seed(0)
        input = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        bn_weight = (torch.rand(channels) + 0.5).requires_grad_()
        bn_bias = torch.randn(channels).requires_grad_()
        weight = torch.randn(out_channels, channels, kernel, kernel).contiguous(memory_format=torch.channels_last)
        weight.requires_grad_()
        running = [torch.zeros(channels), torch.ones(channels)]
        leaves = [input, bn_weight, bn_bias, weight]
        grad = torch.randn(batch, out_channels, size, size).contiguous(memory_format=torch.channels_last)

        def native():
            normalised = F.batch_norm(input, *running, bn_weight, bn_bias, True, 0.1, 1e-5)
            torch.autograd.grad(F.conv2d(F.relu(normalised, inplace=True), weight, None, 1, padding), leaves, grad)

        def fused():
            output = ops.batch_norm_relu_conv2d(input, *running, bn_weight, bn_bias, weight, None, True, 0.1, 1e-5, 1, padding)
            torch.autograd.grad(output, leaves, grad)

        medians = interleaved_medians({"native": native, "bn_relu_conv": fused}, stopwatch, warmup, repeats)
        print(f"N={batch} C={channels} {size}x{size} -> {out_channels} {kernel}x{kernel}, float32 channels-last, "
              f"{torch.get_num_threads()} thread(s): native {medians['native']:.2f} ms, op {medians['bn_relu_conv']:.2f} ms "
              f"({medians['native'] / medians['bn_relu_conv']:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, default="python", help="what computes the rewritten pairs")
    parser.add_argument("--micro", action="store_true", help="time cifarnet's op alone at ResNet-50 bottleneck shapes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.micro:
        micro(args.warmup, args.repeats)
        return
    print(f"float64 check, {args.model}: largest relative difference {check_float64(args.model, args.impl):.1e}")
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().to(memory_format=torch.channels_last).train()
    rewritten, count = rewrite(copy.deepcopy(model), args.impl)
    input = torch.randn(args.batch_size, 3, args.input_size, args.input_size).contiguous(memory_format=torch.channels_last)
    # NB: torch.fx traces a bottleneck's `out += identity` as an out-of-place add, which costs the
    # rewritten model an allocation and a pass per block that the eager model does not pay: the
    # same model traced without rewriting ("traced") is timed too, for the op's own effect.
    traced = torch.fx.symbolic_trace(model)
    calls = {
        "native": forward_backward(model, input),
        "traced": forward_backward(traced, input),
        "bn_relu_conv": forward_backward(rewritten, input),
    }
    # Round-robin with a rotating start: the third of three calls in a fixed order cost 3-6%
    # more on a 2-core Zen 3 (the micro-benchmark's note), which fell on the rewritten model.
    medians = interleaved_medians(calls, Stopwatch(torch.device("cpu")), args.warmup, args.repeats)
    saved = {key: saved_tensor_bytes(lambda m=m: m(input)) for key, m in (("native", model), ("bn_relu_conv", rewritten))}
    print(f"{args.model}, {args.input_size}x{args.input_size}, batch {args.batch_size}, float32 channels-last, "
          f"{torch.get_num_threads()} thread(s): {count} BN→ReLU→conv rewritten ({args.impl})")
    print(f"forward+backward: native {medians['native']:.1f} ms, rewritten {medians['bn_relu_conv']:.1f} ms "
          f"({medians['native'] / medians['bn_relu_conv']:.2f}x); native traced by torch.fx {medians['traced']:.1f} ms "
          f"({medians['traced'] / medians['bn_relu_conv']:.2f}x)")
    print(f"saved for backward: native {saved['native'] / 2**20:.1f} MiB, rewritten {saved['bn_relu_conv'] / 2**20:.1f} MiB "
          f"({saved['bn_relu_conv'] / saved['native']:.3f}x)")


if __name__ == "__main__":
    main()
