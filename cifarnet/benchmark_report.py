"""``cifarnet-bench``'s results: the ratios against native (``summarise``), the Markdown table
and the plot."""

from __future__ import annotations

from collections.abc import Sequence

from cifarnet.benchmark_ops import IMPLEMENTATIONS, MODES

def summarise(rows: list[dict], implementations: Sequence[str]) -> dict:
    """Totals over the rows, and each row's and the total's ratios (> 1 means faster).

    Per mode, ``entry["speedup"][mode]`` holds each implementation's speedup over native eager
    (native ms / its ms, keyed by its name) and the named ratios: ``fused_vs_compiled`` (compiled
    ms / fused ms, where compiled was timed), ``fused_vs_best_native`` (the fastest non-fused
    implementation's ms / the fastest fused one's) and ``fused_graph_vs_native_graph`` (where
    both were timed); ``entry["fastest"][mode]`` names the fastest ``native`` (non-fused) and
    ``fused`` implementations. The total's fastest are those of the three layers' summed times.
    ``saved_ratio`` is fused / native saved-for-backward bytes.
    """
    total = {f"{mode}_ms": {name: sum(row[f"{mode}_ms"][name] for row in rows) for name in implementations} for mode in MODES}
    total["saved_bytes"] = {name: sum(row["saved_bytes"][name] for row in rows) for name in ("native", "fused")}
    native_side = [name for name in implementations if not IMPLEMENTATIONS[name].fused]
    fused_side = [name for name in implementations if IMPLEMENTATIONS[name].fused]
    for entry in rows + [total]:
        entry["speedup"], entry["fastest"] = {}, {}
        for mode in MODES:
            times = entry[f"{mode}_ms"]
            speedup = {name: times["native"] / times[name] for name in implementations if name != "native"}
            if "compiled" in implementations:
                speedup["fused_vs_compiled"] = times["compiled"] / times["fused"]
            fastest = {"native": min(native_side, key=times.get), "fused": min(fused_side, key=times.get)}
            speedup["fused_vs_best_native"] = times[fastest["native"]] / times[fastest["fused"]]
            if "native_graph" in implementations and "fused_graph" in implementations:
                speedup["fused_graph_vs_native_graph"] = times["native_graph"] / times["fused_graph"]
            entry["speedup"][mode], entry["fastest"][mode] = speedup, fastest
        entry["saved_ratio"] = entry["saved_bytes"]["fused"] / entry["saved_bytes"]["native"]
    return total


def best_across_layouts(results: list[dict]) -> dict:
    """Per op timed in both layouts, per mode: the fastest native (non-fused) and fused
    implementation over both layouts' totals, as ``{"native": [layout, implementation, ms],
    "fused": [...], "fused_vs_best_native": ratio}``. Each layout's table compares within its
    layout only; a user picks the layout too."""
    by_op: dict[str, list[dict]] = {}
    for result in results:
        by_op.setdefault(result["op"], []).append(result)
    best = {}
    for op, layouts in by_op.items():
        if len(layouts) < 2:
            continue
        best[op] = {}
        for mode in MODES:
            candidates = {"native": [], "fused": []}
            for result in layouts:
                for name, ms in result["total"][f"{mode}_ms"].items():
                    side = "fused" if IMPLEMENTATIONS[name].fused else "native"
                    candidates[side].append([result["memory_format"], name, ms])
            fastest = {side: min(entries, key=lambda entry: entry[2]) for side, entries in candidates.items()}
            best[op][mode] = {**fastest, "fused_vs_best_native": fastest["native"][2] / fastest["fused"][2]}
    return best


def shows_best_native(implementations: Sequence[str]) -> bool:
    """Whether the table has a "vs best native" column: where a CUDA-only implementation was
    timed (on the CPU, "vs compiled" already compares with the other native one)."""
    return any(IMPLEMENTATIONS[name].cuda_only for name in implementations)


def format_table(rows: list[dict], total: dict, implementations: Sequence[str]) -> str:
    """A Markdown table: each implementation's ms (its name, underscores as spaces), per mode;
    "speedup" is the fused op's over native eager, "vs compiled" its over torch.compile'd native,
    "vs best native" (with CUDA-only implementations) the fastest fused implementation's over
    the fastest native one (x, > 1 is faster); then saved MiB."""
    compiled = "compiled" in implementations
    best_native = shows_best_native(implementations)
    header = ["layer", "shape"]
    for mode in ("fwd", "fwd+bwd"):
        header += [f"{mode} {name.replace('_', ' ')}" for name in implementations] + [f"{mode} speedup"]
        header += ([f"{mode} vs compiled"] if compiled else []) + ([f"{mode} vs best native"] if best_native else [])
    header += ["saved native MiB", "saved fused MiB", "saved ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cells(entry, name, shape):
        out = [name, shape]
        for mode in MODES:
            times, speedup = entry[f"{mode}_ms"], entry["speedup"][mode]
            out += [f"{times[implementation]:.2f}" for implementation in implementations] + [f"{speedup['fused']:.2f}x"]
            out += [f"{speedup['fused_vs_compiled']:.2f}x"] if compiled else []
            out += [f"{speedup['fused_vs_best_native']:.2f}x"] if best_native else []
        out += [f"{entry['saved_bytes'][k] / 2**20:.1f}" for k in ("native", "fused")] + [f"{entry['saved_ratio']:.3f}"]
        return out

    for row in rows:
        lines.append("| " + " | ".join(cells(row, row["layer"], row["shape"])) + " |")
    lines.append("| " + " | ".join(cells(total, "**total**", "three layers")) + " |")
    return "\n".join(lines)


def plot_speedups(results: list[dict], path: str) -> None:
    """Bar charts of the fused op's speedup over native eager (and torch.compile, and of the
    fastest fused implementation over the fastest native one where CUDA-only implementations
    ran), one panel per op and memory format, forward and forward+backward per layer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(results), 3.6), layout="constrained")
    axes = figure.subplots(1, len(results), squeeze=False)[0]
    for ax, result in zip(axes, results):
        entries = result["layers"] + [result["total"] | {"layer": "total"}]
        names = [entry["layer"] for entry in entries]
        series = [(f"{label} vs native", mode, "fused") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        if "fused_vs_compiled" in result["total"]["speedup"]["forward"]:
            series += [(f"{label} vs compiled", mode, "fused_vs_compiled") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        if shows_best_native(result.get("implementations", ())):
            series += [(f"{label} best vs best native", mode, "fused_vs_best_native") for mode, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd"))]
        width = 0.8 / len(series)
        for i, (label, mode, key) in enumerate(series):
            positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            ax.bar(positions, [entry["speedup"][mode][key] for entry in entries], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("speedup of the fused op (x)")
        ax.set_title(f"{result['op']}\n{result['memory_format']}", fontsize=9)
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)
