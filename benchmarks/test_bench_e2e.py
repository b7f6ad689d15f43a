"""End to end: an SS-BSN training step and tiled R3 inference, fused vs reference attention.

* Training step = forward (PD-5) + L1 loss against the input + backward + Adam step, batch 4,
  at 120 / 255 / 510 crops (the multiples of 5 PD-5 needs, for "256" and "512") on a GPU
  (the paper's model); on CPU a small model at 20 / 40 crops.
* Inference = ``model.denoise(x, r3=True, tile=…)`` of a 12 MP (3000×4000) image on a GPU; on
  CPU a small model on a 48×64 image in 32-pixel tiles (overlap 8).
Before timing, the fused model's output is compared with the reference model's (same weights)
at the case's size, or at a reduced one where the reference would not fit.
"""
from __future__ import annotations

import pytest
import torch

from . import harness as H
from . import env, measure
from .impls import package_backends

pytestmark = [pytest.mark.e2e]

try:
    from ssbsn import SSBSN
except Exception as _e:  # noqa: BLE001
    SSBSN = None
    _IMPORT_ERROR = f"{type(_e).__name__}: {_e}"

IMPLS = ("reference", "fused")


def model_config(size: str) -> dict:
    if size == "full":
        return {}
    return dict(base_channels=16, num_modules=3, ss_blocks=2)


def train_params(size: str):
    if size == "full":
        crops, batch = (120, 255, 510), 4    # PD-5 needs multiples of 5: 256 → 255, 512 → 510
    else:
        crops, batch = (20, 40), 2
    out = []
    for crop in crops:
        for impl in IMPLS:
            marks = [pytest.mark.smoke] if (crop == crops[0] and size == "small") else []
            out.append(pytest.param(crop, batch, impl, id=f"crop{crop}-b{batch}-{impl}", marks=marks))
    return out


def infer_params(size: str):
    if size == "full":
        return [pytest.param((3000, 4000), t, impl, id=f"12MP-tile{t}-{impl}")
                for t in (256, 1024) for impl in IMPLS]
    return [pytest.param((48, 64), 32, impl, id=f"48x64-tile32-{impl}") for impl in IMPLS]


def pytest_generate_tests(metafunc):
    size = H.context(metafunc.config).size
    if metafunc.function.__name__ == "test_train_step":
        metafunc.parametrize("crop,batch,impl", train_params(size))
    elif metafunc.function.__name__ == "test_inference_r3_tiled":
        metafunc.parametrize("size,tile,impl", infer_params(size))


def _availability(impl: str) -> str | None:
    if SSBSN is None:
        return f"ssbsn not importable: {_IMPORT_ERROR}"
    if impl == "fused" and "fused" not in package_backends():
        return (f"ssbsn backend 'fused' not available yet "
                f"(BACKENDS = {package_backends()}); SSBSN(fused=True) cannot run")
    return None


def _models(impl: str, dev, size: str):
    torch.manual_seed(0)
    ref = SSBSN(**model_config(size)).to(dev)
    if impl == "reference":
        return ref, ref
    model = SSBSN(**model_config(size), fused=True).to(dev)
    model.load_state_dict(ref.state_dict())
    return model, ref


def _rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _check_train(model, ref, batch, crop, dev) -> tuple[float, str]:
    """Compare outputs and the gradients of the loss (first SS-Block's W) at this crop, or a
    reduced 40-pixel one if the reference does not fit."""
    if model is ref:
        return 0.0, "-"
    for c in (crop, 40):
        try:
            x = torch.rand(batch if c == crop else 1, 3, c, c, device=dev) * 255
            errs = []
            for m in (model, ref):
                m.zero_grad(set_to_none=True)
                out = m(x)
                (out - x).abs().mean().backward()
                errs.append(out.detach())
            e_out = _rel_err(errs[0], errs[1])
            pairs = [(p1.grad, p2.grad) for (n, p1), (_, p2) in
                     zip(model.named_parameters(), ref.named_parameters()) if n.endswith("wqk")]
            e_grad = max((_rel_err(a, b) for a, b in pairs if a is not None), default=0.0)
            for m in (model, ref):
                m.zero_grad(set_to_none=True)
            return max(e_out, e_grad), f"{x.shape[0]}×3×{c}×{c}"
        except Exception as e:  # noqa: BLE001
            if not measure.is_oom(e) or c == 40:
                raise
        measure.free_memory()        # (after the except block: the traceback is gone)
    raise AssertionError("unreachable")


