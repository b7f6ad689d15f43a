"""The GPU proof in one short run: the steps of ``benchmarks/gpu_check.sh``, one subcommand each.

    python -m benchmarks.gpu_check STEP --out OUT [--dry-run]

Steps (each writes OUT/parts/STEP.json and prints one line per result as it goes):

* ``cuda-env``    — the environment the CUDA extension build needs (CUDA_HOME of the real
  toolkit even when ``nvcc`` on PATH is a wrapper outside it; TORCH_CUDA_ARCH_LIST when no GPU
  is visible), printed as ``export`` lines for the shell.
* ``env``         — device, driver, torch/triton/CUDA versions, date, git commit.
* ``correctness`` — the fused kernels against an fp64 oracle by FlashAttention-3's rule (error
  ≤ 2× the error of the same-dtype PyTorch reference, + a tiny slack): forward, dx and dW at the
  real shapes, bf16 and fp16 × channels_last and NCHW, fp32 at one shape.
* ``timing``      — eager fwd+bwd of the fused kernels against the unfused chains a user could
  write (gather + SDPA flash/efficient/cuDNN) and the authors' formulation
  (``benchmarks/impls.py``), bf16, channels_last (fused also NCHW), at the training shapes
  (g = 4, 6), the SIDD validation shape and one 1024² inference map; forward and backward
  TFLOP/s at N ≥ 16k tokens per group. CUDA events after warm-up.
* ``compiled``    — the same shapes inside torch.compile: the gather + SDPA chain, the op with
  its kernels traced into the compiled code, and backend "fused" as a user gets it there; at
  the training shape a CUDA-graph replay of the op (and its bits against eager's in
  deterministic mode), the host's time to issue one eager fwd+bwd against its GPU time, and
  each kernel's GPU time; deterministic gradients bitwise repeatable (the dry run too).
* ``train``       — the default ``SSBSN()``'s fp32 training step and the reference backend's
  against the same step in fp64 (same weights and batch; FA3's 2× rule); the paper model's
  step at batch 4 × 120 crops as ``ssbsn train`` runs it by default (``ssbsn.train_step``: on
  CUDA bf16, channels_last, fused Adam, a CUDA graph) against the fp32 eager step of the
  reference backend and of the authors' code; that step's loss over 200 steps in bf16 against
  the same step in fp32 (same weights, same batches); the largest crop that trains at batch 4
  (multiples of 40 from 120, ours and the authors', stopping at the first out-of-memory) and
  the largest whole image one network pass takes without tiles, with the time at each size
  tried; and a batch-4 step at 510 crops (512 rounded to PD-5's multiple of 5: peak memory;
  the reference backend may not fit).
* ``conv``        — the CUDA conv extension against cuDNN: the model's two masked convs and a
  dilated conv, correctness then fwd+bwd time.
* ``restore``     — the Wiener refinement on the device: the CPU's result on a crop, then a
  4000×3000 photo timed (whole, and its collaborative filter alone) against the bm3d package's
  seconds per megapixel on one CPU thread (the committed wiener benchmark).
* ``report``      — OUT/results.json (everything + ``targets``) and OUT/summary.md (MET/MISSED).

``--dry-run``: the same code on CPU with tiny shapes and Triton's interpreter (the shell script
sets TRITON_INTERPRET=1), so the script itself is tested in CI; CPU timings are reported, the
speed targets are then "not applicable" and do not decide the exit status.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- the plan
# (B, C, H, W, g): the model's real shapes on a GPU; tiny ragged ones in the dry run
GPU_SHAPES = {"train-g4": (4, 128, 140, 140, 4), "train-g6": (4, 128, 140, 140, 6),
              "sidd-g4": (1, 128, 264, 264, 4), "large-g4": (1, 128, 532, 532, 4)}
DRY_SHAPES = {"train-g4": (1, 16, 13, 11, 4), "train-g6": (1, 16, 13, 11, 6),
              "sidd-g4": (1, 16, 10, 9, 4), "large-g4": (1, 16, 17, 17, 4)}
FP32_SHAPE = "train-g4"
# timed only (no fp64 oracle at N = 65,536 tokens a group): one inference pass at 1024², g = 4
INFER_SHAPES = {"infer-g4": (1, 128, 1024, 1024, 4)}
DRY_INFER_SHAPES = {"infer-g4": (1, 16, 21, 19, 4)}
TIMED_SHAPES = ("train-g4", "train-g6", "sidd-g4", "infer-g4")  # every timed row, each shape
AUTHORS_SHAPES = ("train-g4", "train-g6", "sidd-g4")  # the authors' N×N matrices fit here
TFLOPS_SHAPE = "large-g4"                            # N = 17 689 tokens per group
UNFUSED = ("gather+sdpa[flash]", "gather+sdpa[efficient]", "gather+sdpa[cudnn]",
           "gather+sdpa+compile")
COMPILED_CHAIN = "gather+sdpa+compile"
# the compiled step's rows: the chain, our op traced by the compiler, and backend "fused" as a
# user gets it inside torch.compile (the SDPA formulation where compiled_prefers_sdpa says so)
COMPILED = (COMPILED_CHAIN, "triton+compile", "fused+compile")
GRAPH_SHAPE = "train-g4"                             # CUDA-graph replay, host vs GPU time

TARGETS = {  # name: (what, comparison, target)
    **{f"speedup_vs_unfused_{n}": ("fused fwd+bwd (eager) vs the best unfused chain (eager "
                                   "SDPA or compiled), ×", ">=", 1.5) for n in TIMED_SHAPES},
    **{f"fused_compiled_vs_compiled_chain_{n}": ("backend 'fused' inside torch.compile vs the "
                                                 "compiled gather+SDPA chain, ×", ">=", 1.5)
       for n in TIMED_SHAPES},
    "speedup_vs_authors_train-g4": ("fused fwd+bwd vs authors' formulation, ×", ">=", 10.0),
    "speedup_vs_authors_train-g6": ("fused fwd+bwd vs authors' formulation, ×", ">=", 10.0),
    "fwd_tflops_N16k": ("forward TFLOP/s at N ≥ 16k", ">=", 500.0),
    "bwd_tflops_N16k": ("backward TFLOP/s at N ≥ 16k", ">=", 400.0),
    f"host_below_gpu_{GRAPH_SHAPE}": ("eager fwd+bwd: host time below GPU time at the "
                                      "training shape", "==", True),
    "deterministic_bitwise": ("deterministic mode's fwd+bwd bitwise repeatable on the device",
                              "==", True),
    "train_b4_512_runs": ("batch-4 training step at 512 crops runs (fused)", "==", True),
    "train_speedup_vs_authors": ("paper model's training step (batch 4 of 120², PD 5), "
                                 "ssbsn train's default vs the authors' code (fp32 eager), ×",
                                 ">=", 3.0),
    "train_speedup_vs_fp32_reference": ("the same, ssbsn train's default vs our fp32 eager step "
                                        "(reference backend), ×", ">=", 2.0),
    "train_bf16_loss_gap_se": ("ssbsn train's default step (bf16) against the same step in "
                               "fp32, 200 steps from the same weights on the same batches: the "
                               "gap of the last 50 steps' mean loss, in standard errors of "
                               "fp32's", "<=", 2.0),
    "train_crop_vs_authors": ("largest batch-4 training crop, ours (the default step) over the "
                              "authors' (fp32 eager), side length ×", ">=", 2.0),
    "fa3_rule_all": ("every kernel error within the FA3 2× rule", "==", True),
    "wiener_speedup_vs_bm3d": ("Wiener refinement of a 12-MP photo vs the bm3d package on one "
                               "CPU thread, ×", ">=", 20.0),
    "denoise_12mp_quick_s": ("a 12-MP photo, quick model, its full default inference, "
                             "42-px attention windows, s", "<=", 5.0),
    "denoise_12mp_paper_r3_s": ("a 12-MP photo, paper model, PD 2 + R3, 42-px attention "
                                "windows, s", "<=", 10.0),
    "denoise_12mp_peak_gib": ("peak device memory of those two, GiB", "<=", 16.0),
}
SPEED_TARGETS = [k for k in TARGETS if k not in ("fa3_rule_all", "deterministic_bitwise",
                                                 "train_bf16_loss_gap_se")]


def _say(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- cuda-env
def _cuda_env():
    """csrc/cuda_env.py (shared with setup.py, which imports it by path)."""
    sys.path.insert(0, str(ROOT / "csrc"))
    import cuda_env
    return cuda_env


def step_cuda_env(a) -> dict:
    res = {"step": "cuda-env", "exports": {}}
    ce = _cuda_env()
    if a.dry_run:
        home, how = ce.real_cuda_home()
        res.update(status="skipped", reason="dry run: no CUDA build", cuda_home=home, how=how)
        _say(f"  CUDA toolkit: {home or 'none'} ({how}); dry run: no build")
        return res
    import torch
    if not torch.version.cuda:
        res.update(status="skipped", reason="torch is a CPU build")
        return res
    home, how = ce.real_cuda_home()
    if home is None:
        res.update(status="skipped", reason=how)
        return res
    gpu = torch.cuda.is_available()
    res["exports"] = ce.build_env(gpu, torch.cuda.get_device_capability() if gpu else None)
    res.update(status="ok", cuda_home=home, how=how)
    _say(f"  CUDA toolkit: {home} ({how}); " + ", ".join(f"{k}={v}" for k, v in
                                                        res["exports"].items()))
    return res


# ----------------------------------------------------------------------------- env
def step_env(a) -> dict:
    """``benchmarks/env.py``'s facts, plus the driver and the dry-run flag."""
    import torch

    from . import env
    driver = "none"
    if shutil.which("nvidia-smi"):
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True,
                                    timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    info = {**env.env_info(), "driver": driver, "dry_run": bool(a.dry_run)}
    if torch.cuda.is_available():
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    for k, v in info.items():
        _say(f"  {k}: {v}")
    return {"step": "env", "status": "ok", "env": info}


