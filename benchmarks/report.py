"""Turn ``pytest benchmarks/ --benchmark-json …`` output into a markdown table and plots.

    python benchmarks/report.py results.json [more.json …] -o benchmarks/results/<name>

Writes into the output folder: ``results.json`` (the input; several inputs are merged into
one file of rows),
``table.md`` (header with device / versions / date, notes, one table per suite, the skipped
cases by reason) and ``time_vs_N.png``, ``memory_vs_N.png``, ``tflops_vs_N.png`` (the
attention sweep over N, one line per implementation, one panel per dtype × mode; OOM cases are
drawn as crosses on the panel's top edge).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.tables import TABLE_COLUMNS, markdown_table, skip_groups  # noqa: E402

KEY = ("suite", "name", "impl", "mode", "dtype", "B", "C", "H", "W", "g")
IMPL_ORDER = ["authors", "reference", "sdpa", "fused", "triton", "gather+sdpa[flash]",
              "gather+sdpa[efficient]", "gather+sdpa[cudnn]", "gather+sdpa[math]",
              "gather+sdpa+compile", "gather+flex", "msa[explicit]", "msa[sdpa]",
              "gather/scatter"]
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwdbwd": 2}
DTYPE_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}
COLUMN_HELP = """\
Columns: **median ms** — median time of one call (CUDA events on a GPU, perf_counter on CPU);
**Mtok/s** — pixels (tokens) processed per second, millions; **TFLOP/s** — kernel FLOPs / time
with forward = 4·N²·C per group (QKᵀ and A·V; MSA: one group of H·W tokens), backward = 2.5×
forward, fwd+bwd = 3.5× (conv rows: 2·C²·taps per pixel); **% peak** — TFLOP/s / the device's
dense peak (H100: bf16 989.5, fp32 rows vs TF32 494.7; n/a on CPU); **GB/s** — bytes read +
written by the gather/scatter (data movement only) / time; **peak MiB** — peak memory of one
call above its inputs (CUDA: `torch.cuda.max_memory_allocated`; CPU: allocator high-water mark
from `torch.profiler` memory events; memtarget rows: peak RSS of an isolated subprocess);
**max err** — max relative error against the oracle, checked before timing. Status **OOM**:
out of memory when run; **OOM (est.)**: not run on CPU because the N×N matrices alone exceed the
memory limit. Modes: fwd = forward without autograd; bwd = backward alone (forward untimed);
fwdbwd = forward + backward; step = training step (fwd+bwd+Adam); infer = tiled R3 denoising."""


def load(paths):
    rows: "OrderedDict" = OrderedDict()
    envs, notes, configs, raw = [], {}, [], []
    for p in paths:
        with open(p) as f:
            data = json.load(f)
        raw.append(data)
        ss = data.get("ssbsn") or {}
        if not ss and "rows" in data:          # SSBSN_BENCH_ROWS output
            ss = data
        env = ss.get("env") or (data.get("machine_info") or {}).get("ssbsn") or {}
        envs.append(env)
        configs.append(ss.get("config", {}))
        notes.update(ss.get("notes", {}))
        src = ss.get("rows")
        if src is None:                        # plain pytest-benchmark JSON: use extra_info
            src = [dict(b.get("extra_info", {}), status="ok") for b in data.get("benchmarks", [])]
        for r in src:
            rows[tuple(r.get(k) for k in KEY)] = r
    return list(rows.values()), envs, notes, configs, raw


def sort_rows(rows):
    suites = {s: i for i, s in enumerate(OrderedDict.fromkeys(r.get("suite", "") for r in rows))}
    names = {s: i for i, s in enumerate(OrderedDict.fromkeys(r.get("name", "") for r in rows))}

    def key(r):
        impl = r.get("impl", "")
        return (suites[r.get("suite", "")], names[r.get("name", "")],
                DTYPE_ORDER.get(r.get("dtype", ""), 9),
                MODE_ORDER.get(r.get("mode"), 9),
                IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)
    return sorted(rows, key=key)


def header(envs, configs) -> str:
    lines = []
    for env, cfg in zip(envs, configs):
        lines += [f"- **Device:** {env.get('device', '?')}",
                  f"- **Versions:** torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, "
                  f"CUDA {env.get('cuda', '?')}, cuDNN {env.get('cudnn', '?')}, "
                  f"Python {env.get('python', '?')}",
                  f"- **Date:** {env.get('date', '?')}; bench size **{env.get('bench_size', '?')}**; "
                  f"git {env.get('git_commit', '?')}; load average at start "
                  f"{env.get('loadavg_1m', '?')}"]
        if env.get("gpu_memory_gib"):
            lines.append(f"- **GPU:** {env['gpu_memory_gib']} GiB, {env.get('sm_count')} SMs, "
                         f"TF32 matmul {env.get('allow_tf32_matmul')}")
        if cfg:
            lines.append(f"- **Config:** " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    seen, out = set(), []
    for ln in lines:                            # merged inputs: keep distinct lines
        if ln not in seen:
            seen.add(ln)
            out.append(ln)
    return "\n".join(out)


def write_table(rows, envs, notes, configs, path):
    parts = ["# SS-BSN benchmark results", "", header(envs, configs), ""]
    for key, text in notes.items():
        parts += [f"## {key}", "", "```", text, "```", ""]
    shown = [r for r in rows if r.get("status") != "skip"]
    for suite in OrderedDict.fromkeys(r.get("suite") for r in shown):
        parts += [f"## {suite}", "", markdown_table([r for r in shown if r.get("suite") == suite],
                                                     TABLE_COLUMNS), ""]
    skipped = skip_groups(rows)
    if skipped:
        parts += ["## skipped cases", "", "| suite | impl | cases | reason |", "|---|---|---|---|"]
        for suite, impl, n, reason in skipped:
            parts.append(f"| {suite} | {impl} | {n} | {reason.replace('|', '/')} |")
        parts.append("")
    failed = [r for r in rows if r.get("status") in ("FAILED", "ERROR")]
    if failed:
        parts += ["## failures", ""] + [f"- {r['suite']}/{r['name']}/{r['impl']}/{r['dtype']}/"
                                        f"{r['mode']}: {r.get('reason', '')}" for r in failed] + [""]
    parts += ["## columns", "", COLUMN_HELP, ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))


def plot(rows, outdir) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    att = [r for r in rows if r.get("suite") == "attention" and r.get("family") != "layout"]
    sweep = [r for r in att if "sweep" in str(r.get("tags", ""))]
    if not sweep:
        sweep = att
    sweep = [r for r in sweep if r.get("status") in ("ok", "OOM", "OOM (est.)")]
    if not sweep:
        return []
    panels = sorted({(r["dtype"], r["mode"]) for r in sweep},
                    key=lambda p: (p[0], MODE_ORDER.get(p[1], 9)))
    impls = [i for i in IMPL_ORDER if any(r["impl"] == i for r in sweep)]
    impls += sorted({r["impl"] for r in sweep} - set(impls))
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
               "#17becf", "#bcbd22", "#7f7f7f", "#000000", "#aec7e8", "#98df8a", "#ff9896"]
    colors = {impl: palette[i % len(palette)] for i, impl in enumerate(impls)}
    g_sweep = next((r.get("g") for r in sweep if r.get("g")), 4)

    def px(r):                      # x = pixels of the map; SS-Attention's N = H·W / g²
        return (r.get("H") or 0) * (r.get("W") or 0)
    markers = "osD^v<>ph*XP+"
    written = []
    for metric, ylabel, fname in (("median_ms", "median time per call (ms)", "time_vs_N.png"),
                                  ("peak_mem_mib", "peak memory above inputs (MiB)",
                                   "memory_vs_N.png"),
                                  ("tflops", "TFLOP/s (4·N²·C per group fwd, ×2.5 bwd)",
                                   "tflops_vs_N.png")):
        n = len(panels)
        cols = min(3, n)
        nrows = -(-n // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.2 * nrows), squeeze=False)
        any_data = False
        for ax, (dt, mode) in zip(axes.flat, panels):
            pts = [r for r in sweep if r["dtype"] == dt and r["mode"] == mode]
            ok_vals = [r[metric] for r in pts if r.get("status") == "ok" and r.get(metric)]
            top = max(ok_vals) * 3 if ok_vals else 1.0
            for i, impl in enumerate(impls):
                ir = sorted((r for r in pts if r["impl"] == impl), key=px)
                ok = [(px(r), r[metric]) for r in ir if r.get("status") == "ok" and r.get(metric)]
                oom = [px(r) for r in ir if str(r.get("status", "")).startswith("OOM")]
                if ok:
                    any_data = True
                    ax.plot(*zip(*ok), marker=markers[i % len(markers)], ms=5, lw=1.5,
                            color=colors[impl], label=impl)
                if oom:
                    ax.scatter(oom, [top] * len(oom), marker="x", s=60, color=colors[impl],
                               label=f"{impl} (OOM)" if not ok else None)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("H·W = pixels of the map (= MSA's tokens)")
            top_ax = ax.secondary_xaxis("top", functions=(lambda v, g=g_sweep: v / g ** 2,
                                                          lambda n, g=g_sweep: n * g ** 2))
            top_ax.set_xlabel(f"SS-Attention N = H·W/{g_sweep ** 2} tokens per group", fontsize=8)
            top_ax.xaxis.set_major_locator(ticker.LogLocator(base=2))
            top_ax.xaxis.set_minor_locator(ticker.NullLocator())
            top_ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            top_ax.tick_params(labelsize=8)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{dt} · {mode}", fontsize=11, loc="left")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        if not any_data:
            plt.close(fig)
            continue
        handles, labels = {}, {}
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(list(handles.values()), list(handles.keys()), loc="lower center",
                   ncol=min(5, len(handles)), fontsize=9, frameon=False)
        shape_note = ""
        if sweep:
            r0 = sweep[0]
            shape_note = f"  (B={r0.get('B')}, C={r0.get('C')}, g={g_sweep}; × on the top edge = OOM)"
        fig.suptitle(f"SS-Attention sweep over N{shape_note}", fontsize=12)
        legend_rows = -(-len(handles) // 5)
        fig.tight_layout(rect=(0, 0.04 + 0.035 * legend_rows, 1, 0.96))
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    ap.add_argument("-o", "--out", required=True, help="output folder")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    rows, envs, notes, configs, raw = load(a.json)
    rows = sort_rows(rows)
    dest = os.path.join(a.out, "results.json")
    if len(raw) == 1:
        if os.path.abspath(a.json[0]) != os.path.abspath(dest):
            for b in raw[0].get("benchmarks", []):     # keep the statistics, drop raw rounds
                (b.get("stats") or {}).pop("data", None)
            with open(dest, "w") as f:
                json.dump(raw[0], f, indent=1)
    else:                                   # merged rows (readable by this script again)
        with open(dest, "w") as f:
            json.dump({"merged_from": a.json,
                       "ssbsn": {"env": envs[0] if envs else {}, "config": configs[0] if configs else {},
                                 "rows": rows, "notes": notes}}, f, indent=1)
    write_table(rows, envs, notes, configs, os.path.join(a.out, "table.md"))
    pngs = plot(rows, a.out)
    print(f"wrote {dest}, {os.path.join(a.out, 'table.md')}" + "".join(f", {p}" for p in pngs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
