"""CUDA cases for the GPU check (benchmarks/gpu_check.sh), beyond the test suite.

``--small``: every op forward and backward in float32, float64, float16 and bfloat16,
contiguous and channels-last, over the geometries where index math breaks first (ceil mode
with a 3x2 pool at stride (2, 1), an overlapping 3x3 pool at stride 1, padded pools, N=0, C=1,
1x1 spatial), each compared with the same op on the CPU; then the public ops whose other
kernels those phase ops do not reach (evaluation batch norm, running statistics, batch norm ->
ReLU -> conv, dropout). Small enough to run under compute-sanitizer.

``--large``: the argmax bytes of CUDA and CPU compared bit for bit on integer-valued and NaN
inputs (exact ties); batch-norm statistics over large counts against float64; one pooling call
over more than 2**31 elements against native.

Prints one line per case and writes a JSON list of {case, ok, detail} to --json. Exit status 1
when any case fails.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import cifarnet
from cifarnet._op_handles import BN_BACKWARD_OP, BN_FORWARD_OP, CONV_BACKWARD_OP, TRAINING_BACKWARD_OP, TRAINING_OP, WITH_ARGMAX_OP


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
FORMATS = [torch.contiguous_format, torch.channels_last]
# (name, input shape, weight shape, conv stride, padding, pool size, pool stride, ceil mode,
# pool padding)
GEOMETRIES = [
    ("study 2x2", (3, 5, 12, 11), (7, 5, 3, 3), [1, 1], [1, 1], [2, 2], [], False, [0, 0]),
    ("ceil 3x2 stride (2,1)", (2, 3, 9, 8), (4, 3, 3, 3), [2, 1], [2, 0], [3, 2], [2, 1], True, [0, 0]),
    ("overlapping 3x3 stride 1", (2, 4, 8, 9), (5, 4, 3, 3), [1, 1], [1, 1], [3, 3], [1, 1], False, [0, 0]),
    ("ResNet stem pool 3x3/2 pad 1", (2, 3, 9, 10), (4, 3, 3, 3), [1, 1], [1, 1], [3, 3], [2, 2], False, [1, 1]),
    ("ceil 3x4 stride (3,2) pad (1,2)", (2, 3, 10, 9), (4, 3, 3, 3), [1, 1], [0, 1], [3, 4], [3, 2], True, [1, 2]),
    ("N=0", (0, 3, 8, 8), (4, 3, 3, 3), [1, 1], [1, 1], [2, 2], [], False, [0, 0]),
    ("C=1", (2, 1, 7, 7), (1, 1, 3, 3), [1, 1], [1, 1], [2, 2], [], True, [0, 0]),
    ("1x1 spatial", (4, 6, 1, 1), (3, 6, 1, 1), [1, 1], [0, 0], [1, 1], [], False, [0, 0]),
]


class Report:
    def __init__(self):
        self.cases: list[dict] = []

    def check(self, case: str, ok: bool, detail: str = "") -> None:
        self.cases.append({"case": case, "ok": bool(ok), "detail": detail})
        print(f"{'ok  ' if ok else 'FAIL'} {case}{': ' + detail if detail else ''}", flush=True)

    def run(self, case: str, fn) -> None:
        try:
            fn()
        except Exception as error:  # a case that raises is a failed case, not a stopped run
            self.check(case, False, f"{type(error).__name__}: {error}"[:500])


def tolerance(dtype) -> dict:
    return {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-4, atol=1e-4),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
    }[dtype]


def close(actual, expected, dtype) -> tuple[bool, str]:
    if actual is None or expected is None:
        return (actual is None) == (expected is None), "one side missing"
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    if actual.shape != expected.shape:
        return False, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().clamp(min=1).item() if expected.numel() else 1.0
    ok = torch.allclose(actual / scale, expected / scale, equal_nan=True, **tolerance(dtype))
    worst = (actual - expected).abs().max().item() / scale if expected.numel() else 0.0
    return ok, f"max scaled diff {worst:.2e}"


def integer_tensor(shape, generator, low=-3, high=4):
    return torch.randint(low, high, shape, generator=generator).double()


def small_cases(report: Report) -> None:
    generator = torch.Generator().manual_seed(0)
    for (name, in_shape, w_shape, stride, padding, pool, pool_stride, ceil, pool_padding), dtype, memory_format in itertools.product(
        GEOMETRIES, DTYPES, FORMATS
    ):
        # Integer-valued data: the convolution is exact in every dtype on both devices, so the
        # CPU op is an exact reference for which position each window picks.
        x64 = integer_tensor(in_shape, generator)
        w64 = integer_tensor(w_shape, generator, -1, 2)
        b64 = integer_tensor(w_shape[:1], generator)
        layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
        tag = f"{name} {str(dtype).removeprefix('torch.')} {layout}"
        geometry = (stride, padding, pool, pool_stride, ceil, pool_padding)

        def tensors(device):
            cast = lambda t: t.to(device, dtype)  # noqa: E731
            return cast(x64).contiguous(memory_format=memory_format), cast(w64), cast(b64)

        def conv_op():
            results = {}
            for device in ("cpu", "cuda"):
                x, w, b = tensors(device)
                out, argmax = WITH_ARGMAX_OP(x, w, b, *geometry)
                grad = torch.ones_like(out)
                grads = CONV_BACKWARD_OP(grad, x, w, argmax, *geometry, [True, True, True])
                results[device] = (out, argmax, *grads)
            torch.cuda.synchronize()
            cpu, gpu = results["cpu"], results["cuda"]
            ok_out, detail = close(gpu[0], cpu[0], dtype)
            same_argmax = torch.equal(gpu[1].cpu(), cpu[1])
            ok_grads = [close(g, c, dtype)[0] for g, c in zip(gpu[2:], cpu[2:])]
            report.check(f"conv_relu_pool {tag}", ok_out and same_argmax and all(ok_grads),
                         f"{detail}, argmax equal {same_argmax}, grads ok {ok_grads}")

        def batch_norm_op():
            if in_shape[0] * in_shape[2] * in_shape[3] <= 1:
                return
            results = {}
            for device in ("cpu", "cuda"):
                x = tensors(device)[0]
                weight = torch.linspace(0.5, 1.5, in_shape[1], device=device)
                bias = torch.linspace(-1, 1, in_shape[1], device=device)
                out, mean, var = BN_FORWARD_OP(x, None, None, weight, bias, True, 1e-5)
                grads = BN_BACKWARD_OP(torch.ones_like(out) * 0.5 + out, x, mean, var, weight, True, 1e-5, [True, True, True])
                results[device] = (out, mean, var, *grads)
            torch.cuda.synchronize()
            oks = [close(g, c, dtype) for g, c in zip(results["cuda"], results["cpu"])]
            # (out, mean, var, grad_input, grad_weight, grad_bias): the parameters' gradients come
            # back in each device's statistics dtype, save_mean's (autograd casts them)
            dtypes_match = results["cuda"][3].dtype == results["cpu"][3].dtype and all(
                g.dtype == r[1].dtype for r in results.values() for g in r[4:]
            )
            report.check(f"batch_norm {tag}", all(ok for ok, _ in oks) and dtypes_match,
                         f"{[d for _, d in oks]}, grad dtypes as expected {dtypes_match}")

        def training_op():
            if in_shape[0] == 0:
                return
            results = {}
            for device in ("cpu", "cuda"):
                x, w, b = tensors(device)
                bn_weight = torch.linspace(0.5, 1.5, w_shape[0], device=device)
                bn_bias = torch.linspace(-1, 1, w_shape[0], device=device)
                out, argmax, conv, mean, var = TRAINING_OP(x, w, b, bn_weight, bn_bias, 1e-5, *geometry)
                grads = TRAINING_BACKWARD_OP(torch.ones_like(out), x, w, conv, mean, var, bn_weight, argmax, 1e-5,
                                          *geometry, [True, True, True, True, True])
                results[device] = (out, *grads)
            torch.cuda.synchronize()
            oks = [close(g, c, dtype) for g, c in zip(results["cuda"], results["cpu"])]
            report.check(f"conv_bn_relu_pool {tag}", all(ok for ok, _ in oks), str([d for _, d in oks]))

        for case, fn in (("conv_relu_pool", conv_op), ("batch_norm", batch_norm_op), ("conv_bn_relu_pool", training_op)):
            report.run(f"{case} {tag}", fn)


def public_op_cases(report: Report) -> None:
    """The kernels the phase ops of :func:`small_cases` do not reach, through the public ops and
    autograd, CUDA against CPU: evaluation batch norm, the running statistics' update, batch norm
    -> ReLU -> conv in both modes, and dropout (its mask drawn on each device, so checked by what
    it must satisfy)."""
    generator = torch.Generator().manual_seed(4)
    for dtype, memory_format in itertools.product(DTYPES, FORMATS):
        layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
        tag = f"{str(dtype).removeprefix('torch.')} {layout}"
        # 16-bit data with float32 parameters and statistics, as under autocast
        parameter_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        x64, w64 = integer_tensor((3, 5, 6, 7), generator), integer_tensor((4, 5, 3, 3), generator, -1, 2)

        def compare(case, results_on):
            results = {device: results_on(device) for device in ("cpu", "cuda")}
            torch.cuda.synchronize()
            oks = [close(g, c, dtype) for g, c in zip(results["cuda"], results["cpu"], strict=True)]
            report.check(f"{case} {tag}", all(ok for ok, _ in oks), str([d for _, d in oks]))

        def tensors(device):
            x = x64.to(device, dtype).contiguous(memory_format=memory_format).requires_grad_()
            per_channel = lambda low, high: torch.linspace(low, high, 5, device=device, dtype=parameter_dtype)  # noqa: E731
            return x, per_channel(-1, 1), per_channel(0.5, 2), per_channel(0.5, 1.5).requires_grad_(), per_channel(-1, 1).requires_grad_()

        def batch_norm(training):
            def results_on(device):
                x, running_mean, running_var, weight, bias = tensors(device)
                out = cifarnet.ops.batch_norm(x, running_mean, running_var, weight, bias, training=training)
                grads = torch.autograd.grad(out, (x, weight, bias), torch.ones_like(out) * 0.5 + out.detach())
                return out, *grads, running_mean, running_var

            return results_on

        def batch_norm_relu_conv(training):
            def results_on(device):
                x, running_mean, running_var, bn_weight, bn_bias = tensors(device)
                weight = w64.to(device, dtype).requires_grad_()
                bias = torch.linspace(-1, 1, 4, device=device, dtype=dtype).requires_grad_()
                out = cifarnet.ops.batch_norm_relu_conv2d(
                    x, running_mean, running_var, bn_weight, bn_bias, weight, bias, training=training, padding=1
                )
                grads = torch.autograd.grad(out, (x, bn_weight, bn_bias, weight, bias), torch.ones_like(out))
                return out, *grads, running_mean, running_var

            return results_on

        for training in (True, False):
            mode = "training" if training else "evaluation"
            report.run(f"batch_norm {mode} {tag}", lambda: compare(f"batch_norm {mode}", batch_norm(training)))
            report.run(f"bn_relu_conv {mode} {tag}", lambda: compare(f"bn_relu_conv {mode}", batch_norm_relu_conv(training)))
        report.run(f"dropout {tag}", lambda: dropout_case(report, x64, dtype, memory_format, tag))


def dropout_case(report: Report, x64, dtype, memory_format, tag: str) -> None:
    """Dropout on the GPU: each element dropped (0) or kept and scaled by 1 / (1 - p), about
    half kept, its gradient the same mask and scale; p = 0 keeps everything, p = 1 nothing."""
    x = (x64.abs() + 1).to("cuda", dtype).contiguous(memory_format=memory_format).requires_grad_()
    out = cifarnet.ops.dropout(x, 0.5)
    (grad,) = torch.autograd.grad(out, x, torch.ones_like(out))
    kept = out != 0
    scaled = torch.equal(out[kept], (x.detach() * 2)[kept])
    same_mask = torch.equal(grad, kept.to(dtype) * 2)
    share = kept.double().mean().item()
    ends = torch.equal(cifarnet.ops.dropout(x, 0.0), x) and not cifarnet.ops.dropout(x, 1.0).any()
    report.check(f"dropout {tag}", scaled and same_mask and 0.3 < share < 0.7 and ends,
                 f"kept scaled {scaled}, gradient mask {same_mask}, kept {share:.2f}, p=0 and p=1 {ends}")


def argmax_bit_for_bit(report: Report) -> None:
    generator = torch.Generator().manual_seed(1)
    for dtype, nan in itertools.product(DTYPES, (False, True)):
        x = integer_tensor((8, 16, 30, 30), generator, 0, 3)  # few distinct values: many ties
        if nan:
            x.view(-1)[torch.randperm(x.numel(), generator=generator)[:50]] = float("nan")
        w = integer_tensor((32, 16, 3, 3), generator, 0, 2)
        for memory_format in FORMATS:
            for pool, pool_stride, pool_padding in (
                ([2, 2], [], [0, 0]), ([3, 3], [1, 1], [0, 0]), ([3, 2], [2, 1], [0, 0]), ([3, 3], [2, 2], [1, 1])
            ):  # fmt: skip
                args = ([1, 1], [1, 1], pool, pool_stride, True, pool_padding)
                cpu = WITH_ARGMAX_OP(x.to(dtype).contiguous(memory_format=memory_format), w.to(dtype), None, *args)
                gpu = WITH_ARGMAX_OP(x.to("cuda", dtype).contiguous(memory_format=memory_format), w.to("cuda", dtype), None, *args)
                same = torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].cpu(), cpu[0]) if not nan else (
                    torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].isnan().cpu(), cpu[0].isnan())
                )
                report.check(f"argmax bit for bit {str(dtype)[6:]} nan={nan} {memory_format} pool {pool}/{pool_stride}/{pool_padding}", same)


def large_statistics(report: Report) -> None:
    for name, shape, memory_format in (
        ("(256, 64, 64, 64) channels_last", (256, 64, 64, 64), torch.channels_last),
        ("(1, 3, 4096, 4096)", (1, 3, 4096, 4096), torch.contiguous_format),
        ("(10**7, 3)", (10**7, 3), torch.contiguous_format),
    ):
        generator = torch.Generator(device="cuda").manual_seed(2)
        x = (torch.randn(shape, device="cuda", generator=generator) * 3 + 5).contiguous(memory_format=memory_format)
        start = time.perf_counter()
        _, mean, var = BN_FORWARD_OP(x, None, None, None, None, True, 1e-5)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        dims = [d for d in range(x.dim()) if d != 1]
        mean64, var64 = x.double().mean(dims), x.double().var(dims, unbiased=False)
        mean_err = ((mean.double() - mean64).abs() / mean64.abs()).max().item()
        var_err = ((var.double() - var64).abs() / var64).max().item()
        report.check(f"batch norm statistics {name}", mean_err < 1e-5 and var_err < 1e-5,
                     f"relative error mean {mean_err:.1e}, var {var_err:.1e}; {seconds * 1e3:.1f} ms (first call)")
        del x


def large_pool(report: Report) -> None:
    # A 1x1 convolution whose output has 9 * 64 * 2048 * 2048 > 2**31 elements (float16).
    generator = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(9, 64, 2048, 2048, device="cuda", dtype=torch.float16, generator=generator)
    w = torch.randn(64, 64, 1, 1, device="cuda", dtype=torch.float16, generator=generator) / 8
    assert x.numel() > 2**31
    args = ([1, 1], [0, 0], [2, 2], [], False, [0, 0])
    out, argmax = WITH_ARGMAX_OP(x, w, None, *args)
    native = F.max_pool2d(F.relu(F.conv2d(x, w)), 2)
    same = torch.equal(out, native)
    last = (out[-1, -1] - native[-1, -1]).abs().max().item()
    grad = torch.ones_like(out)
    grad_input, _, _ = CONV_BACKWARD_OP(grad, x, w, argmax, *args, [True, False, False])
    del grad, argmax
    x.requires_grad_()
    (native_grad,) = torch.autograd.grad(F.max_pool2d(F.relu(F.conv2d(x, w)), 2), x, torch.ones_like(native))
    grad_ok = torch.allclose(grad_input[-1], native_grad[-1], rtol=1e-2, atol=1e-2)
    report.check("pool over > 2**31 elements (9, 64, 2048, 2048) float16", same and grad_ok,
                 f"outputs equal {same} (last plane max diff {last}), last sample's input gradient close {grad_ok}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="the sanitizer subset")
    parser.add_argument("--large", action="store_true", help="bit-for-bit argmax and large counts")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or not cifarnet.build_info()["cuda"]:
        print("gpu_cases: needs a GPU and cifarnet built with CUDA", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    # The CPU references convolve as oneDNN does, exactly on integer data: on an AVX2-only host
    # Winograd would round, and the argmax's ties could part.
    os.environ["CIFARNET_CONV_ALGORITHM"] = "native"
    report = Report()
    if args.small:
        small_cases(report)
        public_op_cases(report)
    if args.large:
        report.run("argmax bit for bit", lambda: argmax_bit_for_bit(report))
        report.run("batch norm statistics", lambda: large_statistics(report))
        report.run("pool over > 2**31 elements", lambda: large_pool(report))
    failed = [c for c in report.cases if not c["ok"]]
    print(f"gpu_cases: {len(report.cases) - len(failed)} ok, {len(failed)} failed")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report.cases, file, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