# ----------------------------------------------------------------------------- shared bits
def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _shapes(a) -> dict:
    return DRY_SHAPES if a.dry_run else GPU_SHAPES


def _timed_shapes(a) -> dict:
    """The shapes of the timed rows: the correctness shapes and the inference one."""
    return {**_shapes(a), **(DRY_INFER_SHAPES if a.dry_run else INFER_SHAPES)}


def _measure():
    """benchmarks/measure.py (imported late: the cuda-env step runs before anything is built)."""
    from . import measure
    return measure


def _sync():
    _measure().sync()


def bench_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of fn() after warm-up: ``measure.bench_ms`` (CUDA events on a GPU,
    perf_counter on CPU), the timer of every benchmark of this folder."""
    return _measure().bench_ms(fn, warmup, reps)


def _is_oom(e: BaseException) -> bool:
    return _measure().is_oom(e)


def _free():
    _measure().free_memory()


# ----------------------------------------------------------------------------- correctness
def _inputs(shape, device, seed=0):
    """fp64 x with a common offset (as ReLU features have) and the paper's W init."""
    import torch
    B, C, H, W, g = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(B, C, H, W, generator=gen, dtype=torch.float64) + 1.5).to(device)
    w = torch.empty(C, C, dtype=torch.float64)
    torch.nn.init.xavier_uniform_(w, gain=1.414, generator=gen)
    go = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).to(device)
    return x, w.to(device), go


def reference_attention(x, w, g, per_group: bool):
    """SS-Attention in plain PyTorch in x's dtype (the FA3 rule's yardstick, and in fp64 the
    oracle): ``ssbsn.attention.common.materialised_attention`` (q̂ normalised in ≥ fp32,
    padded tokens without gradient); per_group: one group at a time under activation
    checkpointing (N = 17.7k tokens: 2.5 GB per fp64 N×N matrix)."""
    from ssbsn.attention.common import materialised_attention
    return materialised_attention(x, w, g, per_group=per_group)


@contextlib.contextmanager
def _cudnn_tf32_off():
    """cuDNN without TF32 for the block (torch's default for convolutions is TF32)."""
    import torch
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _fwd_bwd(fn, x, w, go):
    xa, wa = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(xa, wa)
    out.backward(go)
    return out.detach(), xa.grad, wa.grad


def fa3_errors(ours, same, oracle, slack=2e-6):
    """[(name, kernel error, reference error, ok)] by the FA3 rule (max abs error vs fp64)."""
    rows = []
    for name, a, r, o in zip(("out", "dx", "dw"), ours, same, oracle):
        scale = o.abs().max().item()
        err = (a.double() - o).abs().max().item()
        base = (r.double() - o).abs().max().item()
        ok = math.isfinite(err) and err <= 2.0 * base + slack * scale + 1e-12
        rows.append((name, err, base, ok))
    return rows


def correctness_plan(a) -> dict:
    """{shape name: [(dtype, layout), ...]}: bf16 and fp16 × channels_last and NCHW at every
    shape (the dry run: each dtype and each layout once per shape, the interpreter is slow);
    fp32 at the training shapes — channels_last at g = 4, and NCHW at g = 4 and 6, which are
    also the launches of the fp32 model in the train step (their compiles happen here, in
    parallel, and land in Triton's cache)."""
    plan = {}
    for name in _shapes(a):
        cases = ([("bf16", "cl"), ("fp16", "nchw")] if a.dry_run else
                 [(d, lay) for d in ("bf16", "fp16") for lay in ("cl", "nchw")])
        if name == FP32_SHAPE:
            cases.append(("fp32", "cl"))
        if not a.dry_run and name in ("train-g4", "train-g6"):
            cases.append(("fp32", "nchw"))
        plan[name] = cases
    return plan


def step_correctness(a) -> dict:
    plan = correctness_plan(a)
    # process groups: (dtype, layout) over all shapes; fp32 (slow 3xTF32 compiles) per shape
    groups = sorted({c + ((name,) if c[0] == "fp32" else ()) for name, cases in plan.items()
                     for c in cases})
    if a.only:
        keep = {tuple(o.split(":")) for o in a.only.split(",")}
        plan = {k: [c for c in v if c in keep or c + (k,) in keep] for k, v in plan.items()}
        return _correctness_cases(a, plan)
    if a.jobs <= 1 or len(groups) <= 1:
        return _correctness_cases(a, plan)
    # one process per (dtype, layout): Triton compiles each kernel variant on first launch, one
    # at a time per process; in parallel they take the time of the slowest group
    procs = []
    for grp in groups:
        sub = Path(a.out) / "sub" / ("correctness-" + "-".join(grp))
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "correctness", "--out", str(sub),
               "--only", ":".join(grp)] + (["--dry-run"] if a.dry_run else [])
        procs.append((grp, sub, subprocess.Popen(cmd, cwd=ROOT)))
    checks = []
    for grp, sub, proc in procs:
        rc = proc.wait()
        try:
            checks += json.loads((sub / "parts" / "correctness.json").read_text())["checks"]
        except (OSError, ValueError, KeyError):
            checks.append({"name": "attention " + " ".join(grp), "dtype": grp[0],
                           "layout": grp[1], "ok": False, "errors": {},
                           "reason": f"process exited {rc}"})
    status = "ok" if all(c["ok"] for c in checks) else "failed"
    return {"step": "correctness", "status": status, "checks": checks, "jobs": len(procs)}


def _correctness_cases(a, plan) -> dict:
    import torch

    import ssbsn.kernels as kernels
    from ssbsn.attention.common import tokens_per_group
    dev = _device()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    layouts = {"cl": torch.channels_last, "nchw": torch.contiguous_format}
    checks = []
    for name, cases in plan.items():
        if not cases:
            continue
        shape = _shapes(a)[name]
        B, C, H, W, g = shape
        per_group = tokens_per_group(H, W, g) > 5000
        x64, w64, go64 = _inputs(shape, dev)
        oracle = _fwd_bwd(lambda p, q: reference_attention(p, q, g, per_group), x64, w64, go64)
        for dt, lay in cases:
            t0 = time.perf_counter()
            x = x64.to(dtypes[dt]).contiguous(memory_format=layouts[lay])
            w, go = w64.to(dtypes[dt]), go64.to(dtypes[dt]).contiguous(memory_format=layouts[lay])
            try:
                same = _fwd_bwd(lambda p, q: reference_attention(p, q, g, per_group), x, w, go)
                ours = _fwd_bwd(lambda p, q: kernels.ss_attention(p, q, g), x, w, go)
                errs = fa3_errors(ours, same, oracle)
                ok = all(e[3] for e in errs) and ours[0].stride() == x.stride()
                detail = {n: {"err": e, "ref_err": r} for n, e, r, _ in errs}
                why = "" if ok else "; ".join(f"{n}: {e:.2e} > 2×{r:.2e}" for n, e, r, k in errs
                                              if not k) or "output layout changed"
            except Exception as e:  # noqa: BLE001
                ok, detail, why = False, {}, f"{type(e).__name__}: {str(e)[:300]}"
            del x, w, go
            _free()
            chk = {"name": f"attention {name} {dt} {lay}", "shape": list(shape), "dtype": dt,
                   "layout": lay, "ok": ok, "errors": detail, "reason": why,
                   "seconds": round(time.perf_counter() - t0, 2)}
            checks.append(chk)
            worst = max((v["err"] / max(v["ref_err"], 1e-30) for v in detail.values()),
                        default=float("nan"))
            _say(f"  {'ok  ' if ok else 'FAIL'} {chk['name']}: worst err/ref_err {worst:.2f}"
                 f" ({chk['seconds']} s){' — ' + why if why else ''}")
            _checkpoint(a, {"step": "correctness", "status": "running", "checks": checks})
        del x64, w64, go64, oracle
        _free()
    status = "ok" if all(c["ok"] for c in checks) else "failed"
    return {"step": "correctness", "status": status, "checks": checks}


def _checkpoint(a, res: dict) -> None:
    """The step's results so far (status "running"): a step stopped by its timeout still
    leaves what it measured for the report."""
    path = Path(a.out) / "parts" / f"{res['step']}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- timing
def _attn_fwd_bwd(fn, x, w, g, go):
    def run():
        x.grad = w.grad = None
        fn(x, w, g).backward(go)
    return run


def _flops_fwd(shape) -> float:
    from ssbsn.attention.common import tokens_per_group
    B, C, H, W, g = shape
    n = tokens_per_group(H, W, g)
    return 4.0 * n * n * C * B * g * g


