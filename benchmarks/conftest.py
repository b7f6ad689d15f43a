"""pytest configuration of the benchmark suite (independent of tests/).

Options (see benchmarks/README.md):
  --bench-size {auto,small,full}   shapes: "small" = CPU-sized, "full" = the paper's shapes;
                                   auto = full on a CUDA machine, small otherwise
  --bench-target-s SECONDS         time spent in the timed rounds of one case
  --bench-max-call-s SECONDS       skip calls predicted slower than this (0.3 s CPU, 5 s GPU)
  --bench-threads {auto,N}         torch.set_num_threads; auto: 1 on a loaded CPU machine
  --bench-cpu-mem-limit GIB        CPU: cases estimated to need more are reported OOM (est.)
  --bench-enforce-targets          fail (not just report) when the CPU memory target is missed
Markers: smoke (CI subset, < 60 s), attention, compile, flops, e2e, conv, memtarget.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from . import harness as H
from . import measure, tables

MARKERS = {
    "smoke": "tiny CI subset of the benchmarks (seconds)",
    "attention": "SS-Attention implementations × shapes × dtypes × modes",
    "compile": "cases that need torch.compile (slow to compile; select or deselect with -m)",
    "flops": "analytic FLOPs (Eq. 6/10) and the counted-FLOPs oracle",
    "e2e": "end-to-end SS-BSN training step and tiled R3 inference",
    "conv": "blind-spot convolutions: CUDA extension vs cuDNN",
    "memtarget": "the CPU memory target at 1×128×264×264 (isolated subprocesses)",
    "gpu": "needs a CUDA device (skipped with a reason without one)",
}


def pytest_addoption(parser):
    g = parser.getgroup("ssbsn benchmarks")
    g.addoption("--bench-size", choices=("auto", "small", "full"), default="auto",
                help="shape set: small (CPU), full (the paper's shapes); auto = full with CUDA")
    g.addoption("--bench-target-s", type=float, default=None,
                help="seconds of timed rounds per case (default 0.1 CPU, 0.5 GPU)")
    g.addoption("--bench-max-call-s", type=float, default=None,
                help="skip calls predicted slower than this (default 0.3 s CPU, 5 s GPU)")
    g.addoption("--bench-threads", default="auto",
                help="torch.set_num_threads for the run: a number, 0 = torch's choice, or "
                     "'auto' (default): 1 on a CPU machine whose load average is ≥ 1 at the "
                     "start (other processes compete: multi-threaded timings would be "
                     "dominated by OpenMP threads waiting for each other), else torch's choice")
    g.addoption("--bench-cpu-mem-limit", type=float, default=None,
                help="GiB; CPU cases estimated above it are reported OOM (est.); "
                     "default: half the machine's RAM")
    g.addoption("--bench-enforce-targets", action="store_true", default=False,
                help="assert the CPU memory/speed target instead of reporting it")


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")
    ctx = H.BenchContext()
    config.stash[H.CONTEXT_KEY] = ctx
    size = config.getoption("--bench-size", "auto")
    if size == "auto":
        size = "full" if torch.cuda.is_available() else "small"
    ctx.size = size
    target = config.getoption("--bench-target-s", None)
    ctx.target_s = target if target is not None else (0.5 if torch.cuda.is_available() else 0.1)
    max_call = config.getoption("--bench-max-call-s", None)
    if max_call is not None:
        ctx.max_call_s = ctx.max_call_s_cuda = max_call
    threads = str(config.getoption("--bench-threads", "auto"))
    if threads == "auto":
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if not torch.cuda.is_available() and load >= 1.0 and torch.get_num_threads() > 1:
            torch.set_num_threads(1)
            ctx.threads_policy = f"auto: 1 thread (load average {load:.2f} at start)"
        else:
            ctx.threads_policy = f"auto: torch default ({torch.get_num_threads()})"
    elif int(threads) > 0:
        torch.set_num_threads(int(threads))
        ctx.threads_policy = f"--bench-threads {threads}"
    else:
        ctx.threads_policy = f"torch default ({torch.get_num_threads()})"
    lim = config.getoption("--bench-cpu-mem-limit", None)
    ctx.cpu_mem_limit = int(lim * 2**30) if lim else _ram_bytes() // 2
    ctx.enforce_targets = config.getoption("--bench-enforce-targets", False)
    # pytest-benchmark's own table: fewer columns unless the user chose some
    opt = config.option
    if getattr(opt, "benchmark_columns", None) == ["min", "max", "mean", "stddev", "median", "iqr",
                                                   "outliers", "ops", "rounds", "iterations"]:
        opt.benchmark_columns = ["median", "iqr", "min", "rounds", "iterations"]


def pytest_report_header(config):
    ctx = H.context(config)
    env = ctx.env_info()
    lines = [f"ssbsn benchmarks: size={ctx.size} device={env['device']} "
             f"threads: {ctx.threads_policy}, timer: {measure.TIMER}",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, "
             f"cuDNN {env['cudnn']}, {env['date']}"]
    load = env.get("loadavg_1m")
    if load is not None and not torch.cuda.is_available() and load > 0.5 * (os.cpu_count() or 1):
        lines.append(f"WARNING: load average {load} on {os.cpu_count()} cores: other processes "
                     "compete for the CPU, timings will be noisy")
    if env["TRITON_INTERPRET"]:
        lines.append("WARNING: TRITON_INTERPRET is set: Triton kernels run in the interpreter")
    return lines


@pytest.fixture(scope="session")
def bench_ctx(request) -> H.BenchContext:
    """The run's context: options, rows, notes (see harness.BenchContext)."""
    return H.context(request.config)


@pytest.fixture(autouse=True)
def _seed_and_free():
    torch.manual_seed(0)
    yield
    measure.free_memory()


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ssbsn"] = H.context(config).env_info()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    ctx = H.context(config)
    output_json["ssbsn"] = {"env": ctx.env_info(), "config": ctx.options(),
                            "rows": [_clean(r) for r in ctx.rows], "notes": dict(ctx.notes)}


def _clean(row: dict) -> dict:
    return {k: v for k, v in row.items()
            if v is None or isinstance(v, (bool, int, float, str))}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ctx = H.context(config)
    rows = ctx.rows
    tr = terminalreporter
    if ctx.notes:
        tr.section("ssbsn benchmark notes")
        for key, text in ctx.notes.items():
            tr.write_line(f"[{key}]")
            tr.write_line(text)
            tr.write_line("")
    if not rows:
        return
    tr.section("ssbsn benchmark summary")
    env = ctx.env_info()
    tr.write_line(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | "
                  f"CUDA {env['cuda']} | size={ctx.size} | {env['date']}")
    shown = [r for r in rows if r["status"] != "skip"]
    for suite in dict.fromkeys(r["suite"] for r in shown):
        tr.write_line("")
        tr.write_line(f"[{suite}]")
        tr.write_line(tables.text_table([r for r in shown if r["suite"] == suite]))
    skipped = tables.skip_groups(rows)
    if skipped:
        tr.write_line("")
        tr.write_line(f"skipped cases ({sum(n for _, _, n, _ in skipped)}), by implementation "
                      "and reason:")
        for suite, impl, n, reason in skipped:
            tr.write_line(f"  {suite}/{impl} ×{n}: {reason}")
    path = os.environ.get("SSBSN_BENCH_ROWS")
    if path:
        with open(path, "w") as f:
            json.dump({"env": env, "rows": [_clean(r) for r in rows], "notes": dict(ctx.notes)},
                      f, indent=1)
