"""Measurement: timing, peak memory and the out-of-memory guard, the same for every benchmark
(the pytest suite through ``harness.run_case``, and ``benchmarks/gpu_check.py``).

Timing: on CUDA each round is bracketed by CUDA events (device time of the queued work, no
host synchronisation inside the round); on CPU by ``time.perf_counter``. Memory: CUDA's
``max_memory_allocated`` above what was allocated before, or on CPU the allocator's
high-water mark reconstructed from ``torch.profiler``'s memory events (tracemalloc does not
see torch's allocator); or, for a whole process (``memprobe.py``, ``denoise_memory.py``), its
resident-memory high-water mark from /proc (:func:`proc_kib`, :func:`reset_peak_rss`).
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- out of memory
def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg)


def oom_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def free_memory() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def oom_guard(fn: Callable[[], Any]) -> tuple[Any, str | None]:
    """(fn(), None), or (None, message) when fn ran out of memory; other errors propagate.
    The message is built inside the handler and the memory freed outside it, once the failed
    allocation's traceback (and the tensors its frames hold) is gone."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        msg = oom_message(e)
    free_memory()
    return None, msg


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


def peak_memory(fn: Callable[[], Any]) -> tuple[float | None, str]:
    """(peak bytes allocated by one execution of fn() above what was allocated before, method)."""
    free_memory()
    if _cuda():
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


def proc_kib(field: str) -> int:
    """A field of /proc/self/status in KiB ("VmRSS", "VmHWM": the peak resident memory)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: ``echo 5 > clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- timing
TIMER = "CUDA events" if torch.cuda.is_available() else "time.perf_counter"


def time_rounds(work: Callable[..., Any], rounds: int, iterations: int = 1,
                setup: Callable[[], tuple] | None = None) -> list[float]:
    """Seconds per call of ``work`` for each of ``rounds`` rounds of ``iterations`` calls.
    ``setup`` (untimed) runs before each round and returns work's positional arguments."""
    times = []
    for _ in range(rounds):
        args = setup() if setup else ()
        if _cuda():
            sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iterations):
                work(*args)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3 / iterations)
        else:
            t = time.perf_counter()
            for _ in range(iterations):
                work(*args)
            times.append((time.perf_counter() - t) / iterations)
    return times


def bench_ms(fn: Callable[[], Any], warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() after ``warmup`` calls (CUDA events / perf_counter)."""
    for _ in range(warmup):
        fn()
    sync()
    times = sorted(time_rounds(fn, max(reps, 1)))
    return times[len(times) // 2] * 1e3


def choose_rounds(t0: float, target_s: float, min_rounds: int, max_rounds: int
                  ) -> tuple[int, int]:
    """(rounds, iterations) so that timing takes ~target_s, at least min_rounds rounds."""
    t0 = max(t0, 1e-6)
    iterations = 1
    if _cuda() and t0 < 1e-3:      # amortise the per-round event overhead
        iterations = min(50, math.ceil(1e-3 / t0))
    rounds = math.ceil(target_s / (t0 * iterations))
    return max(min_rounds, min(max_rounds, rounds)), iterations


# --------------------------------------------------------------------------- CPU speed
@dataclass
class CpuSpeed:
    """Measured batched-matmul throughput of this CPU (GFLOP/s) per dtype, measured once per
    run (the cache lives in the run's context, not in the module)."""
    gflops_by_dtype: dict = field(default_factory=dict)

    def gflops(self, dtype: str) -> float:
        if dtype not in self.gflops_by_dtype:
            dt = DTYPES[dtype]
            a = torch.randn(16, 512, 64).to(dt)
            b = torch.randn(16, 64, 512).to(dt)
            a @ b
            t = time.perf_counter()
            for _ in range(3):
                a @ b
            t = (time.perf_counter() - t) / 3
            self.gflops_by_dtype[dtype] = 2 * 16 * 512 * 512 * 64 / t / 1e9
        return self.gflops_by_dtype[dtype]
