"""The Wiener refinement on a busy CPU: the collaborative filter's pass over the whole image
against its bands on single-threaded workers (ssbsn.restore.collaborative), on a quiet machine
and with busy-loop processes competing for the cores.

    python benchmarks/wiener_contention.py [--size 4000x3000] [--threads 2] [--busy 2] \
        [--repeat 1] [--out benchmarks/results/wiener/contention]

On wiener_compare.py's synthetic photo (the estimate and pilot a blur of it), steps 1–5 of
ssbsn.restore.wiener with step 4 by ``collaborative_wiener`` with ``--threads`` torch threads,
each variant of ``--variants``:

* ``whole``: one pass over the whole image in the calling thread, every op on all the threads
  (the filter as it was before the bands; :func:`whole_pass`);
* ``bands``: ``collaborative_wiener`` as it runs: bands of the image on single-threaded workers
  (:func:`ssbsn.restore.collaborative.default_bands`);

first as the machine is (``quiet``), then with ``--busy`` processes of ``while True: pass``
running (``busy``); the variants back to back under each condition, ``--repeat`` rounds. Each
run records the seconds of the whole refinement and of step 4, the process's CPU seconds and
the load averages (1, 5, 15 minutes) before and after; the step-4 outputs of the variants are
compared to the bit. ``--memory``: the peak memory of step 4 alone for each variant (a fresh
process each).

Writes ``results.json`` and ``README.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (sibling scripts: the environment, the synthetic photo)
import wiener_compare  # noqa: E402

VARIANTS = {"whole": 1, "bands": None}  # the bands of each variant (None: the default)


def whole_pass(z, p, cov, params, guide):
    """The filter as it was before the bands: one pass over the whole image in the calling
    thread, every op on torch's threads (the pass that every band is a part of)."""
    from ssbsn.restore.collaborative import _Filter
    f = _Filter(z.permute(1, 2, 0), p.permute(1, 2, 0),
                None if guide is None else guide[:, :, None], cov, params, 16)
    return f.band(0, z.shape[1]).permute(2, 0, 1).contiguous()


def step4_with(variant: str):
    """Step 4 as ``ssbsn.restore.wiener.torch_step4`` runs it on the CPU, as ``variant``."""
    import torch

    from ssbsn.restore.collaborative import DEFAULT, coefficient_covariances, collaborative_wiener
    run = whole_pass if variant == "whole" else collaborative_wiener

    def step4(z, p, psds, guide):
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        cov = np.stack([coefficient_covariances(psd, DEFAULT.block) for psd in psds])
        out = run(f32(z), f32(p), f32(cov), DEFAULT, None if guide is None else f32(guide))
        return out.double().numpy()
    return step4


def busy_processes(count: int) -> list:
    """``count`` processes that keep one core busy each (ended by :func:`end`)."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
             for _ in range(count)]
    time.sleep(2.0)  # under way before the timing starts
    return procs


def end(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def _load():
    return [round(v, 2) for v in os.getloadavg()]


def time_variant(x, est, variant: str, threads: int) -> tuple[dict, np.ndarray]:
    """One run of the refinement with step 4 as ``variant``: its figures, and step 4's output."""
    import torch

    from ssbsn.restore import wiener
    from ssbsn.restore.collaborative import default_bands
    step4 = step4_with(variant)
    got = {}

    def timed(*a):
        t = time.perf_counter()
        got["out"] = step4(*a)
        got["step4_s"] = round(time.perf_counter() - t, 2)
        return got["out"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        bands = VARIANTS[variant] or default_bands(x.shape[-2], "cpu")[0]
        load0 = _load()
        t0, c0 = time.perf_counter(), time.process_time()
        wiener.refine(x, est, est, timed)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)
    return dict(variant=variant, bands=bands, threads=threads, total_s=round(total, 2),
                step4_s=got["step4_s"], cpu_s=round(cpu, 1), load_before=load0,
                load_after=_load()), got["out"]


