"""SS-Attention forward / backward / fwd+bwd, every implementation × shape × dtype.

Each case first checks the implementation against an oracle (``reference`` is checked against
the authors' formulation, everything else against ``reference``; MSA rows against
``msa[explicit]``) at the case's own shape — or, where the oracle would not fit in memory, at a
reduced shape with the same C, g and dtype — and fails if it is wrong. Only then is it timed.

Modes: ``fwd`` = forward without autograd (inference); ``bwd`` = the backward alone (the
forward runs untimed in pytest-benchmark's setup); ``fwdbwd`` = forward + backward to x and the
weights. Peak memory is that of one forward (fwd) or forward + backward (bwd, fwdbwd).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict

import pytest
import torch

from . import harness as H
from .impls import (IMPLS, AttnShape, Impl, availability, base_name, build, gather_scatter_bytes,
                    gather_sdpa, mode_unsupported, msa_params, reference_fn, shapes,
                    smoke_shape, unsupported_input)
from .authors import authors_ss_attention

SMOKE_IMPLS = ("authors", "reference", "sdpa", "gather+sdpa[flash]", "gather+sdpa+compile")
SMOKE_MODES = ("fwd", "fwdbwd")
# Relative tolerances: outputs max |impl − oracle| / max |oracle's attention part|, gradients
# max |impl − oracle| / max |oracle|. A kernel computing the wrong thing lands at O(0.1 - 1);
# the fp32 cases are the tight check. bf16 gradients of W are a small signal (near-uniform
# attention): CPU SDPA-flash's bf16 backward is ~7% off there, the bf16 reference ~1.3%.
# On CUDA, fp32 kernels may run their dots in (3x)TF32: fp32 gradients get 1e-2.
TOL_OUT = {"fp32": 5e-3, "bf16": 5e-2, "fp16": 2e-2}
TOL_GRAD = {"fp32": 1e-2 if torch.cuda.is_available() else 5e-3, "bf16": 1.5e-1, "fp16": 5e-2}
UNSUPPORTED_MARKERS = ("no available kernel", "no viable backend", "not supported",
                       "does not support", "not implemented", "unsupported")


def _small_matrix(s: AttnShape):
    """(dtypes, modes) of a shape. The small (CPU) size trims the matrix to stay within a few
    minutes on 2 cores: bf16 and the bwd mode only where they say something new."""
    if "smoke" in s.tags:
        return ("fp32",), SMOKE_MODES
    if H.CONFIG["size"] == "small":
        if s.name == "train-g4":
            return ("fp32", "bf16"), H.MODES
        if "train" in s.tags:
            return ("fp32",), ("fwd", "fwdbwd")
        if "sidd" in s.tags:
            return ("fp32", "bf16"), ("fwd", "fwdbwd")
        return ("fp32",), ("fwd", "fwdbwd")
    return ("fp32", "bf16"), H.MODES


def _params():
    params = []
    all_shapes = shapes(H.CONFIG["size"]) + [smoke_shape()]
    for s in all_shapes:
        dtypes, modes = _small_matrix(s)
        for dt in dtypes:
            for mode in modes:
                for impl in IMPLS:
                    if "smoke" in s.tags and impl.name not in SMOKE_IMPLS:
                        continue
                    if impl.compiled and not ({"compile", "smoke"} & set(s.tags)):
                        continue
                    if impl.family == "layout" and mode != "fwd":
                        continue
                    if (impl.compiled and H.CONFIG["size"] == "small" and dt != "fp32"
                            and "smoke" not in s.tags):
                        continue            # CPU compile time: one dtype is enough
                    marks = [pytest.mark.attention]
                    if impl.compiled:
                        marks.append(pytest.mark.compile)
                    if "smoke" in s.tags:
                        marks.append(pytest.mark.smoke)
                    params.append(pytest.param((s, dt, mode, impl), marks=marks,
                                               id=f"{s.name}-{dt}-{mode}-{impl.name}"))
    return params


def pytest_generate_tests(metafunc):
    if "acase" in metafunc.fixturenames:
        metafunc.parametrize("acase", _params())


# --------------------------------------------------------------------------- inputs
def make_inputs(s: AttnShape, dtype: str, family: str, grad: bool, layout: str | None = None):
    """x with per-channel offsets (so the attention output is O(1), not ~0), the weights, and
    the upstream gradient. Deterministic per shape. layout "channels_last": x and the gradient
    in that memory format (same values)."""
    gen = torch.Generator().manual_seed(1234 + s.H * 7 + s.W * 13 + s.C + s.g)
    x = torch.randn(s.B, s.C, s.H, s.W, generator=gen) + 2 * torch.randn(1, s.C, 1, 1, generator=gen)
    gout = torch.randn(s.B, s.C, s.H, s.W, generator=gen)
    dev, dt = H.device(), H.DTYPES[dtype]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(dev, dt).contiguous(memory_format=fmt).requires_grad_(grad)
    gout = gout.to(dev, dt).contiguous(memory_format=fmt)
    if family == "msa":
        params = msa_params(s.C, dev, dt, grad)
    else:
        w = torch.empty(s.C, s.C)
        torch.nn.init.xavier_uniform_(w, gain=1.414, generator=gen)
        params = [w.to(dev, dt).requires_grad_(grad)]
    return x, params, gout


def _call(fn, x, params, g, family):
    return fn(x, params, g) if family == "msa" else fn(x, params[0], g)


# --------------------------------------------------------------------------- correctness
_CHECKS: dict = {}
_FALLBACKS: dict = {}     # "fused" that fell back to sdpa (with the warning's reason)
_REF_CACHE: "OrderedDict" = OrderedDict()


def _results(fn, s: AttnShape, dtype: str, family: str, kind: str, compute_dtype=None,
             layout=None):
    """Output (and gradients for kind='grad') of fn on the shape's inputs, as fp32 tensors.
    With compute_dtype, inputs are cast to ``dtype`` first and then computed in compute_dtype
    (the oracle sees exactly the values the implementation sees)."""
    x, params, gout = make_inputs(s, dtype, family, grad=False, layout=layout)
    if compute_dtype is not None:
        x, gout = x.to(compute_dtype), gout.to(compute_dtype)
        params = [p.to(compute_dtype) for p in params]
    if kind == "fwd":
        with torch.no_grad():
            out = _call(fn, x, params, s.g, family)
        return {"x": x.float(), "out": out.float()}
    x.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    out = _call(fn, x, params, s.g, family)
    out.backward(gout)
    res = {"x": x.detach().float(), "out": out.detach().float(), "dx": x.grad.float()}
    for i, p in enumerate(params):
        res[f"dw{i}"] = p.grad.float()
    return res


def _reference(impl: Impl, s: AttnShape, dtype: str, kind: str):
    key = (impl.family, impl.name == "reference", s, dtype, kind)
    if key not in _REF_CACHE:
        oracle = authors_ss_attention if impl.name == "reference" else reference_fn(impl)
        if impl.family == "msa":
            oracle = reference_fn(impl)
        _REF_CACHE[key] = _results(oracle, s, dtype, impl.family, kind,
                                   compute_dtype=torch.float32)
        while len(_REF_CACHE) > 2:
            _REF_CACHE.popitem(last=False)
    return _REF_CACHE[key]


def _reduced(s: AttnShape, family: str) -> AttnShape:
    side = 96 if family == "msa" else 48 * s.g
    return dataclasses.replace(s, name=s.name + "@check", B=1, H=min(s.H, side),
                               W=min(s.W, side))


def _oracle_fits(s: AttnShape, family: str) -> bool:
    need = 5 * s.nxn_bytes(family, 4)
    if H.on_cuda():
        return need < 0.5 * torch.cuda.get_device_properties(0).total_memory
    return need < H.CONFIG["cpu_mem_limit"] / 2


def _compare(got: dict, ref: dict) -> dict:
    errs = {}
    attn_scale = (ref["out"] - ref["x"]).abs().max().item() or 1.0
    for k, r in ref.items():
        if k == "x":
            continue
        scale = attn_scale if k == "out" else (r.abs().max().item() or 1.0)
        errs[k] = (got[k] - r).abs().max().item() / scale
        if not math.isfinite(errs[k]):
            errs[k] = float("inf")
    return errs


def check(impl: Impl, fn, s: AttnShape, dtype: str, kind: str) -> tuple[float, str]:
    """(max relative error, where it was checked); raises on a mismatch."""
    key = (impl.name, s, dtype, kind)
    if key in _CHECKS:
        return _CHECKS[key]
    cs = s if _oracle_fits(s, impl.family) else _reduced(s, impl.family)
    if impl.family == "layout":
        x, _, _ = make_inputs(cs, dtype, "ss", grad=False)
        err = (fn(x, None, cs.g) - x).abs().max().item()
        _CHECKS[key] = (err, cs.id())
        return _CHECKS[key]
    ref = None
    try:
        ref = _reference(impl, cs, dtype, kind)
    except Exception as e:  # noqa: BLE001
        if not H.is_oom(e) or cs is not s:
            raise
    if ref is None:            # the oracle ran out of memory: check at a reduced shape
        H.free_memory()
        cs = _reduced(s, impl.family)
        ref = _reference(impl, cs, dtype, kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        got = _results(fn, cs, dtype, impl.family, kind, layout=impl.extra.get("layout"))
    fallback = [str(w.message) for w in caught if "falling back" in str(w.message)]
    if fallback:
        _FALLBACKS[key] = fallback[0][:200]
    errs = _compare(got, ref)
    where = cs.id()
    if cs is not s and impl.family == "ss" and not impl.materialises and impl.name != "sdpa":
        # the oracle only fits at a reduced shape: also compare at the real shape with torch's
        # SDPA (no N×N matrix; the same math), so that size-dependent bugs (indexing, tiling,
        # split-K) cannot hide
        del got
        H.free_memory()
        full = _results(fn, s, dtype, impl.family, kind, layout=impl.extra.get("layout"))
        big = _results_cached(("sdpa-oracle", s, dtype, kind), lambda: _results(
            gather_sdpa, s, dtype, impl.family, kind, compute_dtype=torch.float32))
        errs.update({f"{k}@full": v for k, v in _compare(full, big).items()})
        where = f"{cs.id()} (+ {s.id()} vs fp32 SDPA)"
    worst = max(errs.values())
    _CHECKS[key] = (worst, where, errs)
    return _CHECKS[key]


def _results_cached(key, compute):
    if key not in _REF_CACHE:
        _REF_CACHE[key] = compute()
        while len(_REF_CACHE) > 2:
            _REF_CACHE.popitem(last=False)
    return _REF_CACHE[key]


# --------------------------------------------------------------------------- the benchmark
def test_attention(benchmark, acase):
    s, dtype, mode, impl = acase
    dev = H.device()
    family = impl.family
    case = H.Case(suite="attention", name=s.name, impl=impl.name, mode=mode, dtype=dtype,
                  B=s.B, C=s.C, H=s.H, W=s.W, g=s.g if family != "msa" else None,
                  N=s.N if family != "msa" else s.H * s.W, tokens=s.tokens,
                  flops_fwd=s.flops_fwd(family) if family != "layout" else 0.0,
                  bytes_moved=(gather_scatter_bytes(s, H.DTYPES[dtype].itemsize)
                               if family == "layout" else 0.0),
                  extra={"tags": ",".join(s.tags), "family": family})
    benchmark.group = f"attention {s.name} {dtype} {mode}"
    reason = availability(impl, dev) or mode_unsupported(impl, mode, dev)
    if reason:
        H.skip_case(case, reason)

    # memory guard on CPU (a real OOM there means the OOM killer, not an exception)
    elt = H.DTYPES[dtype].itemsize
    if impl.materialises and not H.on_cuda():
        need = (4 if mode != "fwd" else 2) * s.nxn_bytes(family, elt)
        if need > H.CONFIG["cpu_mem_limit"]:
            H.oom_case(case, f"needs ~{need / 2**30:.1f} GiB for the N×N matrices "
                             f"(> --bench-cpu-mem-limit)", estimated=True)
    overhead = 3.0 if impl.materialises else 2.0
    if impl.name == "msa[sdpa]" and mode != "fwd":
        overhead = 20.0     # CPU flash backward parallelises over batch × heads only (here 1-2)
    slow = H.too_slow_reason(case.flops_fwd * H.MODE_FLOP_FACTOR[mode], dtype, overhead=overhead)
    if slow and H.on_cuda() and family != "msa" and base_name(impl) in ("triton", "fused", "sdpa"):
        slow = None           # the project's own kernels are always measured on a GPU
    if slow and "smoke" not in s.tags:
        H.skip_case(case, slow)

    if impl.name.startswith("triton"):
        xi, pi, _ = make_inputs(s, dtype, family, grad=False, layout=impl.extra.get("layout"))
        why = unsupported_input(impl, xi, pi[0], s.g)
        del xi, pi
        if why:
            H.skip_case(case, f"Triton kernels refuse this input: {why}")
    fn = build(impl)
    # ---- correctness first: a wrong kernel is never timed
    kind = "fwd" if mode == "fwd" else "grad"
    problem = None
    try:
        checked = check(impl, fn, s, dtype, kind)
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}" if str(e) else repr(e)
        if H.is_oom(e):
            problem = ("oom", H.oom_message(e))
        elif impl.compiled or impl.name.startswith("gather+sdpa[") or any(
                m in str(e).lower() for m in UNSUPPORTED_MARKERS):
            problem = ("skip", f"not supported here: {msg}")
        else:
            H.record(case, "ERROR", reason=msg)
            raise
    if problem is not None:   # outside the except block (releases the traceback's tensors)
        if problem[0] == "oom":
            H.oom_case(case, problem[1])
        H.skip_case(case, problem[1])
    err, where = checked[0], checked[1]
    errs = checked[2] if len(checked) > 2 else {"out": err}
    case.extra.update(max_err=err, checked_at=where,
                      **{f"err_{k.replace('@', '_')}": v for k, v in errs.items()})
    if (impl.name, s, dtype, kind) in _FALLBACKS:
        case.extra["note"] = "fell back to sdpa: " + _FALLBACKS[(impl.name, s, dtype, kind)]
    if family == "layout":
        bad = {k: v for k, v in errs.items() if v != 0.0}
    else:
        bad = {k: v for k, v in errs.items()
               if not v <= (TOL_OUT if k.startswith("out") else TOL_GRAD)[dtype]}
    if bad:
        H.record(case, "FAILED", reason=f"rel. errors {bad} above tolerance at {where}")
        pytest.fail(f"{impl.name} disagrees with the oracle at {where}: {bad} "
                    f"(tolerances out {TOL_OUT[dtype]}, grads {TOL_GRAD[dtype]})")

    # ---- timing
    x, params, gout = make_inputs(s, dtype, family, grad=(mode != "fwd"),
                                  layout=impl.extra.get("layout"))
    call = lambda: _call(fn, x, params, s.g, family)  # noqa: E731

    def zero_grads():
        x.grad = None
        for p in params:
            p.grad = None

    # a separate warm-up call: one-time allocations (thread-local buffers, Triton autotuning,
    # compilation) must count neither as time nor as memory
    warmup = 1
    if mode == "fwd":
        def work():
            with torch.no_grad():
                return call()
        H.run_case(benchmark, case, work, warmup=warmup)
    elif mode == "fwdbwd":
        def work():
            zero_grads()
            call().backward(gout)
        H.run_case(benchmark, case, work, warmup=warmup)
    else:
        def setup():
            zero_grads()
            out = call()
            H.sync()
            return (out,)

        def work(out):
            out.backward(gout)
        H.run_case(benchmark, case, work, setup=setup, warmup=warmup)
