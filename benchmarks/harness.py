"""The pytest side of the benchmark suite: the run's context, cases, result rows and
:func:`run_case`. Environment facts are ``env.py``, timing/memory/OOM ``measure.py``, tables
``tables.py``.

Every benchmark case goes through :func:`run_case`, which

1. runs the work once (warm-up / compilation), out-of-memory → an ``OOM`` row;
2. measures peak memory in one separate execution (``measure.peak_memory``);
3. times it (``measure.time_rounds``: CUDA events on a GPU, perf_counter on CPU; rounds chosen
   so a case takes ~``target_s``) and hands the samples to pytest-benchmark's statistics;
4. derives tokens/s, TFLOP/s, % of the device's dense peak and GB/s, and records a row.

Correctness is the caller's job and happens *before* :func:`run_case` (a wrong kernel never
gets a time): see ``benchmarks/test_bench_attention.py``.

No module state: the run's options, rows, notes and CPU-speed cache live in one
:class:`BenchContext`, created by ``conftest.py`` (``context(config)``, fixture ``bench_ctx``);
each :class:`Case` carries it.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import pytest

from . import env, measure

MODES = ("fwd", "bwd", "fwdbwd")
# kernel FLOPs convention: forward 4·N²·C per group, backward 2.5× forward
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}
# Conservative sustained attention throughput used only to predict (and skip) very long calls
# on a GPU: fp32 attention kernels run without tensor cores.
GUARD_TFLOPS_CUDA = {"fp32": 40.0, "bf16": 350.0, "fp16": 350.0}


@dataclass
class BenchContext:
    """One benchmark run: its options (from the command line) and what it collects."""
    size: str = "small"           # "small" (CPU-sized shapes) or "full" (the paper's shapes)
    target_s: float = 0.4         # time budget of the timed rounds of one case
    min_rounds: int = 3
    max_rounds: int = 200
    max_call_s: float = 0.3       # CPU: skip (with reason) calls estimated slower than this
    max_call_s_cuda: float = 5.0  # CUDA: the same, with a throughput guess (GUARD_TFLOPS_CUDA)
    cpu_mem_limit: int = 8 << 30  # CPU: cases estimated to need more are reported OOM (est.)
    enforce_targets: bool = False # turn the CPU memory/speed target into an assertion
    threads_policy: str = ""
    rows: list = field(default_factory=list)   # every case, including OOM / skipped / failed
    notes: dict = field(default_factory=dict)  # free-text results (FLOPs, memory target)
    cpu_speed: measure.CpuSpeed = field(default_factory=measure.CpuSpeed)
    memo: dict = field(default_factory=dict)   # per-suite caches (e.g. the correctness gate's)

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("rows", "notes", "cpu_speed", "memo")}

    def env_info(self) -> dict:
        return env.env_info(self.size)


CONTEXT_KEY = pytest.StashKey[BenchContext]()


def context(config) -> BenchContext:
    """The run's context (created in conftest's pytest_configure)."""
    return config.stash[CONTEXT_KEY]


# --------------------------------------------------------------------------- rows
@dataclass
class Case:
    """What a row describes. ``flops_fwd`` is the kernel FLOPs of one forward; ``bytes_moved``
    the bytes a data-movement case reads + writes (for GB/s); ``ctx`` the run it belongs to."""
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
    ctx: BenchContext | None = field(default=None, repr=False, compare=False)

    def base_row(self) -> dict:
        row = {k: getattr(self, k) for k in
               ("suite", "name", "impl", "mode", "dtype", "B", "C", "H", "W", "g", "N")}
        row.update(self.extra)
        return row


def record(case: Case, status: str, **values) -> dict:
    row = case.base_row()
    row["status"] = status
    row.update(values)
    case.ctx.rows.append(row)
    return row


def skip_case(case: Case, reason: str, status: str = "skip") -> None:
    """Record a non-timed row (skip / OOM / n/a) and skip the test with the reason."""
    record(case, status, reason=reason)
    pytest.skip(f"{status}: {reason}" if status != "skip" else reason)


def oom_case(case: Case, exc: BaseException | str, estimated: bool = False) -> None:
    """Record an OOM row and skip. Call it outside ``except`` blocks where possible, so that
    the failed allocation's traceback (and the tensors its frames hold) is already gone."""
    msg = exc if isinstance(exc, str) else measure.oom_message(exc)
    measure.free_memory()
    skip_case(case, msg, status="OOM (est.)" if estimated else "OOM")


