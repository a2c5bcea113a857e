"""The cifarnet-bench command on a tiny batch: it runs every op and reports what it measured."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cifarnet
from cifarnet import benchmark

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
    for op in benchmark.OPS:
        assert f"{op}, contiguous:" in printed and f"{op}, channels_last:" in printed
    results = json.loads(report.read_text())["results"]
    assert {(r["op"], r["memory_format"]) for r in results} == {(op, f) for op in benchmark.OPS for f in benchmark.MEMORY_FORMATS}
    for result in results:
        assert [row["layer"] for row in result["layers"]] == [layer.name for layer in benchmark.STUDY_LAYERS]
        for row in result["layers"]:
            assert all(row["forward_ms"][name] > 0 for name in ("native", "fused"))
            if benchmark.OPS[result["op"]].conv:  # the fused layers keep less for the backward
                assert 0 < row["saved_bytes"]["fused"] < row["saved_bytes"]["native"]
    assert plot.stat().st_size > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_the_cpu_runs_every_implementation_under_autocast(dtype):
    op, layer = benchmark.OPS["conv2d_relu_max_pool2d"], benchmark.STUDY_LAYERS[2]
    tensors = benchmark.make_tensors(op, layer, 2, torch.float32, torch.device("cpu"), torch.channels_last)
    for implementation in ("native", "fused"):
        block = benchmark.make_block(op, implementation, dtype)
        assert block(benchmark.leaves(tensors, False, False)).dtype == dtype, implementation
        assert benchmark.make_block(op, implementation)(tensors).dtype == torch.float32


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
    assert benchmark.main(["--model", next(iter(benchmark.MODEL_INPUT_SIZES)), "--json", str(report)]) == 0
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


def test_bench_model_refuses_both_layouts(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--model", "convnet", "--memory-format", "both"])
    assert "--model times one layout per run" in capsys.readouterr().err


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="configures glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_fresh_tensors():
    # Two 8 MiB tensors freed together leave more than glibc's default trim threshold free at
    # the top of its heap: by default it returns that memory, and the next pair page-faults
    # in afresh (2048 faults a pair here).
    assert benchmark.keep_freed_memory()

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