def _timed_inputs(a, name, dev, dt, fmt):
    """(x, w, go) of the timed shape ``name`` in ``dt``, x and go in memory format ``fmt``."""
    x64, w64, go64 = _inputs(_timed_shapes(a)[name], dev)
    return (x64.to(dt).contiguous(memory_format=fmt), w64.to(dt),
            go64.to(dt).contiguous(memory_format=fmt))


def _time_row(a, rows, name, impl, fn, dev, dt, reps, why=None) -> float | None:
    """Time fwd+bwd of ``fn(x, w, g)`` at shape ``name`` (bf16 on a GPU, channels_last unless
    the impl ends in [nchw]) into a row of ``rows``; the milliseconds, or None."""
    import torch
    shape = _timed_shapes(a)[name]
    g = shape[-1]
    fmt = torch.contiguous_format if impl.endswith("[nchw]") else torch.channels_last
    row = {"shape": name, "impl": impl, "dtype": str(dt)[6:], "mode": "fwd+bwd"}
    rows.append(row)
    if why:
        row.update(status="skipped", reason=why)
        _say(f"  skip {name} {impl}: {why}")
        return None
    x, w, go = _timed_inputs(a, name, dev, dt, fmt)
    x.requires_grad_()
    w.requires_grad_()
    ms = None
    try:
        ms = bench_ms(_attn_fwd_bwd(fn, x, w, g, go), *reps)
        tf = 3.5 * _flops_fwd(shape) / (ms * 1e-3) / 1e12
        row.update(status="ok", ms=ms, tflops=tf)
        _say(f"  {name} {impl}: {ms:.3f} ms fwd+bwd ({tf:.1f} TFLOP/s)")
    except Exception as e:  # noqa: BLE001
        st = "OOM" if _is_oom(e) else "failed"
        row.update(status=st, reason=f"{type(e).__name__}: {str(e)[:200]}")
        _say(f"  {st} {name} {impl}: {row['reason']}")
    del x, w, go
    _free()
    return ms


#: How far the compiled op's first call may be from the eager kernels' result, relative to the
#: largest value of each (out, dx, dW): the same kernels in another tile or atomics order differ
#: by bf16 rounding (~1e-3 of it); a buffer the autotuner's timed runs added into, by O(1).
FIRST_CALL_TOL = 0.02


def _first_call_check(a, checks, name, impl, fn, dev, dt) -> None:
    """The first fwd+bwd of ``fn`` at shape ``name`` (inside torch.compile, the one that tunes
    the kernels by running them on the call's own buffers) against the eager kernels' on the
    same inputs (channels_last): a check in ``checks``, with the relative errors."""
    import torch
    g = _timed_shapes(a)[name][-1]
    chk = {"name": f"{impl} first call == eager kernels ({name})", "dtype": str(dt)[6:],
           "tolerance": FIRST_CALL_TOL}
    checks.append(chk)
    try:
        x, w, go = _timed_inputs(a, name, dev, dt, torch.channels_last)
        results = [_fwd_bwd(lambda xa, wa, f=f: f(xa, wa, g), x, w, go)
                   for f in (fn, kernels_attn)]
        errors = {k: ((p.float() - q.float()).abs().max() / q.float().abs().max()).item()
                  for k, p, q in zip(("out", "dx", "dw"), *results)}
        chk.update(ok=all(e <= FIRST_CALL_TOL for e in errors.values()), errors=errors)
        _say(f"  {chk['name']}: {'ok' if chk['ok'] else 'FAILED'} "
             + " ".join(f"{k} {e:.1e}" for k, e in errors.items()))
    except Exception as e:  # noqa: BLE001
        chk.update(ok=False, reason=f"{type(e).__name__}: {str(e)[:200]}")
        _say(f"  {chk['name']}: FAILED ({chk['reason']})")
    _free()


def _reps(dev, name) -> tuple[int, int]:
    if dev.type != "cuda":
        return (0, 1)
    return (1, 3) if name == "infer-g4" else (3, 10)  # ~0.4 s a fwd+bwd at 1024²


def step_timing(a) -> dict:
    """Eager fwd+bwd: the fused kernels (channels_last and NCHW), the authors' formulation and
    the eager unfused chains at every timed shape; TFLOP/s at N ≥ 16k. The compiled rows are
    the next step's."""
    import torch

    from .impls import IMPL_BY_NAME, availability, build
    dev = _device()
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32  # CPU: no bf16 SDPA backward
    figures, rows = {}, []
    res = {"step": "timing", "status": "running", "figures": figures, "rows": rows,
           "dtype": str(dt)[6:]}
    plan = [(n, i) for n in TIMED_SHAPES for i in ("triton", "triton[nchw]", "authors")
            + UNFUSED[:-1]]
    # dW by same-address atomics (token_ops.DW_ATOMICS) against the default fixed-order reduction
    plan[1:1] = [("train-g4", "triton[dW atomics]")]
    for name, impl in plan:
        base = "triton" if impl.startswith("triton") else impl  # triton[nchw], [dW atomics]
        why = None if base == "triton" and dev.type == "cpu" else availability(
            IMPL_BY_NAME[base], dev)  # the interpreter runs the kernels in the dry run
        if impl == "authors" and name not in AUTHORS_SHAPES:
            why = "the authors' formulation materialises N×N per group (137 GB at 1024²)"
        fn = None if why else (kernels_attn_g if base == "triton" else build(IMPL_BY_NAME[base]))
        with _dw_atomics(impl.endswith("[dW atomics]")):
            _time_row(a, rows, name, impl, fn, dev, dt, _reps(dev, name), why)
        _checkpoint(a, res)
    _tflops(a, dev, dt, _reps(dev, "train-g4"), figures, rows)
    failed = [r for r in rows if r["impl"].startswith("triton") and r["status"] != "ok"]
    res["status"] = "failed" if failed else "ok"
    return res


@contextlib.contextmanager
def _dw_atomics(on: bool):
    """The kernels' backward with dW reduced by atomics inside the block (when ``on``)."""
    import ssbsn.kernels  # noqa: F401
    T = sys.modules["ssbsn.kernels.token_ops"]
    saved = T.DW_ATOMICS
    T.DW_ATOMICS = on or saved
    try:
        yield
    finally:
        T.DW_ATOMICS = saved


def timing_figures(rows: list) -> dict:
    """The speed-up figures of the timed rows (the timing and compiled steps' together)."""
    times = {(r["shape"], r["impl"]): r["ms"] for r in rows if r.get("status") == "ok"}
    figures = {}
    for name in TIMED_SHAPES:
        fused = times.get((name, "triton"))
        unfused = {i: t for (n, i), t in times.items() if n == name and i in UNFUSED}
        chain = times.get((name, COMPILED_CHAIN))
        if fused and unfused:
            best = min(unfused, key=unfused.get)
            figures[f"speedup_vs_unfused_{name}"] = unfused[best] / fused
            figures[f"best_unfused_{name}"] = best
        if fused and times.get((name, "triton[dW atomics]")):  # > 1: the default is faster
            figures[f"dw_atomics_vs_fixed_order_{name}"] = times[(name, "triton[dW atomics]")] / fused
        if fused and times.get((name, "authors")):
            figures[f"speedup_vs_authors_{name}"] = times[(name, "authors")] / fused
        for impl in ("fused+compile", "triton+compile"):
            if chain and times.get((name, impl)):
                key = impl.split("+")[0]
                figures[f"{key}_compiled_vs_compiled_chain_{name}"] = chain / times[(name, impl)]
    return figures


def step_compiled(a) -> dict:
    """Inside torch.compile and around the host: the compiled gather+SDPA chain, the op traced
    by the compiler ("triton+compile": its kernels in Inductor's code) and backend "fused" as a
    user gets it inside torch.compile, fwd+bwd at every timed shape (the traced op's first call,
    which autotunes, checked against eager); at the training shape a
    CUDA-graph replay of the eager op, the host's time to issue one eager fwd+bwd against the
    GPU's time for it, and each kernel's GPU time (torch.profiler); deterministic mode's
    gradients bitwise repeatable (the dry run too)."""
    import torch

    from ssbsn.attention.functional import compiled_prefers_sdpa

    from .impls import IMPL_BY_NAME, availability, build
    dev = _device()
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    figures, rows, checks = {}, [], []
    res = {"step": "compiled", "status": "running", "figures": figures, "rows": rows,
           "checks": checks, "dtype": str(dt)[6:]}
    figures["deterministic_bitwise"] = _deterministic_bitwise(a, dev, dt)
    if dev.type == "cuda":  # cheap and decisive first; the compiles may meet the time limit
        _graph_and_host(a, dt, rows, figures, checks)
    else:
        rows.append({"shape": GRAPH_SHAPE, "impl": "triton+graph", "status": "skipped",
                     "reason": "CUDA graphs and host-vs-GPU times need a GPU"})
    _checkpoint(a, res)
    for name in TIMED_SHAPES:
        x = torch.empty(_timed_shapes(a)[name][:4], device="meta")
        routed = compiled_prefers_sdpa(x, _timed_shapes(a)[name][-1], False, compiling=True)
        for impl in COMPILED:
            why = ("dry run: torch.compile's CPU build alone takes longer than the dry run"
                   if a.dry_run else None)
            if impl == COMPILED_CHAIN and not why:
                why = availability(IMPL_BY_NAME[impl], dev)
            if impl == "fused+compile" and not routed and not why:
                # no routing at this size: the same code as triton+compile
                prev = [r for r in rows if r["shape"] == name and r["impl"] == "triton+compile"]
                rows.append({**prev[0], "impl": impl, "note": "same as triton+compile (groups "
                             "above COMPILED_SDPA_MAX_TOKENS keep the kernels)"})
                continue
            if not why:  # a fresh compile per row: no row meets Dynamo's recompile limit
                torch._dynamo.reset()
            fn = None if why else (build(IMPL_BY_NAME[impl]) if impl == COMPILED_CHAIN
                                   else compiled_op(impl.split("+")[0]))
            if impl == "triton+compile" and not why:
                _first_call_check(a, checks, name, impl, fn, dev, dt)
            _time_row(a, rows, name, impl, fn, dev, dt, _reps(dev, name), why)
            _checkpoint(a, res)
    failed = [c for c in checks if not c["ok"]] + [
        r for r in rows if r["impl"].startswith("triton") and r["status"] not in ("ok",
                                                                                  "skipped")]
    res["status"] = "failed" if failed or not figures["deterministic_bitwise"] else "ok"
    return res


