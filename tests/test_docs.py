"""The README and docs/ pages stay true: their relative links lead somewhere, and the README's
headline tables show what the files they summarise say (the study's runs in docs/results, the
benchmarks' JSON), so neither can go stale silently."""

from __future__ import annotations

import itertools
import json
import re
from datetime import date
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]
RESULTS = REPO / "docs" / "results" / "results.md"

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED_CODE = re.compile(r"^```.*?^```", flags=re.MULTILINE | re.DOTALL)
STUDY_MARKER = "<!-- checked by tests/test_docs.py: rows of the \"Over seeds\" table in docs/study.md"
SPEED_MARKER = "<!-- checked by tests/test_docs.py against the JSON file each row names -->"


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code spans, where brackets are not links."""
    return re.sub(r"`[^`]*`", "", FENCED_CODE.sub("", text))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2``... after repeats."""
    seen: dict[str, int] = {}
    for line in FENCED_CODE.sub("", page.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6} +(.*?) *#*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading[1].lower()).replace(" ", "-")
            seen[slug] = seen.get(slug, -1) + 1
    return {slug if n == 0 else f"{slug}-{n}" for slug, count in seen.items() for n in range(count + 1)}


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page.read_text(encoding="utf-8")))
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]  # fmt: skip


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_lead_to_files_and_headings(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(README)}
    pages = {page.resolve() for page in (REPO / "docs").glob("*.md")}
    assert pages <= linked, f"not linked from README.md: {sorted(str(p.relative_to(REPO)) for p in pages - linked)}"


def table_after(text: str, marker: str) -> list[dict[str, str]]:
    """The first markdown table after the line starting with ``marker``, as one dict per row."""
    assert marker in text, f"no line {marker}"
    lines = itertools.dropwhile(lambda line: not line.startswith("|"), text.split(marker, 1)[1].splitlines()[1:])
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]  # fmt: skip
    header, body = rows[0], rows[2:]
    return [dict(zip(header, row, strict=True)) for row in body]


@pytest.mark.skipif(not RESULTS.is_file(), reason="no docs/results/results.md")
def test_readme_results_are_rows_of_the_generated_table_over_seeds():
    shown = table_after(README.read_text(encoding="utf-8"), STUDY_MARKER)
    generated = {row["configuration"]: row for row in table_after(RESULTS.read_text(encoding="utf-8"), "## Over seeds")}
    assert [row["configuration"] for row in shown] == [f"{variant}-fused" for variant in (
        "baseline", "normalized", "augmented", "momentum", "dropout", "full")]  # fmt: skip
    # What was run, beside the study's 50 epochs on 50,000 images: a short run can't pass for one.
    assert all({"epochs", "training images"} <= row.keys() for row in shown)
    for row in shown:
        source = generated[row["configuration"]]
        assert row == {column: source[column] for column in row}, (
            f"README.md's {row['configuration']} row is not docs/results/results.md's: copy it over"
        )


# A pytest pass count ("724 passed", "87 of the 95 CUDA tests passed") goes stale with the
# next test added. A page may state one only as a dated record of a past run: the block it
# is in (a fenced block, else the lines up to a blank line, a fence or a comment) comes right
# after a line <!-- dated record: YYYY-MM-DD ... -->.
PASS_COUNT = re.compile(r"\b\d[\d,]* passed\b|\b\d[\d,]* (?:of (?:the )?\d[\d,]* )?(?:[\w+-]+ )?tests? passed\b")
DATED_RECORD = re.compile(r"<!-- dated record: (\d{4}-\d{2}-\d{2})\b.*-->$")


def undated_pass_counts(text: str) -> list[str]:
    """The lines of markdown ``text`` that state a pass count outside a dated record, as
    ``"line N: ..."``."""
    lines = text.splitlines()
    found, index = [], 0
    while index < len(lines):
        if not lines[index].strip():
            index += 1
            continue
        start = index
        if lines[index].startswith("```"):  # a fenced block, to its closing fence
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                index += 1
            index += 1
        elif lines[index].startswith("<!--"):  # a comment is a block of its own, as in CommonMark
            index += 1
            continue
        else:
            while index < len(lines) and lines[index].strip() and not lines[index].startswith(("```", "<!--")):
                index += 1
        marker = DATED_RECORD.match(lines[start - 1].strip()) if start > 0 else None
        if marker is not None:
            date.fromisoformat(marker[1])  # a real date
            continue
        found += [f"line {n + 1}: {lines[n].strip()}" for n in range(start, min(index, len(lines))) if PASS_COUNT.search(lines[n])]
    return found


