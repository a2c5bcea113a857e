"""The cifarnet-bench command on a tiny batch: it runs every op and reports what it measured."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cifarnet
from cifarnet import _timing, benchmark, benchmark_models, benchmark_ops, benchmark_report
from conftest import DEVICES

REPO = Path(__file__).resolve().parents[1]


def test_bench_command_writes_tables_json_and_plot(tmp_path, capsys):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    status = benchmark.main(
        ["--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-compile", "--memory-format", "both",
         "--json", str(report), "--plot", str(plot)]
    )
    assert status == 0
    printed = capsys.readouterr().out
    cpu = cifarnet.build_info()["cpu"]
    assert f"CPU: {cpu['model']}" in printed and " ".join(cpu["isa"]) in printed  # what the figures were measured on
    for op in benchmark_ops.OPS:
        assert f"{op}, contiguous:" in printed and f"{op}, channels_last:" in printed
    saved = json.loads(report.read_text())
    assert saved["gpu"] is None and list(saved["implementations"]) == ["native", "fused"]  # --no-compile, on the CPU
    results = saved["results"]
    assert {(r["op"], r["memory_format"]) for r in results} == {(op, f) for op in benchmark_ops.OPS for f in _timing.MEMORY_FORMATS}
    for result in results:
        assert result["implementations"] == ["native", "fused"]
        assert [row["layer"] for row in result["layers"]] == [layer.name for layer in benchmark_ops.STUDY_LAYERS]
        for row in result["layers"]:
            assert all(row["forward_ms"][name] > 0 for name in ("native", "fused"))
            for mode in benchmark_ops.MODES:
                speedup = row["speedup"][mode]
                assert set(speedup) == {"fused", "fused_vs_best_native"} and speedup["fused_vs_best_native"] == speedup["fused"]
                assert row["fastest"][mode] == {"native": "native", "fused": "fused"}
            if benchmark_ops.OPS[result["op"]].conv:  # the fused layers keep less for the backward
                assert 0 < row["saved_bytes"]["fused"] < row["saved_bytes"]["native"]
    # Both layouts timed: the fastest of each side over both, against each other.
    for op, modes in saved["best_across_layouts"].items():
        layouts = {r["memory_format"]: r["total"] for r in results if r["op"] == op}
        for mode, best in modes.items():
            for side in ("native", "fused"):
                times = [(f, t[f"{mode}_ms"][side]) for f, t in layouts.items()]
                assert best[side] == [*min(times, key=lambda entry: entry[1])[:1], side, min(t for _, t in times)]
            assert best["fused_vs_best_native"] == pytest.approx(best["native"][2] / best["fused"][2])
        assert f"{op}, both layouts, forward+backward: fastest native native" in printed
    assert set(saved["best_across_layouts"]) == set(benchmark_ops.OPS)
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_the_cpu_runs_every_implementation_under_autocast(dtype):
    op, layer = benchmark_ops.OPS["conv2d_relu_max_pool2d"], benchmark_ops.STUDY_LAYERS[2]
    tensors = benchmark_ops.make_tensors(op, layer, 2, torch.float32, torch.device("cpu"), torch.channels_last)
    for implementation in ("native", "fused"):
        block = benchmark_ops.make_block(op, implementation, dtype)
        assert block(benchmark_ops.leaves(tensors, False, False)).dtype == dtype, implementation
        assert benchmark_ops.make_block(op, implementation)(tensors).dtype == torch.float32


def test_bench_in_bfloat16_on_the_cpu_says_so(tmp_path, capsys):
    report = tmp_path / "bench.json"
    status = benchmark.main(["--op", "batch_norm", "--dtype", "bfloat16", "--batch-size", "2", "--repeats", "1",
                             "--warmup", "1", "--no-compile", "--json", str(report)])
    assert status == 0
    assert "cifarnet-bench: bfloat16 (torch.autocast on float32 tensors)" in capsys.readouterr().out
    assert json.loads(report.read_text())["config"]["dtype"] == "bfloat16"


def test_bench_rejects_a_bad_batch_size(capsys):
    try:
        benchmark.main(["--batch-size", "0"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "--batch-size must be positive, got 0" in capsys.readouterr().err


def bench_usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit:
        benchmark.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_checks_its_outputs_before_timing_anything(tmp_path, capsys, monkeypatch, option):
    monkeypatch.setattr(benchmark, "benchmark_layer", lambda *args, **kwargs: pytest.fail("timed before checking"))
    folder = tmp_path / "results"
    folder.mkdir()
    assert f"{option} {folder}: it is a folder; expected the path of a file" in bench_usage_error(capsys, [option, str(folder)])
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine")
    under_a_file = blocker / "bench.out"
    err = bench_usage_error(capsys, [option, str(under_a_file)])
    assert f"{option} {under_a_file}: {blocker} is a file" in err and "Traceback" not in err
    assert blocker.read_text() == "mine"


def test_bench_refuses_a_plot_it_could_not_draw_before_timing(tmp_path, capsys, monkeypatch):
    """matplotlib would refuse the format only after the timing (and before --json was written)."""
    monkeypatch.setattr(benchmark, "benchmark_layer", lambda *args, **kwargs: pytest.fail("timed before checking"))
    err = bench_usage_error(capsys, ["--plot", str(tmp_path / "notes.txt")])
    assert f"--plot {tmp_path / 'notes.txt'}: expected a .png file" in err


def test_bench_creates_the_folders_of_its_outputs(tmp_path):
    report, plot = tmp_path / "missing" / "dir" / "bench.json", tmp_path / "other" / "bench.png"
    status = benchmark.main(
        ["--op", "batch_norm", "--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-compile",
         "--json", str(report), "--plot", str(plot)]
    )
    assert status == 0
    assert [r["op"] for r in json.loads(report.read_text())["results"]] == ["batch_norm"]
    assert plot.stat().st_size > 0


def test_bench_model_creates_the_folder_of_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args: [])
    monkeypatch.setattr(benchmark, "format_model_table", lambda rows: "")
    report = tmp_path / "missing" / "bench.json"
    assert benchmark.main(["--model", next(iter(benchmark_models.MODEL_INPUT_SIZES)), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["results"] == []


def test_bench_model_in_channels_last(tmp_path):
    report = tmp_path / "bench.json"
    status = benchmark.main(
        ["--model", "convnet", "--memory-format", "channels_last", "--batch-size", "2", "--repeats", "1",
         "--warmup", "1", "--json", str(report)]
    )
    assert status == 0
    (row,) = json.loads(report.read_text())["results"]
    assert row["memory_format"] == "channels_last" and row["fused_chains"] > 0
    # Against the faster of native's two layouts, timed in the same run.
    times = row["forward_backward_ms"]
    assert row["other_memory_format"] == "contiguous"
    best_native = min(times["native"], times["native_other_layout"])
    assert row["speedup_vs_best_native"] == pytest.approx(best_native / times["fused"])


def test_bench_model_resnet_fuses_its_chains_and_saves_less_at_the_size_given(tmp_path):
    report = tmp_path / "bench.json"
    status = benchmark.main(
        ["--model", "resnet18", "--input-size", "32", "--memory-format", "channels_last", "--batch-size", "2",
         "--repeats", "1", "--warmup", "1", "--json", str(report)]
    )
    assert status == 0
    (row,) = json.loads(report.read_text())["results"]
    # the stem, and each block's bn1 -> relu -> conv2
    assert row["shape"] == "3x32x32 (N=2)" and row["fused_chains"] == 1 + 8
    # the stem keeps its pooled output and argmax bytes instead of its conv, BN and ReLU
    # outputs; each block its bn1's input instead of the rectified tensor too
    assert row["saved_bytes"]["fused"] < row["saved_bytes"]["native"]


@pytest.mark.parametrize("argv, message", [
    (["--input-size", "32"], "--input-size sizes the inputs of --model"),
    (["--model", "resnet18", "--input-size", "0"], "--input-size must be positive, got 0"),
    (["--model", "vgg11", "--input-size", "16"], "--input-size 16: vgg11 cannot take 16x16 inputs (Given input size: (512x1x1)"),
    (["--model", "convnet", "--input-size", "4"], "--input-size 4: convnet cannot take 4x4 inputs ("),
])
def test_bench_refuses_input_sizes_it_cannot_use(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(benchmark, "benchmark_model", lambda *args, **kwargs: pytest.fail("timed before checking"))
    assert message in bench_usage_error(capsys, argv)


@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads: expected 1 to "),
    (["--threads", str((os.cpu_count() or 1) + 1)], f"--threads: expected 1 to {os.cpu_count()} (the CPUs this machine has)"),
    (["--warmup", "-1"], "--warmup must not be negative, got -1"),
    (["--device", "meta"], "--device meta: cifarnet-bench times the CPU and CUDA kernels; expected cpu or cuda[:N]"),
])
def test_bench_refuses_threads_warmups_and_devices_it_cannot_use(argv, message, capsys):
    assert message in bench_usage_error(capsys, argv)


def test_bench_model_refuses_both_layouts(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--model", "convnet", "--memory-format", "both"])
    assert "--model times one layout per run" in capsys.readouterr().err


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="configures glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_fresh_tensors():
    # Two 8 MiB tensors freed together leave more than glibc's default trim threshold free at
    # the top of its heap: by default it returns that memory, and the next pair page-faults
    # in afresh (2048 faults a pair here).
    assert _timing.keep_freed_memory()

    def pair():
        first, second = (torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(2))
        return first, second

    # NB: faults are counted for this thread only, and the fills run on it: other threads of the
    # process (a previous test's workers) fault on their own schedule.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):
            pair()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(5):
            pair()
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
    finally:
        torch.set_num_threads(threads)
    assert faults < 256


@pytest.mark.slow
@pytest.mark.skipif(not torch.backends.cuda.is_built(), reason="a CPU-only torch never looks for CUDA_HOME")
def test_the_compiled_variant_prints_no_cuda_home_warning(tmp_path):
    """torch.compile on the CPU imports torch.utils.cpp_extension, whose import logs "No CUDA
    runtime is found, using CUDA_HOME=..." wherever a CUDA build of torch sees no GPU but finds a
    toolkit (a CUDA_HOME, an nvcc on PATH): a note about building CUDA extensions that a CPU
    benchmark's user should not have to wonder about. Reproduced here on any CUDA build: no GPU
    visible, CUDA_HOME set to an existing folder."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "CUDA_HOME": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    command = [sys.executable, "-m", "cifarnet.benchmark", "--op", "batch_norm", "--batch-size", "2", "--repeats", "1",
               "--warmup", "0", "--threads", "1", "--memory-format", "contiguous"]  # fmt: skip
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| **total** |" in result.stdout  # the compiled variant ran
    assert "No CUDA runtime is found" not in result.stderr, result.stderr


