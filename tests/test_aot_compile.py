"""Every tile configuration of the fused attention kernels compiles for sm_90 (H100/H200) within
the block's shared memory and without register spills — checked on CPU, ahead of time, with
Triton's own compiler and ptxas (``benchmarks/aot.py``), so a regression shows up without a GPU.
The window sizes (TH, TW) must reach every kernel as runtime i32 arguments, not specialised
constants, so that one compiled kernel serves every window.

The compilation runs in its own process: the kernels must be real JIT functions there, while
this test session runs them under the interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _aot(tmp_path, *args, timeout=300):
    out = tmp_path / "aot.json"
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot", "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _check(rows, tiles_class, spill_budget=None):
    sys.path.insert(0, str(ROOT))
    from benchmarks.aot import SM90_SMEM_LIMIT, SPILL_BUDGET
    spill_budget = SPILL_BUDGET if spill_budget is None else spill_budget
    import ssbsn.kernels  # noqa: F401
    K = sys.modules["ssbsn.kernels.ss_attention"]
    kinds = {"_ss_attn_fwd_kernel": "fwd", "_ss_attn_bwd_rows_kernel": "bwd_rows",
             "_ss_attn_bwd_cols_kernel": "bwd_cols"}
    bad = [r for r in rows if r["smem"] > SM90_SMEM_LIMIT or r["spill_stores"] is None
           or r["spill_stores"] > spill_budget]
    assert not bad, "configurations over budget:\n" + "\n".join(map(str, bad))
    fixed = [(r["kernel"], r["ints"]) for r in rows
             if r["ints"].get("TH") != "i32" or r["ints"].get("TW") != "i32"]
    assert not fixed, f"window sizes not runtime i32 arguments: {fixed}"
    for dtype in {r["dtype"] for r in rows}:
        for name, kind in kinds.items():
            got = [r["config"] for r in rows if r["kernel"] == name and r["dtype"] == dtype]
            want = [f"{m}x{n} w{w} s{s}" for m, n, w, s in K.TILES[kind][tiles_class]]
            assert sorted(got) == sorted(want), f"{name} {dtype}: compiled {got}, tiles {want}"


def test_half_channels_last_configs_fit_sm90(tmp_path):
    """bf16 and fp16, channels_last, C = E = 128: every configuration autotuning may pick."""
    rows, table = _aot(tmp_path, "--dtypes", "bf16,fp16", "--layouts", "cl")
    print(table)
    _check(rows, "half")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SSBSN_SLOW_TESTS") != "1",
                    reason="~3 min of compiling: set SSBSN_SLOW_TESTS=1")
def test_fp32_and_wide_configs_fit_sm90(tmp_path):
    """fp32 (3xTF32) tiles at C = 128 and the bf16 C = 256 ("wide") tiles launch; their spills
    stay within the budgets stated in kernels/ss_attention.py (3xTF32's bwd_cols: ~3.3 KB)."""
    rows, _ = _aot(tmp_path, "--dtypes", "fp32", "--layouts", "cl")
    _check(rows, "fp32", spill_budget=4096)
    rows, _ = _aot(tmp_path, "--dtypes", "bf16", "--layouts", "cl", "--channels", "256")
    _check(rows, "wide", spill_budget=2048)
