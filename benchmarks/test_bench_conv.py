"""The blind-spot network's convolutions: the CUDA extension (conv backend "cuda") vs cuDNN
(backend "torch" = ``F.conv2d``).

Ops: the central-masked k×k conv of each branch (k = 3 for d = 2, k = 5 for d = 3; FLOPs count
the k² − 1 live taps) and the 3×3 dilated conv (d = 2, 3), C → C channels. The "cuda" rows are
checked against cuDNN with TF32 disabled before they are timed; they skip with a reason where
the extension is not built (always on CPU). The "torch" rows also run on CPU, at small size.
"""
from __future__ import annotations

import pytest
import torch

from . import harness as H
from . import env, measure

pytestmark = [pytest.mark.conv]

try:
    from ssbsn.nn import conv as _conv
except Exception as _e:  # noqa: BLE001
    _conv = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

OPS = (("masked", 2), ("masked", 3), ("dilated", 2), ("dilated", 3))
BACKENDS = ("torch", "cuda")
TOL = {"fp32": 1e-3, "bf16": 3e-2}


def conv_shapes(size: str):
    if size == "full":
        return [("train", 4, 128, 140, 140), ("sidd", 1, 128, 264, 264)]
    return [("small", 2, 32, 60, 60)]


def _params(size: str):
    out = []
    full = size == "full"
    for shp in conv_shapes(size):
        for op, d in OPS:
            for dt in (("fp32", "bf16") if full else ("fp32",)):
                for mode in ("fwd", "fwdbwd"):
                    for be in BACKENDS:
                        out.append(pytest.param((shp, op, d, dt, mode, be),
                                                id=f"{shp[0]}-{op}-d{d}-{dt}-{mode}-{be}"))
    return out


def pytest_generate_tests(metafunc):
    if "conv_case" in metafunc.fixturenames:
        metafunc.parametrize("conv_case", _params(H.context(metafunc.config).size))


def _availability(backend: str) -> str | None:
    if _conv is None:
        return f"ssbsn.nn.conv not importable: {_IMPORT_ERROR}"
    if backend == "cuda":
        if "cuda" not in getattr(_conv, "CONV_BACKENDS", ()):
            return (f"conv backend 'cuda' not built (ssbsn.nn.conv.CONV_BACKENDS = "
                    f"{getattr(_conv, 'CONV_BACKENDS', ())})")
        if not torch.cuda.is_available():
            return "conv backend 'cuda' needs a CUDA device"
    return None


def _fn(op: str, d: int, backend: str):
    if op == "masked":
        return lambda x, w, b: _conv.masked_conv2d(x, w, b, relu=True, backend=backend)
    return lambda x, w, b: _conv.dilated_conv2d(x, w, b, dilation=d, relu=True, backend=backend)


def _inputs(B, C, Hh, W, k, dtype, grad):
    gen = torch.Generator().manual_seed(B * 1000 + C + Hh + k)
    dev, dt = env.device(), measure.DTYPES[dtype]
    x = torch.randn(B, C, Hh, W, generator=gen).to(dev, dt).requires_grad_(grad)
    w = (torch.randn(C, C, k, k, generator=gen) / (3 * C) ** 0.5).to(dev, dt).requires_grad_(grad)
    b = (0.1 * torch.randn(C, generator=gen)).to(dev, dt).requires_grad_(grad)
    gout = torch.randn(B, C, Hh, W, generator=gen).to(dev, dt)
    return x, w, b, gout


def _run(fn, x, w, b, gout, grad: bool):
    if not grad:
        with torch.no_grad():
            return [fn(x, w, b).float()]
    x.grad = w.grad = b.grad = None
    out = fn(x, w, b)
    out.backward(gout)
    return [out.detach().float(), x.grad.float(), w.grad.float(), b.grad.float()]


def test_conv(benchmark, bench_ctx, conv_case):
    (name, B, C, Hh, W), op, d, dtype, mode, backend = conv_case
    k = 2 * d - 1 if op == "masked" else 3
    taps = k * k - 1 if op == "masked" else 9
    case = H.Case(
        ctx=bench_ctx, suite="conv", name=f"{name}-{op}{k}x{k}-d{d}", impl=backend, mode=mode,
        dtype=dtype, B=B, C=C, H=Hh, W=W, tokens=B * Hh * W,
        flops_fwd=2.0 * B * C * C * taps * Hh * W,
        extra={"op": op, "kernel": k, "dilation": d})
    benchmark.group = f"conv {name} {op} d{d} {dtype} {mode}"
    reason = _availability(backend)
    if reason:
        H.skip_case(case, reason)
    grad = mode != "fwd"
    fn = _fn(op, d, backend)
    x, w, b, gout = _inputs(B, C, Hh, W, k, dtype, grad)
    if backend != "torch":   # check against cuDNN without TF32 before timing
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            ref = _run(_fn(op, d, "torch"), x, w, b, gout, grad)
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        got = _run(fn, x, w, b, gout, grad)
        err = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-12)).item()
                  for g, r in zip(got, ref))
        case.extra["max_err"] = err
        if not err <= TOL[dtype]:
            H.record(case, "FAILED", reason=f"rel. error {err:.2e} vs cuDNN")
            pytest.fail(f"conv backend {backend!r} disagrees with cuDNN: {err:.3e}")
    if grad:
        def work():
            x.grad = w.grad = b.grad = None
            fn(x, w, b).backward(gout)
    else:
        def work():
            with torch.no_grad():
                return fn(x, w, b)
    H.run_case(benchmark, case, work)