def _deterministic_bitwise(a, dev, dt) -> bool:
    """Three deterministic fwd+bwd of the op on the device at the training shape (the dry run:
    its tiny one): the same bits each time."""
    import torch

    import ssbsn.kernels as kernels
    shape = _shapes(a)["train-g4"]
    x64, w64, go64 = _inputs(shape, dev)
    x = x64.to(dt).contiguous(memory_format=torch.channels_last)
    w, go = w64.to(dt), go64.to(dt).contiguous(memory_format=torch.channels_last)
    runs = [_fwd_bwd(lambda p, q: kernels.ss_attention(p, q, shape[-1], deterministic=True),
                     x, w, go) for _ in range(3)]
    same = all(torch.equal(p, q) for r in runs[1:] for p, q in zip(runs[0], r))
    _say(f"  deterministic fwd+bwd bitwise repeatable (3 runs, {shape}): {same}")
    return same


def _graph_and_host(a, dt, rows, figures, checks) -> None:
    """At GRAPH_SHAPE: the eager op's fwd+bwd captured in a CUDA graph (replay time; and in
    deterministic mode the replay's bits against eager's), host vs GPU time per eager fwd+bwd,
    and per-kernel GPU times."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import ssbsn.kernels as kernels
    shape = _shapes(a)[GRAPH_SHAPE]
    g = shape[-1]
    x64, w64, go64 = _inputs(shape, "cuda")
    x = x64.to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = w64.to(dt).requires_grad_()
    go = go64.to(dt).contiguous(memory_format=torch.channels_last)
    del x64, w64, go64
    row = {"shape": GRAPH_SHAPE, "impl": "triton+graph", "dtype": str(dt)[6:], "mode": "fwd+bwd"}
    rows.append(row)
    try:
        for det in (True, False):
            def step(det=det):
                out = kernels.ss_attention(x, w, g, deterministic=det)
                return (out, *torch.autograd.grad(out, (x, w), go))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # tuned and compiled before the capture
                eager = [t.clone() for t in step()]
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = step()
            graph.replay()
            torch.cuda.synchronize()
            if det:
                ok = all(torch.equal(p, q) for p, q in zip(static, eager))
                checks.append({"name": f"CUDA graph replay == eager (deterministic, "
                                       f"{GRAPH_SHAPE})", "ok": ok})
                _say(f"  {'ok  ' if ok else 'FAIL'} CUDA-graph replay bitwise equal to eager "
                     f"(deterministic)")
            else:
                ms = bench_ms(graph.replay, 3, 20)
                row.update(status="ok", ms=ms, tflops=3.5 * _flops_fwd(shape) / (ms * 1e-3) / 1e12)
                _say(f"  {GRAPH_SHAPE} triton+graph: {ms:.3f} ms fwd+bwd (CUDA-graph replay)")
            del graph, static
    except Exception as e:  # noqa: BLE001
        row.update(status="failed", reason=f"{type(e).__name__}: {str(e)[:200]}")
        _say(f"  FAIL {GRAPH_SHAPE} triton+graph: {row['reason']}")
    try:
        run = _attn_fwd_bwd(kernels_attn_g, x, w, g, go)
        for _ in range(3):
            run()
        n = 20
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            run()
        host = (time.perf_counter() - t0) / n * 1e3  # issuing only: the GPU runs behind
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(n):
                run()
            torch.cuda.synchronize()
        per_kernel = {}
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            if t:
                per_kernel[ev.key] = t / n / 1e3  # ms per fwd+bwd
        gpu = sum(per_kernel.values())
        figures.update({f"host_ms_{GRAPH_SHAPE}": host, f"gpu_ms_{GRAPH_SHAPE}": gpu,
                        f"wall_ms_{GRAPH_SHAPE}": wall, f"host_below_gpu_{GRAPH_SHAPE}": host < gpu,
                        f"kernel_ms_{GRAPH_SHAPE}": dict(sorted(per_kernel.items(),
                                                                key=lambda kv: -kv[1]))})
        _say(f"  {GRAPH_SHAPE} eager fwd+bwd: host {host:.3f} ms to issue, GPU {gpu:.3f} ms of "
             f"kernels, wall {wall:.3f} ms")
        for k, v in list(figures[f"kernel_ms_{GRAPH_SHAPE}"].items())[:8]:
            _say(f"    {v:8.3f} ms  {k[:90]}")
    except Exception as e:  # noqa: BLE001
        figures[f"host_error_{GRAPH_SHAPE}"] = f"{type(e).__name__}: {str(e)[:200]}"
        _say(f"  FAIL {GRAPH_SHAPE} host vs GPU time: {figures[f'host_error_{GRAPH_SHAPE}']}")
    del x, w, go
    _free()


def _tflops(a, dev, dt, reps, figures, rows) -> None:
    """Forward and backward TFLOP/s of the fused kernels at N ≥ 16k (dry run: its tiny shape)."""
    import torch
    shape = _shapes(a)[TFLOPS_SHAPE]
    g = shape[-1]
    x64, w64, go64 = _inputs(shape, dev)
    x = x64.to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
    w, go = w64.to(dt).requires_grad_(), go64.to(dt).contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            f_ms = bench_ms(lambda: kernels_attn(x, w, g), *reps)
        out = kernels_attn(x, w, g)
        b_ms = bench_ms(lambda: torch.autograd.grad(out, (x, w), go, retain_graph=True), *reps)
        figures["fwd_tflops_N16k"] = _flops_fwd(shape) / (f_ms * 1e-3) / 1e12
        figures["bwd_tflops_N16k"] = 2.5 * _flops_fwd(shape) / (b_ms * 1e-3) / 1e12
        figures["tflops_shape"] = list(shape)
        _say(f"  {TFLOPS_SHAPE} {tuple(shape)} fwd {f_ms:.3f} ms = "
             f"{figures['fwd_tflops_N16k']:.1f} TFLOP/s, bwd {b_ms:.3f} ms = "
             f"{figures['bwd_tflops_N16k']:.1f} TFLOP/s")
        del out
    except Exception as e:  # noqa: BLE001
        rows.append({"shape": TFLOPS_SHAPE, "impl": "triton", "status": "failed",
                     "reason": f"{type(e).__name__}: {str(e)[:200]}"})
        _say(f"  FAIL {TFLOPS_SHAPE} TFLOP/s: {rows[-1]['reason']}")
    finally:
        del x, w, go
        _free()


def compiled_op(backend: str):
    """``ss_attention(..., backend=backend)`` inside ``torch.compile``: "fused" as a user gets
    it (the SDPA formulation where ``compiled_prefers_sdpa`` routes it), "triton" the op with
    its kernels traced into the compiled code."""
    import torch

    from ssbsn.attention import ss_attention
    return torch.compile(lambda x, w, g: ss_attention(x, w, g, backend=backend), dynamic=False)


def kernels_attn_g(x, w, g):
    return kernels_attn(x, w, g)


def kernels_attn(x, w, g):
    import ssbsn.kernels as kernels
    return kernels.ss_attention(x, w, g)


# ----------------------------------------------------------------------------- train
def _model_kwargs(a) -> dict:
    return dict(base_channels=16, num_modules=3, ss_blocks=2) if a.dry_run else {}


def _train_step(model, x, opt, autocast_dtype=None):
    import torch
    dev = x.device.type
    opt.zero_grad(set_to_none=True)
    with torch.autocast(dev, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = (model(x) - x).abs().mean()
    loss.backward()
    opt.step()
    return loss.detach()


def step_train(a) -> dict:
    import torch

    from ssbsn import SSBSN
    dev = _device()
    crop, crop_big, batch = (20, 40, 2) if a.dry_run else (120, 510, 4)
    figures, checks = {}, []
    res = {"step": "train", "status": "running", "checks": checks, "figures": figures}
    torch.manual_seed(0)
    # the baseline is the reference backend (plain PyTorch, every group's N×N matrix); the
    # model under test is what SSBSN() builds by default (backend "fused": the Triton kernels on
    # CUDA, SDPA on the CPU)
    ref = SSBSN(**_model_kwargs(a), backend="reference").to(dev)
    fused = SSBSN(**_model_kwargs(a)).to(dev)
    fused.load_state_dict(ref.state_dict())
    backends = (ref.config.backend, fused.config.backend)
    assert backends[0] != backends[1], backends
    # 1. one fp32 training step of each against the same step in fp64 (the reference backend
    # in double precision, same weights and batch), by FlashAttention-3's rule: the default
    # backend's error within 2× the fp32 reference backend's. cuDNN's TF32 off, or the
    # convolutions' rounding would hide the attention paths' differences.
    noisy = torch.rand(batch, 3, crop, crop, device=dev, generator=None) * 255
    oracle = copy.deepcopy(ref).double()
    losses, grads = [], []
    with _cudnn_tf32_off():
        for m, x in ((oracle, noisy.double()), (ref, noisy), (fused, noisy)):
            m.train()
            opt = torch.optim.Adam(m.parameters(), lr=1e-4)
            losses.append(_train_step(m, x, opt).double())
            grads.append([p.grad.detach().double() for p in m.parameters()])
    del oracle

    def grad_err(k):  # the largest relative error of a parameter's gradient against fp64
        return max(((g - g64).norm() / g64.norm().clamp_min(1e-30)).item()
                   for g, g64 in zip(grads[k], grads[0]))

    def loss_err(k):
        return abs((losses[k] - losses[0]).item()) / max(abs(losses[0].item()), 1e-30)
    errs = {"grad": (grad_err(2), grad_err(1)), "loss": (loss_err(2), loss_err(1))}
    ok = (all(e <= 2 * r + 1e-6 for e, r in errs.values())
          and all(torch.isfinite(p).all() for p in fused.parameters()))
    checks.append({"name": f"SSBSN default backend ({backends[1]}) training step vs the "
                           f"reference backend, fp32 against fp64, {batch}×3×{crop}×{crop}",
                   "ok": ok, "backends": backends,
                   "errors": {k: {"err": e, "ref_err": r} for k, (e, r) in errs.items()}})
    _say(f"  {'ok  ' if ok else 'FAIL'} {checks[-1]['name']}: grad rel. error "
         f"{errs['grad'][0]:.2e} (reference {errs['grad'][1]:.2e}), loss "
         f"{errs['loss'][0]:.2e} (reference {errs['loss'][1]:.2e})")
    del grads
    _checkpoint(a, res)
    # 2. the paper model's step as `ssbsn train` runs it by default on this device (the same
    # code: ssbsn.train_step.build_step with TrainConfig's resolved settings; on CUDA bf16,
    # channels_last, fused Adam, a CUDA graph), beside the fp32 eager step of the reference
    # backend and of the authors' code (fp32 eager, their SS-Attention formulation)
    reps = (6, 10) if dev.type == "cuda" else (4, 1)  # the warm-up covers the graph's capture
    settings = _default_step_settings(dev)
    figures["train_default_settings"] = settings
    rows = (("default", lambda: _fast_step(SSBSN(**_model_kwargs(a)), dev, settings)),
            ("fp32_reference", lambda: _eager_step(SSBSN(**_model_kwargs(a),
                                                         backend="reference"), dev)),
            ("authors", lambda: _eager_step(_authors_model(a), dev)))
    for label, make in rows:
        try:
            step = make()
            ms = bench_ms(lambda: step(noisy, 1e-4), *reps)
            figures[f"train_step_ms_{label}"] = ms
            _say(f"  train step {batch}×3×{crop}×{crop} {label}: {ms:.1f} ms "
                 f"({1e3 / ms:.1f} steps/s, {batch * 1e3 / ms:.0f} images/s)")
        except Exception as e:  # noqa: BLE001
            figures[f"train_step_ms_{label}"] = None
            _say(f"  train step {label}: {type(e).__name__}: {str(e)[:200]}")
        step = None
        _free()
    for base in ("authors", "fp32_reference"):
        if figures.get("train_step_ms_default") and figures.get(f"train_step_ms_{base}"):
            figures[f"train_speedup_vs_{base}"] = (figures[f"train_step_ms_{base}"]
                                                   / figures["train_step_ms_default"])
    _checkpoint(a, res)
    # 2a. the default step's bf16 against the same step in fp32 over LOSS_CURVE_STEPS steps
    # from the same weights on the same batches
    _loss_curves(a, dev, settings, batch, crop, figures)
    _checkpoint(a, res)
    # 2b. the largest crop that trains at batch 4 (multiples of 40 from 120; dry run: of 20
    # from 20), ours (the default step) and the authors', and the largest whole image one
    # network pass denoises without tiles; each search stops at its first out-of-memory
    unit, first, cap = (20, 20, 60) if a.dry_run else (40, 120, 4000)
    budget = 12.0 if a.dry_run else 15.0  # seconds per search: the step's limit holds
    for label, make in (("default", lambda: _fast_step(fused, dev, settings)),
                        ("authors", lambda: _eager_step(_authors_model(a), dev))):
        found = largest_size(lambda n: _time_train_crop(make, batch, n, dev), first, unit, cap,
                             budget)
        _report_search(figures, f"train_crop_{label}", found, f"train crop, batch {batch}, "
                       f"{label}")
        _checkpoint(a, res)
    if figures.get("train_crop_default") and figures.get("train_crop_authors"):
        figures["train_crop_vs_authors"] = (figures["train_crop_default"]
                                            / figures["train_crop_authors"])
    for label, make in (("default", lambda: _infer_model(SSBSN(**_model_kwargs(a)), dev, True)),
                        ("authors", lambda: _infer_model(_authors_model(a), dev, False))):
        found = largest_size(lambda n: _time_inference(make, n, dev), first, unit, cap, budget)
        _report_search(figures, f"infer_size_{label}", found, f"whole image, {label}")
        _checkpoint(a, res)
    del noisy
    _free()
    # 3. batch-4 step at the large crop: fused (must run) and reference (may not fit)
    big = torch.rand(batch, 3, crop_big, crop_big, device=dev) * 255
    amp = torch.bfloat16
    for label, m in (("fused", fused), ("reference", ref)):
        opt = torch.optim.Adam(m.parameters(), lr=1e-4)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            _train_step(m, big, opt, amp)
            _sync()
            figures[f"train_{crop_big}_{label}_s"] = time.perf_counter() - t0
            figures[f"train_{crop_big}_{label}_runs"] = True
            if dev.type == "cuda":
                figures[f"train_{crop_big}_{label}_peak_gib"] = \
                    torch.cuda.max_memory_allocated() / 2 ** 30
            peak = figures.get(f"train_{crop_big}_{label}_peak_gib", float("nan"))
            _say(f"  train step bf16 {batch}×3×{crop_big}×{crop_big} {label}: runs "
                 f"(peak {peak:.1f} GiB)")
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            figures[f"train_{crop_big}_{label}_runs"] = False
            _say(f"  train step bf16 {batch}×3×{crop_big}×{crop_big} {label}: out of memory")
        opt = None
        _free()
    figures["train_b4_512_runs"] = figures.get(f"train_{crop_big}_fused_runs", False)
    figures["train_large_crop"] = crop_big
    res["status"] = "ok" if all(c["ok"] for c in checks) else "failed"
    return res


#: Steps of the bf16-against-fp32 loss curves (dry run: LOSS_CURVE_STEPS_DRY), and how many of
#: the last ones each curve's level is read from.
LOSS_CURVE_STEPS, LOSS_CURVE_STEPS_DRY, LOSS_CURVE_TAIL = 200, 20, 50


def _curve_batch(gen, batch: int, crop: int, dev):
    """A batch of synthetic noisy photos from ``gen``: smooth random scenes (a coarse random
    field, upsampled) in 0..255 with Gaussian noise of σ = 15 — something to learn."""
    import torch
    coarse = torch.rand(batch, 3, max(crop // 8, 2), max(crop // 8, 2), generator=gen,
                        device=dev)
    clean = torch.nn.functional.interpolate(coarse, size=(crop, crop), mode="bilinear",
                                            align_corners=False) * 255
    noise = torch.randn(batch, 3, crop, crop, generator=gen, device=dev) * 15
    return (clean + noise).clamp(0, 255)


def loss_curve_gap(bf16: list, fp32: list, tail: int) -> dict:
    """How far the bf16 curve's level over its last ``tail`` steps is from the fp32 curve's, in
    standard errors of the fp32 level (the spread of fp32's own losses over those steps, each
    step a different batch, over √tail): "within noise" is at most 2."""
    a, b = bf16[-tail:], fp32[-tail:]
    se = statistics.stdev(b) / len(b) ** 0.5
    levels = statistics.fmean(a), statistics.fmean(b)
    gap = levels[0] - levels[1]
    return {"bf16_level": levels[0], "fp32_level": levels[1], "gap": gap, "se": se,
            "gap_in_se": abs(gap) / max(se, 1e-30), "relative": gap / levels[1],
            "paired_mean": statistics.fmean(x - y for x, y in zip(a, b))}


def _loss_curves(a, dev, settings, batch: int, crop: int, figures: dict) -> None:
    """The paper model's training loss over LOSS_CURVE_STEPS steps of ``ssbsn train``'s default
    step in bf16 and the same step with autocast off, from the same initial weights on the same
    batches (:func:`_curve_batch`); the bf16 curve's distance from fp32's (:func:`loss_curve_gap`)
    into ``figures``, with both curves."""
    import torch

    from ssbsn import SSBSN
    steps = LOSS_CURVE_STEPS_DRY if a.dry_run else LOSS_CURVE_STEPS
    tail = min(LOSS_CURVE_TAIL, steps // 2)
    torch.manual_seed(1)
    init = SSBSN(**_model_kwargs(a)).state_dict()
    curves = {}
    try:
        t0 = time.perf_counter()
        for label, amp in (("bf16", "bf16"), ("fp32", "off")):
            model = SSBSN(**_model_kwargs(a))
            model.load_state_dict(init)
            step = _fast_step(model, dev, {**settings, "amp": amp})
            gen = torch.Generator(device=dev).manual_seed(2)
            losses = [step(_curve_batch(gen, batch, crop, dev), 1e-4).clone()
                      for _ in range(steps)]
            curves[label] = torch.stack(losses).double().cpu().tolist()
            step = model = None
            _free()
        gap = loss_curve_gap(curves["bf16"], curves["fp32"], tail)
        figures.update({"train_bf16_loss_gap_se": gap["gap_in_se"],
                        "train_bf16_loss_gap": gap, "train_loss_curves": curves,
                        "train_loss_curve_steps": steps})
        _say(f"  loss over {steps} steps, bf16 vs fp32 (same weights and batches): last {tail} "
             f"steps {gap['bf16_level']:.3f} vs {gap['fp32_level']:.3f}, gap "
             f"{gap['relative']:+.2%} = "
             f"{gap['gap_in_se']:.2f} standard errors of fp32's level "
             f"({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # noqa: BLE001
        figures["train_bf16_loss_gap_se"] = None
        _say(f"  FAIL loss curves bf16 vs fp32: {type(e).__name__}: {str(e)[:200]}")


def _default_step_settings(dev) -> dict:
    """The step settings ``ssbsn train`` resolves on ``dev`` (one process)."""
    from ssbsn.train_config import TrainConfig
    cfg = TrainConfig()
    cfg.resolve(dev.type)
    return cfg.step_settings()


def _fast_step(model, dev, settings):
    """``ssbsn train``'s step of ``model`` with ``settings`` (ssbsn.train_step.build_step)."""
    from ssbsn.train_step import build_step, make_optimizer
    import torch
    model = model.to(dev).train()
    if settings["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model.parameters(), 1e-4, dev, fused=settings["fused_adam"],
                         capturable=settings["capture"] == "graph")
    return build_step(model, opt, dev, settings)


