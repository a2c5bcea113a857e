"""The cifarnet-bench command on a tiny batch: it runs every op and reports what it measured."""

from __future__ import annotations

import json

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
