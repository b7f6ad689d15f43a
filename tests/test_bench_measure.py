"""benchmarks/measure.py and benchmarks/tables.py: the timer measures what it is given, the OOM
guard turns only out-of-memory into a message, and the report's table code loads without pytest
or torch (``benchmarks/report.py`` runs where neither is installed)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import measure, tables  # noqa: E402


def test_time_rounds_measures_per_call_seconds():
    calls = []

    def work(d):
        calls.append(d)
        time.sleep(d)

    times = measure.time_rounds(work, rounds=3, iterations=2, setup=lambda: (0.01,))
    assert len(times) == 3 and len(calls) == 6
    assert all(0.01 <= t < 0.5 for t in times), times
    ms = measure.bench_ms(lambda: time.sleep(0.005), warmup=1, reps=3)
    assert 5.0 <= ms < 500.0


def test_oom_guard_reports_oom_and_propagates_other_errors():
    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    value, msg = measure.oom_guard(oom)
    assert value is None and msg.startswith("OutOfMemoryError: CUDA out of memory")
    assert measure.oom_guard(lambda: 7) == (7, None)
    with pytest.raises(KeyError):
        measure.oom_guard(lambda: {}["missing"])


def test_peak_memory_sees_an_allocation():
    peak, method = measure.peak_memory(lambda: torch.empty(4 << 20, dtype=torch.uint8).fill_(1))
    if peak is None:
        pytest.skip(f"no memory method on this machine: {method}")
    assert peak >= 4 << 20, (peak, method)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_process_peak_rss_sees_an_allocation():
    measure.reset_peak_rss()
    base = measure.proc_kib("VmRSS")
    buf = bytearray(64 << 20)  # touched: counted in RSS
    peak = measure.proc_kib("VmHWM")
    del buf
    assert peak - base >= 60 << 10, (base, peak)


def test_tables_and_report_load_without_pytest_or_torch():
    code = ("import sys; import benchmarks.report, benchmarks.tables; "
            "bad = [m for m in ('pytest', 'torch') if m in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [{"suite": "conv", "name": "a", "impl": "torch", "status": "ok", "median_ms": 1.23456,
             "B": 1, "C": 2, "H": 3, "W": 4},
            {"suite": "conv", "name": "b", "impl": "cuda", "status": "skip",
             "reason": "needs CUDA"}]
    md = tables.markdown_table(rows[:1])
    assert "| 1×2×3×4 |" in md and "| 1.235 |" in md
    assert tables.skip_groups(rows) == [("conv", "cuda", 1, "needs CUDA")]
