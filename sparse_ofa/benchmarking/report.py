"""Speedup tables and plots from benchmark rows (used by bench/conftest.py and `sparse-ofa bench`).

A row is a dict: {"name", "group", "median" (seconds), "extra_info"}; extra_info follows the bench
convention (docs/bench.md): kind ("layer" | "e2e"), device, shape, m (tokens) or batch/seq, sparsity,
pattern, impl. Rows whose impl starts with "sparse_ofa" are *candidates*; every other impl is a
*baseline*. A candidate is compared with every baseline row that has the same (kind, device, shape,
m, batch, seq); the ratio is baseline median / candidate median, so > 1 means sparse_ofa is faster.
Sparsity is not part of the key: a baseline runs the dense product whatever the zeros.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

# Baseline columns in this order first (dense fp32, then the INT8 and fp16 references, 2:4 last), any
# other baseline impl after, sorted.
BASELINE_ORDER = ("fp32_linear", "fp32_model", "int_mm", "quantize_dynamic", "fp16_linear",
                  "fp16_model", "semi_structured_2:4")
# The baseline the plot measures speedup against, first one present wins.
PLOT_BASELINE_PREFERENCE = ("int_mm", "quantize_dynamic", "fp32_linear", "fp32_model")
MATCH_FIELDS = ("kind", "device", "shape", "m", "batch", "seq")


def is_candidate(row: dict) -> bool:
    return str(row["extra_info"].get("impl", "")).startswith("sparse_ofa")


def match_key(row: dict) -> tuple:
    info = row["extra_info"]
    return tuple(info.get(f) for f in MATCH_FIELDS)


def baseline_medians(rows: list[dict]) -> dict[tuple, dict[str, float]]:
    """{match key: {baseline impl: fastest median among its rows}}."""
    table: dict[tuple, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if is_candidate(row) or row.get("median") is None:
            continue
        impl, key = row["extra_info"].get("impl", row["name"]), match_key(row)
        table[key][impl] = min(row["median"], table[key].get(impl, math.inf))
    return table


def baseline_columns(rows: list[dict]) -> list[str]:
    present = {r["extra_info"].get("impl", r["name"]) for r in rows if not is_candidate(r)}
    ordered = [b for b in BASELINE_ORDER if b in present]
    return ordered + sorted(present - set(ordered))


def speedup_rows(rows: list[dict]) -> list[dict]:
    """One dict per candidate: its fields, median_ms and {"x_<baseline>": ratio or None}."""
    bases = baseline_medians(rows)
    columns = baseline_columns(rows)
    out = []
    for row in rows:
        if not is_candidate(row) or row.get("median") is None:
            continue
        info = row["extra_info"]
        found = bases.get(match_key(row), {})
        # GPU rows time a CUDA graph of `repeat` calls per round: report one call
        entry = {"group": row.get("group"), "name": row["name"],
                 "median_ms": row["median"] / info.get("repeat", 1) * 1e3,
                 **{f: info.get(f) for f in ("kind", "device", "shape", "m", "batch", "seq",
                                            "sparsity", "pattern", "impl", "cosine_vs_fp32")}}
        for col in columns:
            entry[f"x_{col}"] = found[col] / row["median"] if col in found else None
        out.append(entry)
    out.sort(key=lambda e: tuple(str(e[f]) for f in ("kind", "device", "shape", "m", "batch",
                                                    "pattern", "sparsity", "impl")))
    return out


def _tokens(entry: dict) -> str:
    if entry.get("m") is not None:
        return str(entry["m"])
    if entry.get("batch") is not None:
        return f"{entry['batch']}x{entry.get('seq')}"
    return ""


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    """Markdown table of every candidate's speedup against every baseline of the same key."""
    entries = speedup_rows(rows)
    if not entries:
        return "(no sparse_ofa rows with timings: nothing to compare)"
    columns = baseline_columns(rows)
    head = ["kind", "device", "shape", "M / BxS", "sparsity", "pattern", "impl", "median ms/call"]
    head += [f"x {c}" for c in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [str(e["kind"]), str(e["device"]), str(e["shape"]), _tokens(e),
                 _fmt(e["sparsity"], ".2f"), str(e["pattern"]), str(e["impl"]),
                 _fmt(e["median_ms"], ".3f")]
        cells += [_fmt(e[f"x_{c}"], ".2f") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    cosines = [r for r in rows if r["extra_info"].get("cosine_vs_fp32") is not None]
    if cosines:
        lines.append("")
        lines.append("Embedding cosine vs fp32 (mean over the batch), baselines and sparse_ofa:")
        lines.extend(f"- {r['name']} ({r['extra_info'].get('impl')}): "
                     f"{r['extra_info']['cosine_vs_fp32']:.6f}" for r in cosines)
    return "\n".join(lines)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def plot_speedup(rows: list[dict], path: str | Path) -> Path | None:
    """PNG of speedup vs sparsity, one line per (impl, pattern), one panel per (kind, device, M).

    Speedup is against the first baseline of PLOT_BASELINE_PREFERENCE present for that row,
    geometric mean over shapes. Returns the path, or None when there is nothing to plot."""
    entries = speedup_rows(rows)
    panels: dict[tuple, dict[tuple, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    reference: dict[tuple, str] = {}
    for e in entries:
        base = next((b for b in PLOT_BASELINE_PREFERENCE if e.get(f"x_{b}")), None)
        if base is None or e.get("sparsity") is None:
            continue
        # layer panels average over shapes; e2e panels keep one model each
        panel = (e["kind"], e["device"], _tokens(e), e["shape"] if e["kind"] == "e2e" else "")
        reference.setdefault(panel, base)
        if base != reference[panel]:
            continue  # one reference per panel, so the lines in it are comparable
        panels[panel][(e["impl"], e["pattern"])][float(e["sparsity"])].append(e[f"x_{base}"])
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels, key=lambda k: tuple(str(x) for x in k))
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for (impl, pattern), by_sparsity in sorted(panels[key].items(), key=lambda kv: str(kv[0])):
            xs = sorted(by_sparsity)
            ax.plot(xs, [_geomean(by_sparsity[x]) for x in xs], marker="o", label=f"{impl} {pattern}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        kind, device, tokens, shape = key
        ax.set_title(f"{kind} {shape} {device} M={tokens}", fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"speedup vs {reference[key]}")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict], out_dir: str | Path) -> dict[str, Path]:
    """speedup.md (table), rows.json (the raw rows) and speedup_vs_sparsity.png in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"table": out / "speedup.md", "rows": out / "rows.json"}
    written["table"].write_text(format_table(rows) + "\n")
    written["rows"].write_text(json.dumps(rows, indent=1, default=str))
    png = plot_speedup(rows, out / "speedup_vs_sparsity.png")
    if png is not None:
        written["plot"] = png
    return written
