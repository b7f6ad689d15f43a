"""Benchmark harness: device facts, timing through pytest-benchmark, peak memory, OOM handling
and the result rows that end up in the summary table, the JSON and benchmarks/report.py.

Every benchmark case goes through :func:`run_case`, which

1. runs the work once (warm-up / compilation), catching out-of-memory → an ``OOM`` row;
2. measures peak memory in one separate execution (CUDA: ``max_memory_allocated`` above the
   inputs; CPU: the allocator's high-water mark reconstructed from ``torch.profiler``'s memory
   events — tracemalloc does not see torch's allocator);
3. times it with ``benchmark.pedantic`` (rounds chosen so a case takes ~``target_s``);
4. derives tokens/s, TFLOP/s, % of the device's dense peak and GB/s, and records a row.

Correctness is the caller's job and happens *before* :func:`run_case` (a wrong kernel never
gets a time): see ``benchmarks/test_bench_attention.py``.
"""
from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

# --------------------------------------------------------------------------- configuration
# Filled in by benchmarks/conftest.py from the command line.
CONFIG: dict[str, Any] = {
    "size": "small",          # "small" (CPU-sized shapes) or "full" (the paper's shapes)
    "target_s": 0.4,          # time budget of the timed rounds of one case
    "min_rounds": 3,
    "max_rounds": 200,
    "max_call_s": 0.3,        # CPU: skip (with reason) calls estimated slower than this
    "max_call_s_cuda": 5.0,   # CUDA: the same, with a throughput guess (GUARD_TFLOPS_CUDA)
    "cpu_mem_limit": 8 << 30, # CPU: cases estimated to need more are reported OOM (est.)
    "enforce_targets": False, # turn the issue-3 memory/speed target into an assertion
    "threads_policy": "",
}

ROWS: list[dict] = []          # every case, including OOM / skipped / failed ones
NOTES: dict[str, str] = {}     # free-text results (FLOPs derivation, memory target verdict)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "bwd", "fwdbwd")
# kernel FLOPs convention (SPEC.md): forward 4·N²·C per group, backward 2.5× forward
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_cuda() -> bool:
    return device().type == "cuda"


def sync() -> None:
    if on_cuda():
        torch.cuda.synchronize()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    if on_cuda():
        return torch.cuda.get_device_name()
    return f"CPU: {cpu_model_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


# Dense (non-sparse) tensor-core peaks in TFLOP/s, by a substring of the device name.
# fp32 rows are compared with the TF32 peak (the fastest fp32-input matmul the device offers).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},   # SXM5
    "H200": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_tflops(dtype: str) -> float | None:
    if not on_cuda():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def env_info() -> dict:
    """Device, versions and date: recorded in machine_info and in the report's header."""
    try:
        import triton
        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_v = f"not importable ({type(e).__name__})"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5,
                                cwd=os.path.dirname(os.path.dirname(__file__))).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                 timeout=5, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
        if commit and changed.strip() and not commit.endswith("-dirty"):
            commit += " + uncommitted files"
    except Exception:  # noqa: BLE001
        commit = ""
    info = {
        "device": device_name(),
        "device_type": device().type,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if on_cuda() else "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "cpu_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "bench_size": CONFIG["size"],
        "git_commit": commit or "uncommitted",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if on_cuda():
        p = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["sm_count"] = p.multi_processor_count
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


# --------------------------------------------------------------------------- errors
def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg
        or isinstance(exc, MemoryError))


def free_memory() -> None:
    gc.collect()
    if on_cuda():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- rows
@dataclass
class Case:
    """What a row describes. ``flops_fwd`` is the kernel FLOPs of one forward (SPEC.md);
    ``bytes_moved`` the bytes a data-movement case reads + writes (for GB/s)."""
    suite: str                      # "attention", "e2e", "conv", "memtarget", ...
    name: str                       # shape name, e.g. "train-g4"
    impl: str
    mode: str = "fwd"
    dtype: str = "fp32"
    B: int = 0
    C: int = 0
    H: int = 0
    W: int = 0
    g: int | None = None
    N: int | None = None
    tokens: int = 0                 # pixels processed per call (tokens/s)
    flops_fwd: float = 0.0
    bytes_moved: float = 0.0
    extra: dict = field(default_factory=dict)

    def base_row(self) -> dict:
        row = {k: getattr(self, k) for k in
               ("suite", "name", "impl", "mode", "dtype", "B", "C", "H", "W", "g", "N")}
        row.update(self.extra)
        return row


def record(case: Case, status: str, **values) -> dict:
    row = case.base_row()
    row["status"] = status
    row.update(values)
    ROWS.append(row)
    return row


def skip_case(case: Case, reason: str, status: str = "skip") -> None:
    """Record a non-timed row (skip / OOM / n/a) and skip the test with the reason."""
    record(case, status, reason=reason)
    pytest.skip(f"{status}: {reason}" if status != "skip" else reason)


def oom_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def oom_case(case: Case, exc: BaseException | str, estimated: bool = False) -> None:
    """Record an OOM row and skip. Call it outside ``except`` blocks where possible, so that
    the failed allocation's traceback (and the tensors its frames hold) is already gone."""
    msg = exc if isinstance(exc, str) else oom_message(exc)
    free_memory()
    skip_case(case, msg, status="OOM (est.)" if estimated else "OOM")