def test_train_step(benchmark, bench_ctx, crop, batch, impl):
    dev = env.device()
    cfg = model_config(bench_ctx.size)
    C = cfg.get("base_channels", 128)
    case = H.Case(
        ctx=bench_ctx, suite="e2e", name=f"train-crop{crop}", impl=impl, mode="step", dtype="fp32",
        B=batch, C=C, H=crop, W=crop, tokens=batch * crop * crop,
        extra={"what": "fwd+bwd+Adam", "model": str(cfg or "paper")})
    benchmark.group = f"e2e train crop {crop}"
    reason = _availability(impl)
    if reason:
        H.skip_case(case, reason)
    oom = None
    try:
        model, ref = _models(impl, dev, bench_ctx.size)
        err, where = _check_train(model, ref, batch, crop, dev)
    except Exception as e:  # noqa: BLE001
        if not measure.is_oom(e):
            raise
        oom = measure.oom_message(e)
    if oom is not None:
        H.oom_case(case, oom)
    case.extra.update(max_err=err, checked_at=where)
    if err > 1e-3:
        H.record(case, "FAILED", reason=f"fused vs reference rel. error {err:.2e} at {where}")
        pytest.fail(f"fused model disagrees with the reference: {err:.3e} at {where}")
    del ref
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, crop, crop, device=dev) * 255

    def step():
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - x).abs().mean()
        loss.backward()
        opt.step()

    H.run_case(benchmark, case, step)


def test_inference_r3_tiled(benchmark, bench_ctx, size, tile, impl):
    dev = env.device()
    cfg = model_config(bench_ctx.size)
    Hh, W = size
    case = H.Case(
        ctx=bench_ctx, suite="e2e", name=f"denoise-{Hh}x{W}-tile{tile}", impl=impl, mode="infer",
        dtype="fp32", B=1, C=cfg.get("base_channels", 128), H=Hh, W=W,
        tokens=Hh * W, extra={"what": "denoise(r3=True, tiled)",
                              "model": str(cfg or "paper")})
    benchmark.group = f"e2e denoise {Hh}x{W}"
    reason = _availability(impl)
    if reason:
        H.skip_case(case, reason)
    overlap = 64 if bench_ctx.size == "full" else 8
    oom = None
    try:
        model, ref = _models(impl, dev, bench_ctx.size)
        model.eval()
        ref.eval()
        if model is not ref:     # check on a crop of at most two tiles
            xs = torch.rand(1, 3, min(Hh, 2 * tile), min(W, tile), device=dev) * 255
            small_tile = min(tile, 256)
            err = _rel_err(model.denoise(xs, tile=small_tile, overlap=overlap),
                           ref.denoise(xs, tile=small_tile, overlap=overlap))
            case.extra.update(max_err=err, checked_at=f"1×3×{xs.shape[2]}×{xs.shape[3]}")
            if err > 1e-3:
                H.record(case, "FAILED", reason=f"fused vs reference rel. error {err:.2e}")
                pytest.fail(f"fused denoise disagrees with the reference: {err:.3e}")
        del ref
    except Exception as e:  # noqa: BLE001
        if not measure.is_oom(e):
            raise
        oom = measure.oom_message(e)
    if oom is not None:
        H.oom_case(case, oom)
    x = torch.rand(1, 3, Hh, W, device=dev) * 255

    def run():
        with torch.no_grad():
            return model.denoise(x, r3=True, tile=tile, overlap=overlap)

    H.run_case(benchmark, case, run, warmup=0)