def _eager_step(model, dev):
    """The fp32 eager step (plain Adam) of ``model``: the baseline."""
    from ssbsn.train_step import TrainStep, make_optimizer
    model = model.to(dev).train()
    return TrainStep(model, make_optimizer(model.parameters(), 1e-4, dev), dev)


def _authors_model(a):
    """The paper model with the authors' SS-Attention formulation (benchmarks/authors.py) in
    every SS-Block: what training with their code costs."""
    from ssbsn import SSBSN
    from ssbsn.attention.module import SSAttention

    from .authors import authors_ss_attention
    model = SSBSN(**_model_kwargs(a), backend="reference")
    for m in model.modules():
        if isinstance(m, SSAttention):
            m.forward = (lambda mod: lambda x: authors_ss_attention(x, mod.wqk, mod.grid))(m)
    return model


def largest_size(run, first: int, unit: int, cap: int, budget_s: float) -> dict:
    """The largest size n (``first`` + k·``unit``, at most ``cap``) for which ``run(n)`` (a time
    in ms) does not run out of memory: sizes double from ``first`` until the first
    out-of-memory, then a bisection between the last that ran and it; stops early when
    ``budget_s`` seconds are spent. Returns {"size", "oom_at", "times_ms" {n: ms},
    "complete"}."""
    t0, times, ok, bad = time.perf_counter(), {}, None, None

    def attempt(n) -> bool:
        try:
            times[n] = run(n)
            return True
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            return False
        finally:
            _free()

    n = first
    while n <= cap and time.perf_counter() - t0 < budget_s:
        if not attempt(n):
            bad = n
            break
        ok, n = n, first + 2 * (n - first + unit) - unit
    while ok is not None and bad is not None and bad - ok > unit \
            and time.perf_counter() - t0 < budget_s:
        mid = ok + (bad - ok) // (2 * unit) * unit
        if attempt(mid):
            ok = mid
        else:
            bad = mid
    complete = bad is not None and (ok is None or bad - ok <= unit) or (bad is None and n > cap)
    return {"size": ok, "oom_at": bad, "times_ms": times, "complete": bool(complete)}


