"""One JSON summary of a benchmarks/gpu_check.sh run, readable at a glance.

    python benchmarks/gpu_summary.py OUT_DIR > OUT_DIR/summary.json

Reads the junit XML of the CUDA tests, the gpu_cases.py reports, the compute-sanitizer logs,
the cifarnet-bench JSON and the training-step JSON found in OUT_DIR. Exit status 1 when no CUDA
test ran (none found, or every one skipped) or this machine has no usable GPU or CUDA build, so a
build without CUDA kernels cannot pass.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path


# Test modules skipped whole without a GPU: every test of theirs that passed ran on it.
CUDA_ONLY_MODULES = {"test_cuda", "test_cuda_graphs"}


def ran_on_cuda(classname: str, name: str) -> bool:
    """Whether a test that passed ran on the GPU: parametrised with the cuda device, or in a
    module that needs one (other tests in test_cuda_*.py files run on the CPU)."""
    return "cuda" in name.partition("[")[2] or not CUDA_ONLY_MODULES.isdisjoint(classname.split("."))


def test_counts(path: Path) -> dict | None:
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"passed": 0, "failed": 0, "skipped": 0, "device_cuda_passed": 0, "failures": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                counts["failures"].append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
                counts["device_cuda_passed"] += ran_on_cuda(case.get("classname"), case.get("name"))
    return counts


def case_failures(path: Path) -> dict | None:
    if not path.exists():
        return None
    cases = json.loads(path.read_text())
    failed = [f"{c['case']}: {c['detail']}" for c in cases if not c["ok"]]
    return {"ok": len(cases) - len(failed), "failed": failed}


def sanitizer_errors(path: Path) -> dict | None:
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    summary = re.findall(r"(?:ERROR|RACECHECK) SUMMARY: (.*)", text)
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return {"summary": summary[-1] if summary else "no summary (did it finish?)",
            "errors": int(errors[-1]) if errors else None}


def bench_ratios(path: Path) -> dict | None:
    """Per op and layer (and the three layers' total) of one cifarnet-bench run: the fused op's
    speedup over native eager per mode, its saved-bytes ratio, and where the run has it (CUDA:
    graphs and max-autotune beside eager), fused_vs_best_native per mode (the fastest fused
    implementation against the fastest native one) with the two implementations it compares."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    ratios = {}
    for result in report["results"]:
        for layer in result["layers"] + [dict(result["total"], layer="total")]:
            entry = {mode: round(speedups["fused"], 3) for mode, speedups in layer["speedup"].items()}
            entry["saved_ratio"] = round(layer["saved_ratio"], 3)
            if all("fused_vs_best_native" in speedups for speedups in layer["speedup"].values()):
                entry["fused_vs_best_native"] = {
                    mode: round(speedups["fused_vs_best_native"], 3) for mode, speedups in layer["speedup"].items()
                }
                entry["fastest"] = layer["fastest"]
            ratios[f"{result['op']} {layer['layer']}"] = entry
    return ratios


def step_ratios(path: Path) -> dict | None:
    """The training step's figures of one train_steps.py run: each configuration's median ms, the
    fastest native one, and each fused one's speedup over it (step_speedup_vs_best_native: the
    fastest fused configuration's)."""
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    results = report["results"]
    median = {name: round(result["median_ms"], 3) for name, result in results.items()}
    native = {name: ms for name, ms in median.items() if name.startswith("native")}
    fused = {name: ms for name, ms in median.items() if name.startswith("fused")}
    ratios = {"median_ms": median, "gpu": report.get("gpu")}
    if native and fused:
        best = min(native, key=native.get)
        ratios["best_native"] = best
        for name, ms in fused.items():
            ratios[f"{name}_speedup_vs_best_native"] = round(native[best] / ms, 3)
        ratios["step_speedup_vs_best_native"] = round(native[best] / min(fused.values()), 3)
    return ratios


def main(out: Path) -> int:
    tests = test_counts(out / "tests.xml")
    summary = {
        "tests": tests,
        "tests_compile": test_counts(out / "tests_compile.xml"),
        "cases_large": case_failures(out / "cases_large.json"),
        "cases_small": case_failures(out / "cases_small.json"),
        "cases_small_memcheck": case_failures(out / "cases_memcheck.json"),
        "cases_small_racecheck": case_failures(out / "cases_racecheck.json"),
        "sanitizer_memcheck": sanitizer_errors(out / "sanitizer_memcheck.log"),
        "sanitizer_racecheck": sanitizer_errors(out / "sanitizer_racecheck.log"),
    }
    for batch in (128, 1024):
        for dtype in ("float32", "bfloat16"):
            summary[f"bench_{dtype}_batch{batch}_speedup_vs_native_eager"] = bench_ratios(out / f"bench_{dtype}_{batch}.json")
        summary[f"train_step_batch{batch}"] = step_ratios(out / f"train_steps_{batch}.json")
    skipped = out / "skipped_steps"
    summary["steps_skipped_for_time"] = skipped.read_text().splitlines() if skipped.exists() else []
    summary["cuda_available"] = cuda_available()
    json.dump(summary, sys.stdout, indent=1)
    print()
    return 0 if summary["cuda_available"] and tests and tests["device_cuda_passed"] > 0 else 1


def cuda_available() -> bool:
    """Whether this machine has a usable GPU and cifarnet was built with CUDA kernels."""
    import torch

    import cifarnet

    return torch.cuda.is_available() and bool(cifarnet.build_info()["cuda"])


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
