"""Peak-RSS probe: run one SS-Attention implementation in a fresh process and report the
peak resident-memory increase of its forward (+ backward) and its wall time, as one JSON line.

    python -m benchmarks.memprobe --impl authors --shape 1,128,264,264 --grid 4 --mode fwdbwd

Procedure: warm up at a small size (thread pools, kernel selection), allocate the inputs,
reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), run once and read
VmHWM − VmRSS(before) — the memory the computation itself needed on top of its inputs — then
time ``--repeats`` further runs.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", required=True)
    ap.add_argument("--shape", default="1,128,264,264")
    ap.add_argument("--grid", type=int, default=4)
    ap.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwdbwd")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch

    from benchmarks.authors import authors_ss_attention
    from benchmarks.impls import pinned_sdpa
    from benchmarks.measure import proc_kib, reset_peak_rss

    if a.threads:
        torch.set_num_threads(a.threads)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    B, C, Hh, W = map(int, a.shape.split(","))
    g = a.grid

    if a.impl == "authors":
        fn = authors_ss_attention
    elif a.impl.startswith("gather+sdpa["):
        fn = pinned_sdpa(a.impl[len("gather+sdpa["):-1])
    else:
        from ssbsn.attention.functional import ss_attention

        def fn(x, w, grid, _b=a.impl):
            return ss_attention(x, w, grid, backend=_b)

    def run(x, w, gout):
        if a.mode == "fwd":
            with torch.no_grad():
                return fn(x, w, g)
        x.grad = w.grad = None
        out = fn(x, w, g)
        out.backward(gout)
        return None

    def inputs(b, c, h, w_):
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(b, c, h, w_, generator=gen) + 1).to(dt).requires_grad_(a.mode != "fwd")
        w = (torch.randn(c, c, generator=gen) * 0.1).to(dt).requires_grad_(a.mode != "fwd")
        return x, w, torch.randn(b, c, h, w_, generator=gen).to(dt)

    run(*inputs(1, C, 8 * g, 8 * g))          # warm-up at a small size
    x, w, gout = inputs(B, C, Hh, W)
    gc.collect()
    reset_ok = reset_peak_rss()
    base = proc_kib("VmRSS")
    t = time.perf_counter()
    run(x, w, gout)
    first = time.perf_counter() - t
    peak = proc_kib("VmHWM")
    times = [first]
    for _ in range(a.repeats):
        t = time.perf_counter()
        run(x, w, gout)
        times.append(time.perf_counter() - t)
    steady = times[1:] or times
    print(json.dumps({
        "impl": a.impl, "shape": [B, C, Hh, W], "grid": g, "mode": a.mode, "dtype": a.dtype,
        "peak_rss_delta_mib": (peak - base) / 1024, "rss_base_mib": base / 1024,
        "peak_reset": reset_ok, "first_s": first, "times_s": steady,
        "median_s": sorted(steady)[len(steady) // 2], "threads": torch.get_num_threads(),
        "input_mib": 3 * x.numel() * x.element_size() / 2**20,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