def _report_search(figures: dict, key: str, found: dict, what: str) -> None:
    figures[key] = found["size"]
    figures[f"{key}_oom_at"] = found["oom_at"]
    figures[f"{key}_ms"] = {str(k): v for k, v in sorted(found["times_ms"].items())}
    figures[f"{key}_complete"] = found["complete"]
    tried = ", ".join(f"{k}: {v:.0f} ms" for k, v in sorted(found["times_ms"].items()))
    oom = (f"out of memory at {found['oom_at']}" if found["oom_at"] is not None
           else "no out-of-memory up to the search's cap")
    _say(f"  largest {what}: {found['size']} ({oom}"
         f"{'' if found['complete'] else '; search cut short by its time budget'}; {tried})")


def _time_train_crop(make, batch: int, n: int, dev) -> float:
    """ms of a training step at batch × 3 × n × n (after the warm-up and capture)."""
    import torch
    step = make()
    x = torch.rand(batch, 3, n, n, device=dev) * 255
    try:
        return bench_ms(lambda: step(x, 1e-4), 4 if dev.type == "cuda" else 1, 2)
    finally:
        del step, x


def _infer_model(model, dev, fast: bool):
    import torch
    model = model.to(dev).eval()
    if fast and dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, fast and dev.type == "cuda"


def _time_inference(make, n: int, dev) -> float:
    """ms of one network pass (PD at the test stride, no tiles) over a 1 × 3 × n × n image
    (bf16 for ours on CUDA, fp32 for the authors')."""
    import torch
    model, bf16 = make()
    x = torch.rand(1, 3, n, n, device=dev) * 255

    def run():
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return model(x, pd=model.pd_test)
    try:
        return bench_ms(run, 1, 1)
    finally:
        del model, x


# ----------------------------------------------------------------------------- restore
WIENER_RESULTS = ROOT / "benchmarks" / "results" / "wiener" / "results.json"


def bm3d_seconds_per_megapixel() -> float | None:
    """The bm3d package's Wiener refinement (the stage before ssbsn.restore.collaborative, one CPU
    thread), seconds per megapixel: the mean over the 256×256 photos of the committed
    benchmarks/results/wiener run (bm3d is not installed where the GPU check runs)."""
    try:
        rows = json.loads(WIENER_RESULTS.read_text())["images"]
    except (OSError, ValueError, KeyError):
        return None
    secs = [r["bm3d_s"] for r in rows if r.get("bm3d_s")]
    return sum(secs) / len(secs) / (256 * 256 / 1e6) if secs else None