# The implementations: which run where, what the JSON and the table carry about each.

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and cifarnet built with CUDA")


def test_the_cpu_times_what_it_did_and_cuda_adds_autotune_and_graphs():
    assert benchmark_ops.device_implementations(CPU) == ["native", "compiled", "fused"]
    assert benchmark_ops.device_implementations(CPU, compile=False) == ["native", "fused"]
    assert benchmark_ops.device_implementations(CUDA) == list(benchmark_ops.IMPLEMENTATIONS)
    assert benchmark_ops.device_implementations(CUDA, compile=False) == ["native", "native_graph", "fused", "fused_graph"]
    for name, implementation in benchmark_ops.IMPLEMENTATIONS.items():
        assert implementation.cuda_only == (implementation.graph or implementation.compile_mode is not None), name
        assert implementation.fused == name.startswith("fused"), name


def test_bench_picks_implementations_in_table_order():
    args = benchmark.parse_args(["--device", "cuda", "--implementations", "fused_graph,compiled,fused,native,native"])
    assert args.implementations == ["native", "compiled", "fused", "fused_graph"]
    args = benchmark.parse_args(["--device", "cuda", "--no-compile", "--implementations", "native,compiled_autotune,fused"])
    assert args.implementations == ["native", "fused"]
    assert benchmark.parse_args([]).implementations == ["native", "compiled", "fused"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--implementations", "native,fused,native_graph"], "implementations ['native_graph'] need --device cuda, got cpu"),
        (["--implementations", "native,fused,eager"], "unknown implementations ['eager']"),
        (["--device", "cuda", "--implementations", "native,fused_graph"], "must include native and fused (the ratios' references), missing ['fused']"),
    ],
)
def test_bench_rejects_implementations_it_cannot_compare(capsys, argv, message):
    assert message in bench_usage_error(capsys, argv)


