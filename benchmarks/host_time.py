"""The fused op's host time without a GPU: one eager forward + backward of ``ssbsn::ss_attention``
at the training shape, on ``meta`` tensors, with every Triton launch replaced by a recorder
that returns at once. What is left is the host's own work per call: the custom-op dispatch,
autograd, the launchers' Python (geometry, allocations, the configuration cache) and the
arguments handed to Triton. Triton's own launch path (its argument specialisation and the
driver call) is not included; the number of launches is printed beside the time.

    python -m benchmarks.host_time [--shape B C H W] [--grid G] [--reps N] [--json OUT]

Runs without TRITON_INTERPRET (the compiled kernels' host path; nothing is compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def measure(shape=(4, 128, 140, 140), grid=4, reps=300, deterministic=False, device="cpu",
            dtype="bfloat16") -> dict:
    import torch

    import ssbsn.kernels  # noqa: F401

    from .aot import launches_recorded
    K = sys.modules["ssbsn.kernels.ss_attention"]
    launches = []
    configs = dict(K._CONFIGS)
    K._CONFIGS.clear()
    tdt = getattr(torch, dtype)
    x = torch.empty(shape, dtype=tdt, device=device).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.empty(shape[1], shape[1], dtype=torch.float32, device=device).requires_grad_()
    go = torch.empty_like(x)
    # the eager cache of the autotuner's choice, as after the first call of a shape bucket
    for kernel in (K._ss_attn_fwd_kernel, K._ss_attn_bwd_dkdv_kernel, K._ss_attn_bwd_dq_kernel):
        kernel.best_config = kernel.configs[0]
    try:
        with launches_recorded(lambda kernel, args, kw: launches.append(kernel)):
            def step():
                out = torch.ops.ssbsn.ss_attention(x, w, grid, False, deterministic, 0)[0]
                out.backward(go)
                x.grad = w.grad = None

            for _ in range(20):
                step()
            launches.clear()
            step()
            per_call = len(launches)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
    finally:
        for kernel in (K._ss_attn_fwd_kernel, K._ss_attn_bwd_dkdv_kernel,
                       K._ss_attn_bwd_dq_kernel):
            kernel.best_config = None
        K._CONFIGS.clear()
        K._CONFIGS.update(configs)
    return {"shape": list(shape), "grid": grid, "dtype": dtype, "deterministic": deterministic,
            "launches": per_call, "median_us": statistics.median(times) * 1e6,
            "p10_us": sorted(times)[len(times) // 10] * 1e6, "reps": reps,
            "torch": torch.__version__}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=4, default=[4, 128, 140, 140])
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("host_time: run without TRITON_INTERPRET (the compiled kernels' host path)",
              file=sys.stderr)
        return 2
    import platform

    import torch
    torch.set_num_threads(1)
    rows = [measure(tuple(a.shape), a.grid, a.reps, det) for det in (False, True)]
    for r in rows:
        print(f"{tuple(r['shape'])} g={r['grid']} {r['dtype']} "
              f"{'deterministic' if r['deterministic'] else 'default'}: {r['launches']} launches, "
              f"host {r['median_us']:.0f} µs per fwd+bwd (median; p10 {r['p10_us']:.0f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": platform.processor() or platform.machine(), "rows": rows}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