# --------------------------------------------------------------------------- memory
def _profiler_peak_bytes(fn: Callable[[], Any]) -> int:
    """High-water mark of CPU allocator bytes during fn(), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def measure_peak_memory(fn: Callable[[], Any]) -> tuple[float | None, str]:
    """Peak bytes allocated by one execution of fn() above what was allocated before it."""
    free_memory()
    if on_cuda():
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        return float(torch.cuda.max_memory_allocated() - base), "cuda.max_memory_allocated"
    try:
        return float(_profiler_peak_bytes(fn)), "cpu profiler (allocator high-water mark)"
    except Exception as e:  # noqa: BLE001 - the profiler is optional, the timing is not
        return None, f"n/a ({type(e).__name__})"


# --------------------------------------------------------------------------- timing
def _choose_rounds(t0: float) -> tuple[int, int]:
    """(rounds, iterations) so that timing takes ~target_s, at least min_rounds rounds."""
    t0 = max(t0, 1e-6)
    iterations = 1
    if on_cuda() and t0 < 1e-3:      # amortise the per-round synchronisation
        iterations = min(50, math.ceil(1e-3 / t0))
    rounds = math.ceil(CONFIG["target_s"] / (t0 * iterations))
    return max(CONFIG["min_rounds"], min(CONFIG["max_rounds"], rounds)), iterations


def run_case(benchmark, case: Case, work: Callable[..., Any],
             setup: Callable[[], tuple] | None = None, *, warmup: int = 1,
             measure_memory: bool = True) -> dict:
    """Warm up, measure memory, time and record ``work`` (see module docstring).

    ``setup``, if given, runs before every call and is not timed; it returns the positional
    arguments of ``work`` as a tuple (used for backward-only timing: setup = the forward).
    """
    def once():
        args = setup() if setup else ()
        out = work(*args)
        sync()
        return out

    def timed_target(*args):
        out = work(*args)
        sync()
        return out

    try:
        peak, method = None, "not measured"
        t_first = time.perf_counter()
        if warmup == 0 and measure_memory:       # expensive case: the first call measures memory
            peak, method = measure_peak_memory(once)
            measure_memory = False
        else:
            once()                               # compile / autotune / first touch
        t_first = time.perf_counter() - t_first
        t0 = t_first
        for _ in range(warmup):                  # steady-state estimate of one call
            t = time.perf_counter()
            once()
            t0 = time.perf_counter() - t
        if measure_memory:
            peak, method = measure_peak_memory(once)
        rounds, iterations = _choose_rounds(t0)
        if setup is not None:
            iterations = 1
            benchmark.pedantic(timed_target, setup=lambda: (setup(), {}), rounds=rounds,
                               warmup_rounds=0, iterations=1)
        else:
            benchmark.pedantic(timed_target, rounds=rounds, warmup_rounds=0,
                               iterations=iterations)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        oom = oom_message(e)
    else:
        oom = None
    if oom is not None:      # outside the except block: the traceback's tensors are released
        oom_case(case, oom)

    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        median, best = float(stats.stats.median), float(stats.stats.min)
    else:  # --benchmark-disable: one untimed call happened; use our own estimate
        median = best = t0
    values = derived_metrics(case, median)
    values.update(peak_mem_mib=None if peak is None else peak / 2**20, mem_method=method,
                  rounds=rounds, iterations=iterations, first_call_s=t_first,
                  min_ms=best * 1e3, loadavg_1m=round(os.getloadavg()[0], 2))
    row = record(case, "ok", **values)
    benchmark.extra_info.update({k: v for k, v in row.items() if _jsonable(v)})
    return row


def derived_metrics(case: Case, median_s: float) -> dict:
    flops = case.flops_fwd * MODE_FLOP_FACTOR.get(case.mode, 1.0)
    tflops = flops / median_s / 1e12 if flops else None
    peak = peak_tflops(case.dtype)
    return {
        "median_ms": median_s * 1e3,
        "tokens_per_s": case.tokens / median_s if case.tokens else None,
        "flops": flops or None,
        "tflops": tflops,
        "pct_peak": (100.0 * tflops / peak) if (tflops is not None and peak) else None,
        "gbps": case.bytes_moved / median_s / 1e9 if case.bytes_moved else None,
    }


def _jsonable(v) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


# --------------------------------------------------------------------------- formatting
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
    import re
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



# --------------------------------------------------------------------------- CPU time guard
_GFLOPS: dict[str, float] = {}


def cpu_gflops(dtype: str) -> float:
    """Measured batched-matmul throughput of this CPU (GFLOP/s), to predict a call's time."""
    if dtype not in _GFLOPS:
        dt = DTYPES[dtype]
        a = torch.randn(16, 512, 64).to(dt)
        b = torch.randn(16, 64, 512).to(dt)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        t = (time.perf_counter() - t) / 3
        _GFLOPS[dtype] = 2 * 16 * 512 * 512 * 64 / t / 1e9
    return _GFLOPS[dtype]


def too_slow_reason(flops: float, dtype: str, overhead: float = 1.0) -> str | None:
    """In the small (CPU) size, a reason to skip a call predicted slower than max_call_s.
    ``overhead``: the call's time over that of its matmuls alone (softmax, N×N traffic)."""
    if not flops:
        return None
    if on_cuda():
        est = flops / (GUARD_TFLOPS_CUDA.get(dtype, 40.0) * 1e12)
        limit = CONFIG["max_call_s_cuda"]
    else:
        rate = min(cpu_gflops(dtype), cpu_gflops("fp32"))
        est = overhead * flops / (rate * 1e9)
        limit = CONFIG["max_call_s"]
    if est > limit:
        hint = "; runs with --bench-size full" if CONFIG["size"] == "small" else ""
        return (f"~{est:.1f} s per call predicted (> --bench-max-call-s {limit}){hint}")
    return None


# Conservative sustained attention throughput used only to predict (and skip) very long calls
# on a GPU: fp32 attention kernels run without tensor cores.
GUARD_TFLOPS_CUDA = {"fp32": 40.0, "bf16": 350.0, "fp16": 350.0}