def test_help_says_what_each_implementation_is(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    for name, implementation in benchmark_ops.IMPLEMENTATIONS.items():
        assert f"{name} {implementation.description}" in printed
    assert "max-autotune-no-cudagraphs" in printed and f"after {benchmark_ops.GRAPH_WARMUP} warm-up calls on a side stream" in printed


def synthetic_rows(implementations, times_of) -> list[dict]:
    """cifarnet-bench's rows for the study's layers, with the times ``times_of(layer, mode)``
    gives (one per implementation) and made-up saved bytes."""
    rows = []
    for index, layer in enumerate(benchmark_ops.STUDY_LAYERS):
        row = {"op": "batch_norm", "layer": layer.name, "shape": layer.describe(8)}
        for mode in benchmark_ops.MODES:
            row[f"{mode}_ms"] = dict(zip(implementations, times_of(index, mode), strict=True))
        row["saved_bytes"] = {"native": 4 << 20, "fused": (1 + index) << 20}
        rows.append(row)
    return rows


times_ms = st.floats(min_value=0.01, max_value=100.0, allow_nan=False)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_summarise_compares_every_implementation_with_native_and_the_fastest_with_the_fastest(data):
    implementations = list(benchmark_ops.IMPLEMENTATIONS)
    drawn = data.draw(st.lists(times_ms, min_size=6 * 6, max_size=6 * 6))
    rows = synthetic_rows(implementations, lambda layer, mode: drawn[6 * (2 * layer + benchmark_ops.MODES.index(mode)):][:6])
    total = benchmark_report.summarise(rows, implementations)
    natives = ["native", "compiled", "compiled_autotune", "native_graph"]
    for entry in rows + [total]:
        for mode in benchmark_ops.MODES:
            times, speedup, fastest = entry[f"{mode}_ms"], entry["speedup"][mode], entry["fastest"][mode]
            for name in implementations[1:]:
                assert speedup[name] == pytest.approx(times["native"] / times[name])
            assert speedup["fused_vs_compiled"] == pytest.approx(times["compiled"] / times["fused"])
            assert speedup["fused_graph_vs_native_graph"] == pytest.approx(times["native_graph"] / times["fused_graph"])
            assert times[fastest["native"]] == min(times[name] for name in natives)
            assert times[fastest["fused"]] == min(times["fused"], times["fused_graph"])
            assert speedup["fused_vs_best_native"] == pytest.approx(times[fastest["native"]] / times[fastest["fused"]])
    for mode in benchmark_ops.MODES:
        for name in implementations:
            assert total[f"{mode}_ms"][name] == pytest.approx(sum(row[f"{mode}_ms"][name] for row in rows))


def test_the_table_shows_graph_and_autotune_columns_and_the_best_against_the_best():
    implementations = list(benchmark_ops.IMPLEMENTATIONS)
    rows = synthetic_rows(implementations, lambda layer, mode: [2.0, 1.5, 1.2, 1.0, 1.6, 0.5])
    total = benchmark_report.summarise(rows, implementations)
    lines = benchmark_report.format_table(rows, total, implementations).splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    for mode in ("fwd", "fwd+bwd"):
        names = ["native", "compiled", "compiled autotune", "native graph", "fused", "fused graph"]
        at = header.index(f"{mode} native")
        assert header[at : at + 9] == [*(f"{mode} {name}" for name in names), f"{mode} speedup", f"{mode} vs compiled", f"{mode} vs best native"]
    total_cells = dict(zip(header, (cell.strip() for cell in lines[-1].strip("|").split("|")), strict=True))
    assert total_cells["fwd native graph"] == "3.00" and total_cells["fwd fused graph"] == "1.50"
    assert total_cells["fwd speedup"] == "1.25x"  # fused eager against native eager
    assert total_cells["fwd vs compiled"] == "0.94x"  # fused eager against compiled native
    assert total_cells["fwd vs best native"] == "2.00x"  # fused graph against native graph
    assert total["fastest"]["forward"] == {"native": "native_graph", "fused": "fused_graph"}


def cpu_table_header(implementations) -> str:
    rows = synthetic_rows(implementations, lambda layer, mode: [1.0] * len(implementations))
    return benchmark_report.format_table(rows, benchmark_report.summarise(rows, implementations), implementations).splitlines()[0]


def test_the_cpu_table_keeps_the_columns_the_docs_transcribe():
    transcript = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert cpu_table_header(["native", "compiled", "fused"]) in transcript.splitlines()
    assert cpu_table_header(["native", "fused"]) == (
        "| layer | shape | fwd native | fwd fused | fwd speedup | fwd+bwd native | fwd+bwd fused | fwd+bwd speedup "
        "| saved native MiB | saved fused MiB | saved ratio |"
    )


def test_graph_implementations_time_a_captured_call(monkeypatch):
    """The wiring on the CPU: each graph implementation's call, per mode, goes through
    CapturedCall (replaced here by one that runs the call eagerly), and the row carries its times."""
    captured = []

    class EagerCapture:
        def __init__(self, call):
            captured.append(call)
            self.call = call

        def __call__(self):
            self.call()

    monkeypatch.setattr(benchmark_ops, "CapturedCall", EagerCapture)
    op, layer = benchmark_ops.OPS["conv2d_batch_norm_relu_max_pool2d"], benchmark_ops.STUDY_LAYERS[2]
    implementations = ["native", "native_graph", "fused", "fused_graph"]
    row = benchmark_ops.benchmark_layer(op, layer, 2, torch.float32, CPU, torch.channels_last, implementations, 1, 1)
    assert len(captured) == 2 * len(benchmark_ops.MODES)
    for mode in benchmark_ops.MODES:
        assert set(row[f"{mode}_ms"]) == set(implementations) and min(row[f"{mode}_ms"].values()) > 0
    total = benchmark_report.summarise([row], implementations)
    assert {"fused_vs_best_native", "fused_graph_vs_native_graph", "native_graph", "fused_graph"} <= set(total["speedup"]["forward"])


def test_a_failed_capture_says_what_it_captured(monkeypatch):
    def refuse(call):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(benchmark_ops, "CapturedCall", refuse)
    op, layer = benchmark_ops.OPS["batch_norm"], benchmark_ops.STUDY_LAYERS[2]
    tensors = benchmark_ops.make_tensors(op, layer, 2, torch.float32, CPU, torch.contiguous_format)
    block = benchmark_ops.make_block(op, "fused_graph")
    with pytest.raises(RuntimeError, match=r"fused_graph: capturing batch_norm at conv3 \(forward\) in a CUDA graph failed: operation not"):
        benchmark_ops.make_timed_call(op, "fused_graph", block, tensors, layer, "forward")


def load_benchmark_script(name: str):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_summary_carries_the_best_against_the_best_where_the_run_has_it(tmp_path):
    implementations = list(benchmark_ops.IMPLEMENTATIONS)
    rows = synthetic_rows(implementations, lambda layer, mode: [2.0, 1.5, 1.2, 1.0, 1.6, 0.5])
    total = benchmark_report.summarise(rows, implementations)
    report = tmp_path / "bench.json"
    report.write_text(json.dumps({"results": [{"op": "batch_norm", "memory_format": "channels_last", "layers": rows, "total": total}]}))
    ratios = load_benchmark_script("gpu_summary").bench_ratios(report)
    assert ratios["batch_norm conv1"]["forward"] == 1.25 and ratios["batch_norm total"]["saved_ratio"] == 0.5
    assert ratios["batch_norm total"]["fused_vs_best_native"] == {"forward": 2.0, "forward_backward": 2.0}
    assert ratios["batch_norm conv2"]["fastest"]["forward_backward"] == {"native": "native_graph", "fused": "fused_graph"}
    # a run from before (fused and native eager only) reads as it did
    old = load_benchmark_script("gpu_summary").bench_ratios(REPO / "docs" / "gpu" / "h200_bench_float32.json")
    assert set(old["batch_norm total"]) == {"forward", "forward_backward", "saved_ratio"}


def test_gpu_summary_counts_only_tests_that_ran_on_the_gpu(tmp_path):
    # A CPU-only run: the modules that need a GPU skipped, the CPU tests beside them passed.
    cases = [
        ("tests.test_cuda_launches", "test_the_launch_table_budgets_every_counted_pass", ""),
        ("tests.study.test_cuda_graph", "test_the_step_is_refused_on_the_cpu", ""),
        ("tests.test_batch_norm", "test_forward[cpu-float32]", ""),
        ("tests.test_cuda", "test_ops_run_on_the_current_stream", "<skipped/>"),
        ("tests.test_batch_norm", "test_forward[cuda-float32]", "<skipped/>"),
    ]
    xml = "".join(f'<testcase classname="{c}" name="{n}">{body}</testcase>' for c, n, body in cases)
    (tmp_path / "tests.xml").write_text(f"<testsuite>{xml}</testsuite>")
    summary = load_benchmark_script("gpu_summary")
    counts = summary.test_counts(tmp_path / "tests.xml")
    assert (counts["passed"], counts["skipped"], counts["device_cuda_passed"]) == (3, 2, 0)
    (tmp_path / "tests.xml").write_text(
        '<testsuite><testcase classname="tests.test_cuda" name="test_ops_run_on_the_current_stream"/>'
        '<testcase classname="tests.test_batch_norm" name="test_forward[cuda-float32]"/></testsuite>'
    )
    assert summary.test_counts(tmp_path / "tests.xml")["device_cuda_passed"] == 2


def test_the_plot_adds_the_best_against_the_best_with_graphs(tmp_path):
    implementations = list(benchmark_ops.IMPLEMENTATIONS)
    rows = synthetic_rows(implementations, lambda layer, mode: [2.0, 1.5, 1.2, 1.0, 1.6, 0.5])
    total = benchmark_report.summarise(rows, implementations)
    result = {"op": "batch_norm", "memory_format": "channels_last", "implementations": implementations, "layers": rows, "total": total}
    benchmark_report.plot_speedups([result], str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0


# On a GPU: every implementation, captured graphs included, in one run.


@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_on_cuda_times_eager_and_graph_implementations(tmp_path, capsys, dtype):
    report = tmp_path / "bench.json"
    status = benchmark.main(["--device", "cuda", "--dtype", dtype, "--batch-size", "4", "--repeats", "2", "--warmup", "1",
                             "--no-compile", "--memory-format", "channels_last", "--json", str(report)])  # fmt: skip
    assert status == 0
    printed = capsys.readouterr().out
    assert f"GPU: {torch.cuda.get_device_name()}" in printed
    tf32 = f"torch.backends.cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, torch.backends.cuda.matmul.allow_tf32="
    assert (tf32 in printed) == (dtype == "float32")
    assert "| fwd native graph |" in printed and "| fwd fused graph |" in printed and "| fwd vs best native |" in printed
    saved = json.loads(report.read_text())
    implementations = ["native", "native_graph", "fused", "fused_graph"]
    assert list(saved["implementations"]) == implementations and saved["gpu"]["torch.backends.cudnn.allow_tf32"] in (True, False)
    assert {result["op"] for result in saved["results"]} == set(benchmark_ops.OPS)
    for result in saved["results"]:
        for entry in result["layers"] + [result["total"]]:
            for mode in benchmark_ops.MODES:
                assert set(entry[f"{mode}_ms"]) == set(implementations) and min(entry[f"{mode}_ms"].values()) > 0
                assert entry["speedup"][mode]["fused_vs_best_native"] > 0


@needs_cuda
@pytest.mark.parametrize("implementation", ["native", "fused"])
def test_a_captured_cuda_call_replays_the_op(implementation):
    """A replay runs the kernels again: batch norm's running mean moves at each replay as at
    each eager call, and the output is the eager one."""
    op, layer = benchmark_ops.OPS["batch_norm"], benchmark_ops.STUDY_LAYERS[1]
    tensors = benchmark_ops.make_tensors(op, layer, 8, torch.float32, CUDA, torch.channels_last)
    tensors["input"] += 1  # a mean away from the running mean's start
    eager_tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    block = benchmark_ops.make_block(op, implementation)
    for mode in benchmark_ops.MODES:
        captured = benchmark_ops.CapturedCall(benchmark_ops.make_call(block, tensors, op, layer, mode))
        eager = benchmark_ops.make_call(block, eager_tensors, op, layer, mode)
        for _ in range(benchmark_ops.GRAPH_WARMUP):
            eager()
        for _ in range(4):
            captured()
            output = eager()
        torch.cuda.synchronize()
        torch.testing.assert_close(tensors["running_mean"], eager_tensors["running_mean"])
        torch.testing.assert_close(tensors["running_var"], eager_tensors["running_var"])
        if mode == "forward":
            torch.testing.assert_close(captured.output, output)


@needs_cuda
@pytest.mark.slow
def test_bench_on_cuda_compiles_in_both_modes(tmp_path):
    report = tmp_path / "bench.json"
    status = benchmark.main(["--device", "cuda", "--op", "batch_norm", "--batch-size", "4", "--repeats", "1", "--warmup", "1",
                             "--implementations", "native,compiled,compiled_autotune,fused", "--json", str(report)])  # fmt: skip
    assert status == 0
    total = json.loads(report.read_text())["results"][0]["total"]
    assert set(total["forward_backward_ms"]) == {"native", "compiled", "compiled_autotune", "fused"}
    assert {"compiled", "compiled_autotune", "fused_vs_compiled", "fused_vs_best_native"} <= set(total["speedup"]["forward"])


def test_train_steps_reports_against_the_fastest_native_and_floor_of_each_precision(tmp_path, capsys):
    """benchmarks/train_steps.py's report: each fused step against the fastest native step of
    the run, and as a multiple of the faster floor in its own precision, whatever the layout."""
    train_steps = load_benchmark_script("train_steps")
    times = {
        "native-fp32": [120.0], "native-fp32-cl": [100.0], "native-bf16-cl": [90.0],
        "fused-fp32-cl": [80.0], "fused-bf16-cl": [60.0],
        "floor-fp32": [70.0], "floor-fp32-cl": [75.0], "floor-bf16": [50.0], "floor-bf16-cl": [40.0],
    }
    args = argparse.Namespace(variant="full", batch_size=128, rounds=1, steps=1, load=None, json=str(tmp_path / "steps.json"))
    train_steps.report(args, torch.device("cpu"), times)
    results = json.loads((tmp_path / "steps.json").read_text())["results"]
    assert results["fused-fp32-cl"]["speedup_vs_best_native"] == pytest.approx(90.0 / 80.0)
    assert results["fused-fp32-cl"]["floor"] == "floor-fp32" and results["fused-fp32-cl"]["multiple_of_floor"] == pytest.approx(80.0 / 70.0)
    assert results["fused-bf16-cl"]["floor"] == "floor-bf16-cl" and results["fused-bf16-cl"]["multiple_of_floor"] == pytest.approx(60.0 / 40.0)
    assert "1.14x its floor (floor-fp32)" in capsys.readouterr().out
