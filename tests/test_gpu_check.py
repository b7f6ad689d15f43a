"""benchmarks/gpu_check.sh: its dry run (every step of the GPU check on CPU, tiny shapes, Triton's
interpreter) produces a well-formed report, and the pieces that decide a GPU run — the CUDA
toolkit search behind an nvcc wrapper, the report's verdict — behave."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check  # noqa: E402

STEPS = ("cuda-env", "env", "correctness", "timing", "compiled", "train", "conv", "restore",
         "denoise")


def test_dry_run_reports_every_step(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the script sets it for the dry run itself
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for step in ("env", "correctness", "timing", "compiled", "train", "conv", "restore", "denoise",
                 "report"):
        assert f"== {step}: ok" in log, f"step {step} not reported ok:\n{log[-3000:]}"
    _check_carried_time(log)
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] is True and res["TRITON_INTERPRET"] == "1"
    for key in ("device", "driver", "torch", "triton", "cuda", "date", "git_commit"):
        assert res[key], key
    assert set(STEPS) <= set(res["steps"])
    assert all(res["steps"][s]["status"] in ("ok", "skipped") for s in STEPS), res["steps"]
    attn = [c for c in res["checks"] if c["name"].startswith("attention")]
    assert len(attn) == 2 * len(gpu_check.DRY_SHAPES) + 1 and all(c["ok"] for c in attn)
    assert {(c["dtype"], c["layout"]) for c in attn} == {("bf16", "cl"), ("fp16", "nchw"),
                                                         ("fp32", "cl")}
    for c in attn:  # real figures: errors of the kernels and of the same-dtype reference
        assert set(c["errors"]) == {"out", "dx", "dw"}
        assert all(v["err"] <= 2 * v["ref_err"] + 1e-3 for v in c["errors"].values())
    (step,) = [c for c in res["checks"] if c["name"].startswith("SSBSN default backend")]
    # the baseline really is the reference backend, and both errors were measured against fp64
    assert step["ok"] and step["backends"] == ["reference", "fused"]
    for v in step["errors"].values():
        assert 0 < v["ref_err"] and v["err"] <= 2 * v["ref_err"] + 1e-6
    names = [t["name"] for t in res["targets"]]
    assert names == list(gpu_check.TARGETS)
    # the Wiener refinement: the device's result checked against the CPU's, a time, and the
    # bm3d baseline read from the committed wiener benchmark (its own mean, recomputed here)
    (wc,) = [c for c in res["checks"] if c["name"].startswith("Wiener refinement")]
    assert wc["ok"] and wc["psnr_db"] >= 50
    rows = json.loads((ROOT / "benchmarks/results/wiener/results.json").read_text())["images"]
    base = sum(r["bm3d_s"] for r in rows) / len(rows) / (256 * 256 / 1e6)
    f = res["figures"]
    assert f["bm3d_cpu1_s_per_mp"] == pytest.approx(base) and f["wiener_s"] > 0
    # the 12-MP denoise (here 64×48): every step of each model's own inference, both scopes;
    # the quick preset's passes are PD 2 over 2² shifts and the blend's PD 3 Latin square,
    # the paper's one PD pass and R3's 8 rounds
    rows = json.loads((out / "parts" / "denoise.json").read_text())["rows"]
    by = {(r["preset"], r["window"]): r for r in rows}
    assert set(by) == {(p, w) for p in ("quick", "paper") for w in (42, 0)}
    assert by[("quick", 42)]["passes"] == 2 * 2 + 3 and by[("quick", 42)]["wiener_s"] > 0
    assert by[("paper", 42)]["passes"] == 1 + 8 and by[("paper", 42)]["wiener_s"] == 0
    assert all(r["network_s"] <= r["seconds"] for r in rows)
    assert f["denoise_12mp_quick_s"] == by[("quick", 42)]["seconds"]
    assert f["wiener_speedup_vs_bm3d"] == pytest.approx(base * 48 * 64 / 1e6 / f["wiener_s"])
    for t in res["targets"]:
        assert isinstance(t["met"], bool) and "value" in t and "target" in t
    by = {t["name"]: t for t in res["targets"]}
    assert by["fa3_rule_all"]["met"] is True
    assert by["fwd_tflops_N16k"]["value"] > 0 and "not applicable" in by["fwd_tflops_N16k"]["note"]
    timed = {(r["shape"], r["impl"]) for r in res["timing_rows"] if r["status"] == "ok"}
    assert {("train-g4", "triton"), ("train-g4", "triton[nchw]"), ("train-g4", "authors"),
            ("infer-g4", "triton")} <= timed
    # every timed shape has its compiled rows, each measured or saying why not (CPU: why not)
    rows = {(r["shape"], r["impl"]): r for r in res["timing_rows"]}
    for shape in gpu_check.TIMED_SHAPES:
        for impl in gpu_check.COMPILED:
            assert rows[(shape, impl)]["status"] == "ok" or rows[(shape, impl)]["reason"]
    assert ("infer-g4", "authors") not in timed  # N×N per group does not fit there
    # the deterministic mode's repeatability is measured in the dry run too (the interpreter)
    assert f["deterministic_bitwise"] is True and by["deterministic_bitwise"]["met"] is True
    # the paper step as `ssbsn train` runs it, its baselines, and the size searches
    assert f["train_default_settings"]["capture"] == "none"  # the CPU's default: eager
    for k in ("default", "fp32_reference", "authors"):
        assert f[f"train_step_ms_{k}"] > 0
    for k in ("train_crop_default", "train_crop_authors", "infer_size_default",
              "infer_size_authors"):
        assert f[k] and f[f"{k}_complete"] and f[f"{k}_ms"]
    assert f["train_crop_vs_authors"] == f["train_crop_default"] / f["train_crop_authors"]
    # bf16 against fp32 from the same weights on the same batches: both curves, their gap
    curves = f["train_loss_curves"]
    assert len(curves["bf16"]) == len(curves["fp32"]) == gpu_check.LOSS_CURVE_STEPS_DRY
    assert curves["bf16"][0] != curves["fp32"][0]  # autocast really ran the first step in bf16
    assert abs(curves["bf16"][0] / curves["fp32"][0] - 1) < 1e-2  # ... on the same batch
    assert by["train_bf16_loss_gap_se"]["value"] == f["train_bf16_loss_gap"]["gap_in_se"]
    summary = (out / "summary.md").read_text()
    for t in res["targets"]:
        assert f"`{t['name']}`" in summary
    assert "| MET |" in summary and "MISSED" in summary


def _check_carried_time(log: str) -> None:
    """Each step's limit is its own (×4 in a dry run) plus what the steps before it left unused
    of theirs, so the run still ends within the sum of the limits; the dry run's steps end well
    within theirs, so later steps get time carried over."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    base = [(name, 4 * int(s)) for name, s in re.findall(r"^step (\S+) (\d+)$", script, re.M)]
    heads = re.findall(r"^== (\S+) \(limit (\d+)s(?:: (\d+)s \+ (\d+)s left by earlier steps)?\)$",
                       log, re.M)
    ends = {name: int(t) for name, t in re.findall(r"^== (\S+): .* \(total (\d+)s\)$", log, re.M)}
    assert [h[0] for h in heads] == [b[0] for b in base], heads
    planned, previous_end, carried = 0, 0, []
    for (name, own), (_, limit, shown_own, spare) in zip(base, heads):
        spare = int(spare or 0)
        assert int(limit) == own + spare and int(shown_own or own) == own, (name, limit)
        # the time left: the limits so far less the time already spent (at least the previous
        # step's end), never more
        assert spare <= max(planned - previous_end, 0), (name, spare, planned, previous_end)
        carried.append(spare)
        planned += own
        previous_end = ends[name]
    assert carried[0] == 0 and max(carried) > 0, carried