# --------------------------------------------------------------------------- one case
def _to_pytest_benchmark(benchmark, samples: list[float], iterations: int) -> bool:
    """Hand measured per-call seconds to pytest-benchmark's statistics (its table and JSON), so
    that CUDA-event times are what it reports. False if this pytest-benchmark lacks the hook."""
    make = getattr(benchmark, "_make_stats", None)
    if make is None or getattr(benchmark, "disabled", False) or benchmark._mode:
        return False
    benchmark._mode = "ssbsn measure.time_rounds"
    stats = make(iterations)
    for t in samples:
        stats.update(t * iterations)  # pytest-benchmark stores round durations
    return True


def run_case(benchmark, case: Case, work: Callable[..., Any],
             setup: Callable[[], tuple] | None = None, *, warmup: int = 1,
             measure_memory: bool = True) -> dict:
    """Warm up, measure memory, time and record ``work`` (see module docstring).

    ``setup``, if given, runs before every call and is not timed; it returns the positional
    arguments of ``work`` as a tuple (used for backward-only timing: setup = the forward).
    """
    ctx = case.ctx

    def once():
        args = setup() if setup else ()
        out = work(*args)
        measure.sync()
        return out

    def timed():
        nonlocal measure_memory
        peak, method = None, "not measured"
        t_first = time.perf_counter()
        if warmup == 0 and measure_memory:       # expensive case: the first call measures memory
            peak, method = measure.peak_memory(once)
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
            peak, method = measure.peak_memory(once)
        rounds, iterations = measure.choose_rounds(t0, ctx.target_s, ctx.min_rounds,
                                                   ctx.max_rounds)
        if setup is not None:
            iterations = 1
        if getattr(benchmark, "disabled", False):  # --benchmark-disable: one untimed call
            benchmark.pedantic(once)                 # and our own estimate
            samples, rounds = [t0], 0
        else:
            samples = measure.time_rounds(work, rounds, iterations, setup)
        return peak, method, t_first, rounds, iterations, samples

    result, oom = measure.oom_guard(timed)
    if oom is not None:
        oom_case(case, oom)
    peak, method, t_first, rounds, iterations, samples = result
    _to_pytest_benchmark(benchmark, samples, iterations)
    median, best = statistics.median(samples), min(samples)
    values = derived_metrics(case, median)
    values.update(peak_mem_mib=None if peak is None else peak / 2**20, mem_method=method,
                  rounds=rounds, iterations=iterations, first_call_s=t_first,
                  min_ms=best * 1e3, timer=measure.TIMER, loadavg_1m=env.loadavg())
    row = record(case, "ok", **values)
    benchmark.extra_info.update({k: v for k, v in row.items() if _jsonable(v)})
    return row


def derived_metrics(case: Case, median_s: float) -> dict:
    flops = case.flops_fwd * MODE_FLOP_FACTOR.get(case.mode, 1.0)
    tflops = flops / median_s / 1e12 if flops else None
    peak = env.peak_tflops(case.dtype)
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


# --------------------------------------------------------------------------- time guard
def too_slow_reason(ctx: BenchContext, flops: float, dtype: str, overhead: float = 1.0
                    ) -> str | None:
    """A reason to skip a call predicted slower than max_call_s (CPU: from this CPU's measured
    matmul speed; CUDA: from GUARD_TFLOPS_CUDA). ``overhead``: the call's time over that of
    its matmuls alone (softmax, N×N traffic)."""
    if not flops:
        return None
    if env.on_cuda():
        est = flops / (GUARD_TFLOPS_CUDA.get(dtype, 40.0) * 1e12)
        limit = ctx.max_call_s_cuda
    else:
        rate = min(ctx.cpu_speed.gflops(dtype), ctx.cpu_speed.gflops("fp32"))
        est = overhead * flops / (rate * 1e9)
        limit = ctx.max_call_s
    if est > limit:
        hint = "; runs with --bench-size full" if ctx.size == "small" else ""
        return (f"~{est:.1f} s per call predicted (> --bench-max-call-s {limit}){hint}")
    return None