def step4_memory(height: int, width: int, variant: str, threads: int) -> float:
    """Peak memory (GB) of step 4 alone as ``variant`` (three float32 channels) in a fresh
    process: the growth of its peak resident memory over the call."""
    code = f"""
import json, sys
sys.path[:0] = {[str(HERE), str(HERE.parent)]!r}
import numpy as np, torch
torch.set_num_threads({threads})
import wiener_compare as wc
import wiener_contention as wcn
from ssbsn.restore.collaborative import DEFAULT, collaborative_wiener, coefficient_covariances
rng = np.random.default_rng(0)
z = torch.from_numpy(rng.standard_normal((3, {height}, {width}), dtype=np.float32))
p = torch.nn.functional.avg_pool2d(z[None], 3, 1, 1)[0]
cov = torch.from_numpy(np.stack([coefficient_covariances(np.full((64, 64), 64.0 * 64))] * 3)
                       .astype(np.float32))
base = wc._peak_rss()
run = wcn.whole_pass if {variant!r} == "whole" else collaborative_wiener
out = run(z, p, cov, DEFAULT, None)
print(json.dumps(dict(peak_growth_bytes=wc._peak_rss() - base)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return round(d["peak_growth_bytes"] / 2**30, 2)


def report_md(env, runs, same, memory) -> str:
    md = ["# The Wiener refinement on a busy CPU: the whole image against bands", "",
          f"{env['device']}; torch {env['torch']}; {env['date']}; "
          f"{env['threads']} torch threads. Command: `{env['command']}`.", "",
          "Steps 1–5 of `ssbsn.restore.wiener` on a synthetic "
          f"{env['width']}×{env['height']} RGB photo (`wiener_compare.synthetic_photo`), step 4 "
          "as `whole` (one pass over the image, every op on all the threads: the filter before "
          "the bands) or `bands` (`collaborative_wiener` as it runs: bands of the image on "
          "single-threaded workers). `quiet`: the machine as it was (other jobs "
          f"share it: see the load); `busy`: with {env['busy']} processes of "
          "`while True: pass` running. The variants ran back to back under each condition; "
          "load averages over 1, 5 and 15 minutes.", "",
          "| condition | variant | bands | total s | step 4 s | CPU s | load before | "
          "load after |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        md.append(f"| {r['condition']} | {r['variant']} | {r['bands']} | {r['total_s']:.1f} | "
                  f"{r['step4_s']:.1f} | {r['cpu_s']:.0f} | "
                  f"{' / '.join(f'{v:.2f}' for v in r['load_before'])} | "
                  f"{' / '.join(f'{v:.2f}' for v in r['load_after'])} |")
    md += ["", "Step 4's output of every variant equal to the bit: "
           f"{'yes' if same else 'NO'}."]
    if memory:
        md += ["", "Peak memory of step 4 alone (a fresh process, the growth of its peak "
               "resident memory over the call): " + ", ".join(
                   f"{k} {v:.2f} GB" for k, v in memory.items()) + "."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="4000x3000", help="the photo, WxH")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--busy", type=int, default=2, help="busy-loop processes of the busy runs")
    ap.add_argument("--variants", default="whole,bands")
    ap.add_argument("--conditions", default="quiet,busy")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--memory", action="store_true", help="the peak memory of each variant too")
    ap.add_argument("--out", default=str(HERE / "results" / "wiener" / "contention"))
    args = ap.parse_args(argv)
    from ssbsn.allocator import use_huge_pages
    use_huge_pages()  # as the ssbsn command does, before torch is imported
    import torch

    from ssbsn.restore.lowpass import gaussian_lowpass
    w, h = (int(v) for v in args.size.lower().split("x"))
    variants = [v for v in args.variants.split(",") if v]
    noisy, _ = wiener_compare.synthetic_photo(h, w)
    x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
    est = gaussian_lowpass(x, 1.0)
    runs, outs = [], {}
    for _ in range(max(1, args.repeat)):
        for cond in [c for c in args.conditions.split(",") if c]:
            procs = busy_processes(args.busy) if cond == "busy" else []
            try:
                for v in variants:
                    r, out = time_variant(x, est, v, args.threads)
                    runs.append(dict(condition=cond, **r))
                    outs.setdefault(v, out)
                    print(f"wiener_contention: {cond}: {runs[-1]}", flush=True)
            finally:
                end(procs)
    same = all(np.array_equal(o, next(iter(outs.values()))) for o in outs.values())
    memory = {v: step4_memory(h, w, v, args.threads) for v in variants} \
        if args.memory else {}
    env = quality.environment()
    env.pop("threads_per_run", None)
    env.pop("bm3d", None)
    env.update(threads=args.threads, busy=args.busy, width=w, height=h,
               command="python benchmarks/wiener_contention.py " + " ".join(
                   quality._public_args(argv, paths=("--out",))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(dict(
        environment=env, runs=runs, identical=same, memory_gb=memory), indent=1) + "\n")
    md = report_md(env, runs, same, memory)
    (out / "README.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
