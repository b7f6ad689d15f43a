"""Benchmark of the blind-spot convolutions: backend="cuda" (csrc/) against backend="torch"
(cuDNN) at the SS-BSN shapes, forward and forward+backward.

    python csrc/bench_conv.py                       # all shapes, bf16 and fp32, channels_last
    python csrc/bench_conv.py --dtype bf16 --layout nchw --kinds dilated2 masked5 --iters 50

Needs a CUDA device and the extension (pip install -e . with a CUDA torch, or SSBSN_CONV_JIT=1).
TFLOP/s count the useful multiply-adds only: taps x Ci x Co per pixel (8 or 24 taps for the masked
conv, 9 for the dilated one), x2 for the backward (input and weight gradients).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ssbsn.nn import _cuda_ext, conv

SHAPES = {"train": (4, 128, 140, 140), "infer": (1, 128, 264, 264)}
KINDS = {"masked3": ("masked", 3), "masked5": ("masked", 5), "dilated2": ("dilated", 2), "dilated3": ("dilated", 3)}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _call(kind, param, x, w, b, backend, algo):
    if backend == "cuda":
        taps = conv._masked_taps(param) if kind == "masked" else conv._dilated_taps(param)
        return conv._cuda_conv(x, w, b, taps, True, algo=algo)
    if kind == "masked":
        return conv.masked_conv2d(x, w, b, relu=True, backend="torch")
    return conv.dilated_conv2d(x, w, b, dilation=param, relu=True, backend="torch")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    p.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    p.add_argument("--layout", nargs="+", default=["nhwc"], choices=["nhwc", "nchw"])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_conv: no CUDA device", file=sys.stderr)
        return 1
    if _cuda_ext.get_ops() is None:
        print(f"bench_conv: {conv.conv_backend_info()}", file=sys.stderr)
        return 1
    print(f"# {conv.conv_backend_info()}; torch {torch.__version__}; cudnn.allow_tf32="
          f"{torch.backends.cudnn.allow_tf32}")
    print(f"{'shape':6} {'conv':9} {'dtype':5} {'layout':6} {'impl':12} {'fwd ms':>8} {'TF/s':>6} "
          f"{'fwd+bwd ms':>10} {'TF/s':>6}")
    for shape in args.shapes:
        n, c, h, w = SHAPES[shape]
        for kname in args.kinds:
            kind, param = KINDS[kname]
            k = param if kind == "masked" else 3
            taps = k * k - 1 if kind == "masked" else 9
            flops = 2.0 * n * h * w * c * c * taps
            for dname in args.dtype:
                dtype = DTYPES[dname]
                algos = ["fma"] if dtype == torch.float32 else ["wmma", "fma"]
                for layout in args.layout:
                    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                    x = torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
                    wt = (torch.randn(c, c, k, k, device="cuda") / (c * k)).to(dtype).requires_grad_()
                    b = torch.zeros(c, device="cuda", dtype=dtype, requires_grad=True)
                    xg = x.clone().requires_grad_()
                    for impl in ["torch"] + [f"cuda-{a}" for a in algos]:
                        backend, algo = (impl, None) if impl == "torch" else ("cuda", impl.split("-")[1])

                        def fwd():
                            with torch.no_grad():
                                _call(kind, param, x, wt, b, backend, algo)

                        def fwd_bwd():
                            y = _call(kind, param, xg, wt, b, backend, algo)
                            y.backward(torch.ones_like(y))

                        t_f, t_fb = _time_ms(fwd, args.iters), _time_ms(fwd_bwd, args.iters)
                        print(f"{shape:6} {kname:9} {dname:5} {layout:6} {impl:12} {t_f:8.3f} "
                              f"{flops / t_f / 1e9:6.1f} {t_fb:10.3f} {3 * flops / t_fb / 1e9:6.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