def _exe(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_cuda_home_found_behind_an_nvcc_wrapper(tmp_path, monkeypatch):
    """nvcc on PATH is a wrapper outside the toolkit (as seen on a GPU machine): the toolkit is
    found through what the wrapper's ``nvcc -v`` reports, not the wrapper's folder."""
    kit = tmp_path / "opt" / "cuda-13.0"
    _exe(kit / "bin" / "nvcc", "#!/bin/sh\necho real nvcc\n")
    (kit / "lib64").mkdir()
    (kit / "lib64" / "libcudart.so").write_text("")
    _exe(tmp_path / "wrap" / "bin" / "nvcc",
         f"#!/bin/sh\necho '#$ _HERE_={kit}/bin' >&2\necho '#$ TOP={kit}' >&2\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrap' / 'bin'}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    ce = gpu_check._cuda_env()
    home, how = ce.real_cuda_home()
    assert home == str(kit) and "-v" in how
    assert not ce.is_toolkit(str(tmp_path / "wrap"))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert ce.build_env(False) == {"CUDA_HOME": str(kit), "TORCH_CUDA_ARCH_LIST": "9.0"}
    assert ce.build_env(True, (9, 0))["TORCH_CUDA_ARCH_LIST"] == "9.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert "TORCH_CUDA_ARCH_LIST" not in ce.build_env(False)


def _parts(tmp_path, attn_ok=True, fast=True):
    parts = tmp_path / "parts"
    parts.mkdir(parents=True)
    speed = 2.0 if fast else 1.0
    data = {
        "env": {"step": "env", "status": "ok", "env": {"device": "NVIDIA H200"}},
        "correctness": {"step": "correctness", "status": "ok" if attn_ok else "failed",
                        "checks": [{"name": "attention x bf16 cl", "ok": attn_ok}]},
        # the speed-ups come from the rows: train-g4's best unfused chain is `speed`× slower
        # than the fused kernels (2× elsewhere), the compiled chain 3× slower than "fused"
        # inside torch.compile
        "timing": {"step": "timing", "status": "ok", "rows": [
            {"shape": n, "impl": i, "status": "ok", "ms": ms}
            for n in gpu_check.TIMED_SHAPES
            for i, ms in (("triton", 1.0), ("authors", 20.0),
                          ("gather+sdpa[flash]", speed if n == "train-g4" else 2.0))],
            "figures": {"fwd_tflops_N16k": 500.0, "bwd_tflops_N16k": 400.0}},
        "compiled": {"step": "compiled", "status": "ok", "rows": [
            {"shape": n, "impl": i, "status": "ok", "ms": ms}
            for n in gpu_check.TIMED_SHAPES
            for i, ms in (("gather+sdpa+compile", 3.0), ("fused+compile", 1.0))],
            "figures": {"deterministic_bitwise": True, "host_below_gpu_train-g4": True}},
        "train": {"step": "train", "status": "ok", "figures": {
            "train_b4_512_runs": True, "train_speedup_vs_authors": 4.0,
            "train_speedup_vs_fp32_reference": 2.5, "train_bf16_loss_gap_se": 0.5,
            "train_crop_vs_authors": 2.5}},
        "restore": {"step": "restore", "status": "ok", "figures": {"wiener_speedup_vs_bm3d": 25.0}},
        "denoise": {"step": "denoise", "status": "ok", "figures": {
            "denoise_12mp_quick_s": 3.0 if fast else 6.0, "denoise_12mp_paper_r3_s": 8.0,
            "denoise_12mp_peak_gib": 12.0}},
    }
    for k, v in data.items():
        (parts / f"{k}.json").write_text(json.dumps(v))
    (parts / "conv.rc").write_text("124\n")  # timed out before writing its JSON
    return tmp_path


@pytest.mark.parametrize("attn_ok,fast,dry,code", [
    (True, True, False, 0), (True, False, False, 2), (False, True, False, 1),
    (True, False, True, 0)])
def test_report_verdict(tmp_path, attn_ok, fast, dry, code, capsys):
    out = _parts(tmp_path, attn_ok, fast)
    (out / "parts" / "conv.rc").unlink()
    rc = gpu_check.main(["report", "--out", str(out)] + (["--dry-run"] if dry else []))
    assert rc == code
    res = json.loads((out / "results.json").read_text())
    by = {t["name"]: t for t in res["targets"]}
    assert by["speedup_vs_unfused_train-g4"]["met"] is fast
    assert by["speedup_vs_unfused_train-g4"]["value"] == pytest.approx(2.0 if fast else 1.0)
    assert by["fused_compiled_vs_compiled_chain_infer-g4"]["value"] == pytest.approx(3.0)
    assert res["figures"]["best_unfused_train-g4"] == "gather+sdpa[flash]"
    assert by["fa3_rule_all"]["met"] is attn_ok
    assert by["denoise_12mp_quick_s"]["met"] is fast      # an upper bound: at most 5 s
    assert by["denoise_12mp_peak_gib"]["met"] is True
    row = next(line for line in (out / "summary.md").read_text().splitlines()
               if "`speedup_vs_unfused_train-g4`" in line)
    assert ("| MET" in row) is fast


def test_report_names_a_step_that_timed_out(tmp_path):
    out = _parts(tmp_path)
    assert gpu_check.main(["report", "--out", str(out)]) == 1
    res = json.loads((out / "results.json").read_text())
    assert res["steps"]["conv"] == {"status": "failed", "reason": "timed out"}


def test_largest_size_search_stops_at_the_first_out_of_memory():
    import torch
    tried = []

    def run(n):
        tried.append(n)
        if n > 500:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
        return float(n)
    found = gpu_check.largest_size(run, 120, 40, 4000, 60.0)
    assert found["size"] == 480 and found["oom_at"] == 520 and found["complete"]
    assert all((n - 120) % 40 == 0 for n in tried) and tried[:3] == [120, 160, 240]
    assert set(found["times_ms"]) == {n for n in tried if n <= 500}
    capped = gpu_check.largest_size(lambda n: 1.0, 20, 20, 60, 60.0)
    assert capped["size"] == 40 and capped["oom_at"] is None and capped["complete"]


def test_first_call_check_compares_with_the_eager_kernels():
    """The compiled step's check of the traced op's first call, on CPU (the interpreter's
    kernels, a dry run's shape): the eager kernels against themselves pass; a first call whose
    dx is off by the upstream gradient (as from a buffer the autotuner's timed runs added
    into) fails, with its errors."""
    import argparse

    import torch
    pytest.importorskip("triton")
    a = argparse.Namespace(dry_run=True)
    cpu = torch.device("cpu")
    checks = []
    gpu_check._first_call_check(a, checks, "train-g4", "triton+compile", gpu_check.kernels_attn,
                                cpu, torch.float32)

    def off(x, w, g):
        return gpu_check.kernels_attn(x, w, g) + (x - x.detach())  # same out, dx + go

    gpu_check._first_call_check(a, checks, "train-g4", "off", off, cpu, torch.float32)
    assert [c["ok"] for c in checks] == [True, False], checks
    assert max(checks[0]["errors"].values()) == 0.0
    assert checks[1]["errors"]["out"] == 0.0 and checks[1]["errors"]["dx"] > 0.1


def test_loss_curve_gap():
    """The bf16 curve's level against fp32's, in standard errors of fp32's level over the last
    steps, against numpy's figures."""
    import numpy as np
    rng = np.random.default_rng(0)
    fp32 = list(100 - np.arange(60) * 0.5 + rng.normal(0, 2, 60))
    bf16 = [v + 0.3 for v in fp32]
    gap = gpu_check.loss_curve_gap(bf16, fp32, 20)
    tail = np.array(fp32[-20:])
    se = tail.std(ddof=1) / np.sqrt(20)
    assert gap["gap"] == pytest.approx(0.3) and gap["paired_mean"] == pytest.approx(0.3)
    assert gap["se"] == pytest.approx(se) and gap["gap_in_se"] == pytest.approx(0.3 / se)
    assert gap["relative"] == pytest.approx(0.3 / tail.mean())
    assert gap["fp32_level"] == pytest.approx(tail.mean())
    assert gap["bf16_level"] == pytest.approx(tail.mean() + 0.3)
    far = gpu_check.loss_curve_gap([v - 5 for v in fp32], fp32, 20)  # 5 far beyond ~0.45
    assert far["gap_in_se"] > 2 > gap["gap_in_se"]