def test_the_pass_count_check_finds_undated_counts():
    record = "<!-- dated record: 2026-11-30, CI -->"
    assert undated_pass_counts("Text.\n\n724 passed, 14 skipped\n") == ["line 3: 724 passed, 14 skipped"]
    assert undated_pass_counts(f"{record}\n```\n$ pytest\n= 724 passed in 2s =\n```\nThen 9 tests passed.\n") == [
        "line 6: Then 9 tests passed."
    ]
    assert undated_pass_counts(f"{record}\n- 87 of the 95 CUDA tests passed\n- all 52 passed\n") == []
    assert undated_pass_counts(f"{record}\n\n87 of the 95 CUDA tests passed\n") == ["line 3: 87 of the 95 CUDA tests passed"]
    assert undated_pass_counts("every test passed; 3 processes passed the barrier\n") == []
    assert undated_pass_counts("Text\n<!-- dated record: 2026-11-30 -->\n728 passed\n") == []
    with pytest.raises(ValueError):
        undated_pass_counts("<!-- dated record: 2026-13-01 -->\n728 passed\n")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_pages_state_pass_counts_only_as_dated_records(page):
    found = undated_pass_counts(page.read_text(encoding="utf-8"))
    assert not found, (
        f"{page.relative_to(REPO)} states a test count, stale with the next test added: leave it out, or mark its "
        "block as a past run's by a line <!-- dated record: YYYY-MM-DD ... --> right above it; " + "; ".join(found)
    )


def test_readme_speed_ratios_are_those_of_the_benchmark_files():
    def load(path: str) -> dict:
        return json.loads((REPO / path).read_text(encoding="utf-8"))

    def three_layers(path: str, op: str) -> dict:
        return next(result["total"] for result in load(path)["results"]
                    if result["op"] == op and result["memory_format"] == "channels_last")  # fmt: skip

    steps = load("docs/train_steps_cpu.json")["results"]
    fastest_fp32 = min(steps[name]["median_ms"] for name in ("native-fp32", "native-fp32-cl", "native-fp32-compile"))
    assert fastest_fp32 == steps["native-fp32-compile"]["median_ms"], "the README names torch.compile as the fastest"
    avx2_runs = [run["results"] for run in load("docs/train_steps_avx2_winograd.json")["runs"]]
    assert all(run["best_native"] == "native-fp32-cl" for run in load("docs/train_steps_avx2_winograd.json")["runs"])
    convnet = {dtype: load(f"docs/bench_convnet_{dtype}.json")["results"][0] for dtype in ("float32", "bfloat16")}
    cpu = three_layers("docs/bench.json", "conv2d_batch_norm_relu_max_pool2d")
    gpu = three_layers("docs/gpu/h200_bench_float32.json", "conv2d_batch_norm_relu_max_pool2d")
    expected = [  # (file, fused vs native, saved ratio)
        ("docs/train_steps_cpu.json", steps["fused-bf16-cl"]["speedup_vs_best_native"], None),
        ("docs/train_steps_cpu.json", fastest_fp32 / steps["fused-fp32-cl"]["median_ms"], None),
        ("docs/train_steps_avx2_winograd.json", min(run["fused-fp32-cl"]["speedup_vs_best_native"] for run in avx2_runs), None),
        ("docs/bench_convnet_float32.json", convnet["float32"]["speedup"], convnet["float32"]["saved_ratio"]),
        ("docs/bench_convnet_bfloat16.json", convnet["bfloat16"]["speedup"], convnet["bfloat16"]["saved_ratio"]),
        ("docs/bench.json", cpu["speedup"]["forward_backward"]["fused"], cpu["saved_ratio"]),
        ("docs/gpu/h200_bench_float32.json", gpu["speedup"]["forward_backward"]["fused"], gpu["saved_ratio"]),
    ]
    shown = [
        (LINK.search(row["from"])[1], row["fused vs native"], row["saved for backward, fused / native"])
        for row in table_after(README.read_text(encoding="utf-8"), SPEED_MARKER)
    ]
    cells = [(path, f"{ratio:.2f}×", "" if saved is None else f"{saved:.3f}") for path, ratio, saved in expected]
    assert shown == cells, "README.md's speed table is not what the benchmark files say: copy the figures over"
