"""Issue 9's memory target: ``SSBSN.load(p).denoise(512×512)`` on CPU with the default
(memory-efficient) SS-Attention path stays under 1.5 GB.

    python -m benchmarks.denoise_memory            # paper-size model, 512×512, one thread
    python -m benchmarks.denoise_memory --json benchmarks/results/denoise_memory.json

Procedure: save a paper-size model (128 channels, 9 modules, 3 SS-Blocks; random weights: the
memory does not depend on their values) to a safetensors file, load it back with
``SSBSN.load`` (no backend named: the default), and denoise one 1×3×512×512 image with the
model's own inference settings (the paper's: PD 2 and R3; ``--no-r3`` for a single pass, R3's
passes run one after another and do not raise the peak). The peak is the process's whole
resident-memory high-water mark (VmHWM: Python, PyTorch, weights, image and every
intermediate), the figure a user's machine sees. For comparison it reports what the N×N
reference would need for its attention matrices alone (computed, not run: it does not fit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

LIMIT_GB = 1.5


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-r3", dest="r3", action="store_false")
    ap.add_argument("--json", default=None, help="write the result here")
    args = ap.parse_args(argv)

    import torch

    from benchmarks.measure import proc_kib
    from ssbsn import SSBSN
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "paper.safetensors")
        SSBSN().save(path)
        model = SSBSN.load(path).eval()
    backends = sorted({m.backend for m in model.modules() if type(m).__name__ == "SSAttention"})
    x = torch.rand(1, 3, args.size, args.size) * 255
    t0 = time.perf_counter()
    with torch.no_grad():
        y = model.denoise(x, r3=args.r3)
    seconds = time.perf_counter() - t0
    peak_gb = proc_kib("VmHWM") / 2**20
    # the reference's attention matrices: per SS-Block, g² groups of N×N fp32 logits + softmax
    side = args.size + 2 * model.pd_test * model.pd_pad
    ref_gb = max(2 * side * side / g ** 2 * side * side * 4 for g in (4, 6)) / 2**30
    result = dict(what=f"SSBSN.load(p).denoise(1×3×{args.size}×{args.size}), default backend",
                  backend=backends, r3=args.r3, threads=args.threads,
                  peak_rss_gb=round(peak_gb, 3), limit_gb=LIMIT_GB, ok=peak_gb < LIMIT_GB,
                  seconds=round(seconds, 1), finite=bool(torch.isfinite(y).all()),
                  reference_attention_matrices_gb=round(ref_gb, 1),
                  torch=torch.__version__, python=platform.python_version(),
                  machine=platform.machine(), date=time.strftime("%Y-%m-%d"))
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0 if result["ok"] and result["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
