"""The cifarnet-bench command on a tiny batch: it runs every op and reports what it measured."""

from __future__ import annotations

import json
import platform
import resource

import pytest
import torch

from cifarnet import benchmark


def test_bench_command_writes_tables_json_and_plot(tmp_path, capsys):
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    status = benchmark.main(
        ["--batch-size", "2", "--repeats", "1", "--warmup", "1", "--no-compile", "--memory-format", "both",
         "--json", str(report), "--plot", str(plot)]
    )
    assert status == 0
    printed = capsys.readouterr().out
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


def test_bench_rejects_a_bad_batch_size(capsys):
    try:
        benchmark.main(["--batch-size", "0"])
    except SystemExit as exit:
        assert exit.code == 2
    assert "--batch-size must be positive, got 0" in capsys.readouterr().err


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="configures glibc's malloc")
def test_keep_freed_memory_stops_page_faults_on_fresh_tensors():
    # Two 8 MiB tensors freed together leave more than glibc's default trim threshold free at
    # the top of its heap: by default it returns that memory, and the next pair page-faults
    # in afresh (2048 faults a pair here).
    assert benchmark.keep_freed_memory()

    def pair():
        first, second = (torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(2))
        return first, second

    for _ in range(3):
        pair()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        pair()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 256
