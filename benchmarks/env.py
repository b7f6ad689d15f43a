"""Environment facts of a benchmark run: the device, its dense peaks, versions, date, commit.

Pure queries (no state): recorded in the JSON's machine_info, the report's header and
``benchmarks/gpu_check.py``'s env step.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (non-sparse) tensor-core peaks in TFLOP/s, by a substring of the device name.
# fp32 rows are compared with the TF32 peak (the fastest fp32-input matmul the device offers).
PEAK_TFLOPS = {
    "H100": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},   # SXM5
    "H200": {"bf16": 989.5, "fp16": 989.5, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
}
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_cuda() -> bool:
    return device().type == "cuda"


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


def peak_tflops(dtype: str) -> float | None:
    """The device's dense peak for a dtype name ("fp32", "bf16", "fp16"); None on CPU."""
    if not on_cuda():
        return None
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(dtype)
    return None


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception as e:  # noqa: BLE001
        return f"not importable ({type(e).__name__})"


def git_commit() -> str:
    """``git describe`` of the checkout, "+ uncommitted files" when the tree is dirty."""
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                text=True, timeout=5, cwd=ROOT).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                 timeout=5, cwd=ROOT).stdout
        if commit and changed.strip() and not commit.endswith("-dirty"):
            commit += " + uncommitted files"
    except Exception:  # noqa: BLE001
        commit = ""
    return commit or "uncommitted"


def loadavg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def env_info(bench_size: str = "") -> dict:
    """Device, versions and date of this run."""
    cuda = on_cuda()
    info = {
        "device": device_name(),
        "device_type": device().type,
        "torch": torch.__version__,
        "triton": triton_version(),
        "cuda": torch.version.cuda or "none",
        "cudnn": str(torch.backends.cudnn.version()) if cuda else "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model_name(),
        "cpu_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "bench_size": bench_size,
        "git_commit": git_commit(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "loadavg_1m": loadavg(),
    }
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["sm_count"] = p.multi_processor_count
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info
