"""Formatting of result rows: the columns, the text table of the terminal summary, the markdown
table of ``benchmarks/report.py`` and the grouping of skipped cases. No torch, no pytest."""
from __future__ import annotations

import re

TABLE_COLUMNS = [
    ("suite", "suite"), ("name", "case"), ("shape", "B×C×H×W"), ("g", "g"), ("N", "N"),
    ("dtype", "dtype"), ("mode", "mode"), ("impl", "impl"), ("status", "status"),
    ("median_ms", "median ms"), ("tokens_per_s", "Mtok/s"), ("tflops", "TFLOP/s"),
    ("pct_peak", "% peak"), ("gbps", "GB/s"), ("peak_mem_mib", "peak MiB"),
    ("max_err", "max err"), ("note", "note"),
]


def _fmt(key: str, row: dict) -> str:
    if key == "note":
        if row.get("status") not in ("ok", None):
            return str(row.get("reason", ""))[:90]
        parts = []
        if "@check" in str(row.get("checked_at", "")):
            parts.append(f"checked at {row['checked_at'].split('-', 2)[-1]}")
        if row.get("note"):
            parts.append(str(row["note"])[:80])
        return "; ".join(parts)
    if key == "shape":
        return f"{row.get('B', '')}×{row.get('C', '')}×{row.get('H', '')}×{row.get('W', '')}"
    v = row.get(key)
    if key == "pct_peak" and v is None and row.get("status") == "ok" and row.get("tflops"):
        return "n/a"
    if v is None or v == "":
        return "" if key != "g" else "-"
    if key == "tokens_per_s":
        return f"{v / 1e6:.3g}"
    if key == "median_ms":
        return f"{v:.4g}"
    if key in ("tflops", "gbps", "pct_peak"):
        return f"{v:.3g}"
    if key == "peak_mem_mib":
        return f"{v:,.0f}" if v >= 10 else f"{v:.2g}"
    if key == "max_err":
        return f"{v:.1e}"
    return str(v)


def skip_groups(rows: list[dict]) -> list[tuple[str, str, int, str]]:
    """Skipped rows as (suite, impl, count, reason); predicted-time skips that differ only in
    the predicted time share a line (with the range of the predictions)."""
    groups: dict = {}
    for r in rows:
        if r.get("status") != "skip":
            continue
        reason = str(r.get("reason", ""))
        m = re.search(r"~([\d.]+) s per call", reason)
        k = (r.get("suite"), r.get("impl"), re.sub(r"~[\d.]+ s per call", "~{t} s per call", reason))
        n, ts = groups.get(k, (0, []))
        groups[k] = (n + 1, ts + ([float(m.group(1))] if m else []))
    out = []
    for (suite, impl, reason), (n, ts) in groups.items():
        if ts:
            rng = f"{min(ts):g}" if min(ts) == max(ts) else f"{min(ts):g}-{max(ts):g}"
            reason = reason.replace("{t}", rng)
        out.append((suite, impl, n, reason))
    return out


def markdown_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(k, r).replace("|", "/") for k, _ in columns) + " |")
    return "\n".join(lines)


def text_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    cells = [[title for _, title in columns]] + [[_fmt(k, r) for k, _ in columns] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.ljust(w) for s, w in zip(c, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