def step_restore(a) -> dict:
    """The Wiener refinement (ssbsn.restore.wiener.collaborative_refinement) on the device: the same
    result as on the CPU (a 256² crop), then a 4000×3000 RGB photo timed whole and its
    collaborative filter (step 4) alone, with the peak device memory; against the bm3d
    package's seconds per megapixel on one CPU thread (the committed wiener benchmark)."""
    import numpy as np
    import torch

    from benchmarks.wiener_compare import synthetic_photo
    from ssbsn.restore import wiener
    from ssbsn.restore.lowpass import gaussian_lowpass
    dev = _device()
    H, W = (48, 64) if a.dry_run else (3000, 4000)
    crop = 32 if a.dry_run else 256
    figures, checks = {}, []
    noisy, _ = synthetic_photo(H, W)
    x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
    est = gaussian_lowpass(x, 1.0)
    # 1. the device's result against the CPU's on a crop (float32 sums in another order, and
    # block matches that tie may differ: PSNR between the two, not bitwise)
    xc, ec = x[..., :crop, :crop], est[..., :crop, :crop]
    cpu = wiener.collaborative_refinement(xc, ec, ec)
    on_dev = wiener.collaborative_refinement(xc.to(dev), ec.to(dev), ec.to(dev)).cpu()
    mse = float(((on_dev - cpu) ** 2).mean())
    psnr = 10 * math.log10(255.0 ** 2 / max(mse, 1e-20))
    ok = psnr >= 50.0 and bool(torch.isfinite(on_dev).all())
    checks.append({"name": f"Wiener refinement on {dev.type} vs CPU, {crop}×{crop} RGB",
                   "ok": ok, "psnr_db": psnr, "max_abs": float((on_dev - cpu).abs().max())})
    _say(f"  {'ok  ' if ok else 'FAIL'} {checks[-1]['name']}: PSNR {psnr:.1f} dB, max abs "
         f"{checks[-1]['max_abs']:.3g} grey levels")
    _checkpoint(a, {"step": "restore", "status": "running", "checks": checks,
                    "figures": figures})
    # 2. the whole photo: the refinement, step 4 alone, peak device memory
    xd, ed = x.to(dev), est.to(dev)
    step4 = wiener.torch_step4(dev)
    spent = {}

    def timed(*args):
        _sync()
        t = time.perf_counter()
        r = step4(*args)
        _sync()
        spent["step4"] = time.perf_counter() - t
        return r
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync()
    t0 = time.perf_counter()
    wiener.refine(xd, ed, ed, timed)
    _sync()
    total = time.perf_counter() - t0
    mp = H * W / 1e6
    figures.update(wiener_photo=f"{W}x{H}", wiener_s=total, wiener_step4_s=spent.get("step4"),
                   wiener_s_per_mp=total / mp)
    if dev.type == "cuda":
        figures["wiener_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    base = bm3d_seconds_per_megapixel()
    figures["bm3d_cpu1_s_per_mp"] = base
    figures["wiener_speedup_vs_bm3d"] = base * mp / total if base else None
    _say(f"  Wiener refinement {W}×{H} on {dev.type}: {total:.2f} s (step 4 "
         f"{spent.get('step4', float('nan')):.2f} s); the bm3d package on one CPU thread: "
         f"{base or float('nan'):.1f} s per MP → ×{figures['wiener_speedup_vs_bm3d'] or 0:.1f}")
    status = "ok" if all(c["ok"] for c in checks) else "failed"
    return {"step": "restore", "status": status, "checks": checks, "figures": figures}


# ----------------------------------------------------------------------------- denoise
DENOISE_SIZE, DRY_DENOISE_SIZE = (3000, 4000), (48, 64)   # (H, W): a 12-megapixel photo
WHOLE_MAP_SIZE, DRY_WHOLE_MAP_SIZE = (512, 512), (32, 32)  # whole-map groups, extrapolated


def _denoise_model(preset: str, window: int, dry: bool):
    """The preset's architecture with random weights (the time does not depend on their
    values) and SS-Attention's scope ``window`` (0: whole-map groups); the quick preset with
    its inference settings, the paper's with the paper's (PD 2 + R3). A dry run shrinks the
    paper's model to the quick one's size."""
    import torch

    from ssbsn import SSBSN
    from ssbsn.config import model_field_names
    from ssbsn.presets import preset_values
    q = preset_values(preset)
    fields = {k: v for k, v in q.items() if k in model_field_names()}
    if dry and preset == "paper":
        fields.update(base_channels=16, num_modules=2, ss_blocks=1)
    fields["attention_window"] = window
    torch.manual_seed(0)
    return SSBSN(**fields, inference=q.get("inference")).eval().to(_device())


def _timed_denoise(model, size) -> dict:
    """``model.denoise`` of a synthetic noisy photo of ``size`` as ``ssbsn denoise`` runs it
    (the model's own settings): wall time split into the network passes, the Wiener stage
    and the rest, and the peak device memory."""
    import numpy as np
    import torch

    import ssbsn.restore.wiener as sw
    from benchmarks.wiener_compare import synthetic_photo
    dev = _device()
    noisy, _ = synthetic_photo(*size)
    x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None].to(dev)
    spent = {"network": 0.0, "wiener": 0.0, "passes": 0}
    t = {}

    def pre(*_):
        _sync()
        t["pass"] = time.perf_counter()

    def post(*_):
        _sync()
        spent["network"] += time.perf_counter() - t["pass"]
        spent["passes"] += 1
    orig = sw.collaborative_refinement

    def wiener(*args, **kw):
        _sync()
        t0 = time.perf_counter()
        try:
            return orig(*args, **kw)
        finally:
            _sync()
            spent["wiener"] += time.perf_counter() - t0
    hooks = [model.bsn.register_forward_pre_hook(pre), model.bsn.register_forward_hook(post)]
    sw.collaborative_refinement = wiener
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        _sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            y = model.denoise(x)
        _sync()
        total = time.perf_counter() - t0
    finally:
        sw.collaborative_refinement = orig
        for h in hooks:
            h.remove()
    assert torch.isfinite(y).all()
    r = dict(size=f"{size[1]}x{size[0]}", seconds=total, network_s=spent["network"],
             passes=spent["passes"], wiener_s=spent["wiener"],
             other_s=total - spent["network"] - spent["wiener"])
    if dev.type == "cuda":
        r["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return r


def step_denoise(a) -> dict:
    """A 12-megapixel photo denoised on the device as ``ssbsn denoise`` does it, with the
    bounded attention scope (42-pixel windows): the quick preset's model with its full default
    inference (shifted-PD ensemble, lowpass, blend, Wiener, debias), and the paper's model with
    the paper's inference (PD 2 + R3); each split into network / Wiener / the rest, with peak
    device memory. Whole-map groups beside them at a small size, with their cost extrapolated
    to 12 MP by the square of the area (not run there: hours)."""
    size = DRY_DENOISE_SIZE if a.dry_run else DENOISE_SIZE
    small = DRY_WHOLE_MAP_SIZE if a.dry_run else WHOLE_MAP_SIZE
    rows, figures = [], {}
    res = {"step": "denoise", "status": "running", "figures": figures, "rows": rows}
    for preset in ("quick", "paper"):
        for window, at in ((42, size), (0, small)):
            model = _denoise_model(preset, window, a.dry_run)
            try:
                r = _timed_denoise(model, at)
            except Exception as e:  # noqa: BLE001 -- an out-of-memory is a figure, not a failure
                if not _is_oom(e):
                    raise
                r = dict(size=f"{at[1]}x{at[0]}", oom=True)
                _free()
            r.update(preset=preset, window=window)
            if window == 0 and "seconds" in r:
                r["extrapolated_12mp_s"] = r["seconds"] * (size[0] * size[1] / (at[0] * at[1])) ** 2
            rows.append(r)
            del model
            _free()
            _say(f"  denoise {preset} window {window} {r['size']}: " + (
                "out of memory" if r.get("oom") else
                f"{r['seconds']:.2f} s ({r['passes']} passes {r['network_s']:.2f} s, Wiener "
                f"{r['wiener_s']:.2f} s, rest {r['other_s']:.2f} s"
                + (f", peak {r['peak_gib']:.1f} GiB" if "peak_gib" in r else "") + ")"))
            figures.update(denoise_figures(rows))
            _checkpoint(a, res)
    res["status"] = "ok"
    return res


def denoise_figures(rows: list) -> dict:
    """The 12-MP targets' figures from the denoise rows measured so far (None where missing)."""
    by = {(r["preset"], r["window"]): r for r in rows}
    quick, paper = by.get(("quick", 42), {}), by.get(("paper", 42), {})
    peaks = [quick.get("peak_gib"), paper.get("peak_gib")]
    return {"denoise_12mp_quick_s": quick.get("seconds"),
            "denoise_12mp_paper_r3_s": paper.get("seconds"),
            "denoise_12mp_peak_gib": max(peaks) if all(v is not None for v in peaks) else None}


# ----------------------------------------------------------------------------- conv
def step_conv(a) -> dict:
    import torch
    dev = _device()
    try:
        from ssbsn.nn import conv
        info = conv.conv_backend_info() if hasattr(conv, "conv_backend_info") else ""
    except Exception as e:  # noqa: BLE001
        return {"step": "conv", "status": "skipped", "reason": f"ssbsn.nn.conv: {e}"}
    if dev.type != "cuda" or "cuda" not in getattr(conv, "CONV_BACKENDS", ()):
        why = "no CUDA device (dry run)" if dev.type != "cuda" else "conv backend 'cuda' missing"
        _say(f"  skipped: {why}")
        return {"step": "conv", "status": "skipped", "reason": why}
    try:
        x = torch.zeros(1, 8, 8, 8, device=dev)
        conv.masked_conv2d(x, torch.zeros(8, 8, 3, 3, device=dev), None, backend="cuda")
    except Exception as e:  # noqa: BLE001
        why = f"extension not usable: {str(e)[:300]} {info}"
        _say(f"  skipped: {why}")
        return {"step": "conv", "status": "skipped", "reason": why}
    B, C, H, W = 4, 128, 140, 140
    def masked(x, w, b, be, relu=True):
        return conv.masked_conv2d(x, w, b, relu=relu, backend=be)

    def dilated(x, w, b, be, relu=True):
        return conv.dilated_conv2d(x, w, b, dilation=2, relu=relu, backend=be)
    ops = [("masked 3×3", masked, 3, conv._masked_taps(3)),
           ("masked 5×5", masked, 5, conv._masked_taps(5)),
           ("dilated 3×3 d=2", dilated, 3, conv._dilated_taps(2))]
    checks, figures = [], {}
    gen = torch.Generator().manual_seed(0)
    for name, fn, k, taps in ops:
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(B, C, H, W, generator=gen).to(dev, dt).contiguous(
                memory_format=torch.channels_last).requires_grad_()
            w = (torch.randn(C, C, k, k, generator=gen) / (3 * C) ** 0.5).to(dev, dt).requires_grad_()
            b = (0.1 * torch.randn(C, generator=gen)).to(dev, dt).requires_grad_()
            go = torch.randn(B, C, H, W, generator=gen).to(dev, dt)
            errs = {be: _conv_error(fn, x, w, b, go, be, taps) for be in ("torch", "cuda")}
            # fp32: 1e-4 (the weight gradient sums 78k pixels), as tests/test_conv_ext.py; half:
            # the FA3 rule against cuDNN's own error in the same dtype
            tol = 1e-4 if dt == torch.float32 else 2.0 * errs["torch"] + 1e-3
            ok = errs["cuda"] <= tol
            checks.append({"name": f"conv {name} {str(dt)[6:]} vs fp64 oracle", "ok": ok,
                           "rel_err": errs["cuda"], "cudnn_rel_err": errs["torch"], "tol": tol})
            _say(f"  {'ok  ' if ok else 'FAIL'} {checks[-1]['name']}: rel. err {errs['cuda']:.2e}"
                 f" (cuDNN {errs['torch']:.2e}, limit {tol:.2e})")
            if dt == torch.bfloat16:
                for be in ("torch", "cuda"):
                    def run(be=be):
                        x.grad = w.grad = b.grad = None
                        fn(x, w, b, be).backward(go)
                    figures[f"conv_{name}_{be}_ms"] = bench_ms(run, 3, 10)
                figures[f"conv_{name}_speedup_vs_cudnn"] = (figures[f"conv_{name}_torch_ms"]
                                                            / figures[f"conv_{name}_cuda_ms"])
                _say(f"  conv {name} bf16 fwd+bwd: cuda {figures[f'conv_{name}_cuda_ms']:.3f} ms,"
                     f" cuDNN {figures[f'conv_{name}_torch_ms']:.3f} ms")
    status = "ok" if all(c["ok"] for c in checks) else "failed"
    return {"step": "conv", "status": status, "checks": checks, "figures": figures}


def tap_conv_oracle(x, w, b, taps):
    """The tap convolution (``ssbsn.nn.conv._Taps``: offsets and their k×k window positions)
    as a sum of shifted matrix products, in x's dtype — float64 makes it the oracle, exact to
    ~1e-15 and independent of cuDNN (whose float32 5×5 weight gradient is off by ~1.5e-2 on an
    H200 even with TF32 off: ``conv`` below). Differentiable in x, w and b."""
    import torch.nn.functional as F
    N, _, H, W = x.shape
    k = w.shape[-1]
    r = max(max(abs(d) for d in taps.dy), max(abs(d) for d in taps.dx))
    xp = F.pad(x, (r, r, r, r)).permute(0, 2, 3, 1)  # N, H+2r, W+2r, Ci
    y = b.view(1, 1, 1, -1).expand(N, H, W, w.shape[0])
    for dy, dx, win in zip(taps.dy, taps.dx, taps.window):
        ky, kx = divmod(win, k)
        y = y + xp[:, r + dy:r + dy + H, r + dx:r + dx + W, :] @ w[:, :, ky, kx].t()
    return y.permute(0, 3, 1, 2)


def _conv_error(fn, x, w, b, go, be, taps) -> float:
    """Largest relative error (max |err| / max |oracle|) of backend ``be``'s output, dx, dW and
    db against the float64 oracle. The oracle's backward uses ``be``'s own ReLU mask: a
    pre-activation within rounding of 0 may fall either way, and a flipped pixel is no error."""
    with _cudnn_tf32_off():
        x.grad = w.grad = b.grad = None
        y = fn(x, w, b, be)
        y.backward(go)
        got = [y.detach(), x.grad, w.grad, b.grad]
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    z = tap_conv_oracle(xr, wr, br, taps)
    z.backward(go.double() * (y.detach() > 0))
    want = [z.detach().relu(), xr.grad, wr.grad, br.grad]
    return max(((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
               for g, r in zip(got, want))


# ----------------------------------------------------------------------------- report
def _load_parts(out: Path) -> dict:
    parts = {}
    for p in sorted((out / "parts").glob("*.json")):
        try:
            parts[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            parts[p.stem] = {"step": p.stem, "status": "failed", "reason": f"unreadable: {e}"}
    for p in sorted((out / "parts").glob("*.rc")):  # steps that were stopped or died
        rc = p.read_text().strip()
        if rc == "0":
            continue
        why = "timed out" if rc in ("124", "137") else f"exit {rc}"
        if p.stem not in parts:
            parts[p.stem] = {"step": p.stem, "status": "failed", "reason": why}
        elif parts[p.stem].get("status") == "running":  # what it measured before it stopped
            parts[p.stem].update(status="failed", reason=why + " (partial results kept)")
    return parts


def _timed_rows(parts: dict) -> list:
    return [r for k in ("timing", "compiled") for r in parts.get(k, {}).get("rows", [])]


def _figures(parts: dict) -> dict:
    """Every step's figures and the speed-ups of the timed rows."""
    figures = {}
    for part in parts.values():
        figures.update(part.get("figures", {}))
    figures.update(timing_figures(_timed_rows(parts)))
    return figures


def build_targets(parts: dict, dry_run: bool) -> list[dict]:
    figures = _figures(parts)
    checks = [c for p in parts.values() for c in p.get("checks", [])]
    attn = [c for c in checks if c["name"].startswith("attention")]
    figures["fa3_rule_all"] = bool(attn) and all(c["ok"] for c in attn)
    out = []
    for name, (what, op, target) in TARGETS.items():
        value = figures.get(name)
        if value is None:
            met = False
        elif op == ">=":
            met = value >= target
        elif op == "<=":
            met = value <= target
        elif op == "==":
            met = value == target
        else:
            raise ValueError(f"target {name}: unknown comparison {op!r}")
        row = {"name": name, "what": what, "value": value, "target": target, "met": bool(met)}
        if dry_run and name in SPEED_TARGETS:
            row["note"] = "CPU dry run: not applicable"
        out.append(row)
    return out


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def step_report(a) -> dict:
    out = Path(a.out)
    parts = _load_parts(out)
    env = parts.get("env", {}).get("env", {})
    targets = build_targets(parts, a.dry_run)
    figures = _figures(parts)
    steps = {k: {"status": v.get("status"), "reason": v.get("reason", "")}
             for k, v in parts.items() if k != "report"}
    results = {**env, "env": env, "steps": steps, "figures": figures, "targets": targets,
               "checks": [c for p in parts.values() for c in p.get("checks", [])],
               "timing_rows": _timed_rows(parts)}
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    lines = [f"# gpu_check {'(dry run, CPU)' if a.dry_run else ''}".rstrip(), "",
             f"{env.get('device', '?')} · driver {env.get('driver', '?')} · torch "
             f"{env.get('torch', '?')} · triton {env.get('triton', '?')} · CUDA "
             f"{env.get('cuda', '?')} · {env.get('date', '?')} · commit "
             f"{env.get('git_commit', '?')}", "",
             "| target | value | target | result |", "|---|---|---|---|"]
    for t in targets:
        res = "MET" if t["met"] else "MISSED"
        if t.get("note"):
            res += f" ({t['note']})"
        lines.append(f"| {t['what']} (`{t['name']}`) | {_fmt(t['value'])} | {_fmt(t['target'])}"
                     f" | {res} |")
    lines += ["", "| step | status | note |", "|---|---|---|"]
    for k, v in steps.items():
        lines.append(f"| {k} | {v['status']} | {v['reason']} |")
    failed_checks = [c["name"] for c in results["checks"] if not c["ok"]]
    lines += ["", f"{len(results['checks'])} correctness checks, {len(failed_checks)} failed"
              + (": " + ", ".join(failed_checks) if failed_checks else "")]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    _say("\n".join(lines))
    broken = [k for k, v in steps.items() if v["status"] == "failed"]
    missed = [t["name"] for t in targets if not t["met"] and not t.get("note")]
    status = "failed" if broken or failed_checks else "ok"
    return {"step": "report", "status": status, "broken_steps": broken, "missed": missed}


STEPS = {"cuda-env": step_cuda_env, "env": step_env, "correctness": step_correctness,
         "timing": step_timing, "compiled": step_compiled, "train": step_train, "conv": step_conv, "restore": step_restore,
         "denoise": step_denoise,
         "report": step_report}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one step of benchmarks/gpu_check.sh")
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--jobs", type=int, default=8,
                    help="correctness: processes, one per (dtype, layout) (default 8)")
    ap.add_argument("--only", help="correctness: only DTYPE:LAYOUT[:SHAPE][,...] (a sub-process)")
    a = ap.parse_args(argv)
    parts = Path(a.out) / "parts"
    parts.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        res = STEPS[a.step](a)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res = {"step": a.step, "status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (parts / f"{a.step}.json").write_text(json.dumps(res, indent=1, default=str))
    if a.step == "cuda-env":
        for k, v in res.get("exports", {}).items():
            print(f"export {k}={shlex.quote(str(v))}")
    if a.step == "report":
        missed = res.get("missed", [])
        return 1 if res["status"] != "ok" else (2 if missed else 0)
    return 0 if res["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
