"""The Wiener refinement on a busy CPU: the collaborative filter's pass over the whole image
against its bands on single-threaded workers (ssbsn.restore.collaborative), on a quiet machine
and with busy-loop processes competing for the cores.

    python benchmarks/wiener_contention.py [--size 4000x3000] [--threads 2] [--busy 2] \
        [--repeat 1] [--limit 1800] [--memory] [--out benchmarks/results/wiener/contention]

Step 4 of ssbsn.restore.wiener (the filter) on the inputs that steps 1–3 give it for
wiener_compare.py's synthetic photo (the estimate and pilot a blur of the noisy photo), with
``--threads`` torch threads, as each variant of ``--variants``:

* ``whole``: one pass over the whole image in the calling thread, every op on all the threads
  (the filter as it was before the bands; :func:`whole_pass`);
* ``bands``: ``collaborative_wiener`` as it runs: bands of the image on single-threaded workers
  (:func:`ssbsn.restore.collaborative.default_bands`);

first as the machine is (``quiet``), then with ``--busy`` processes of ``while True: pass``
running (``busy``); the variants back to back under each condition, each in a fresh process
stopped after ``--limit`` seconds, ``--repeat`` rounds. Each run records its seconds, its CPU
seconds and the load averages (1, 5, 15 minutes) before and after; the outputs of all the runs
are compared to the bit (SHA-256). ``--memory``: the peak memory of each variant too.

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


def step4_inputs(height: int, width: int, path: Path) -> None:
    """Step 4's inputs on wiener_compare.py's synthetic photo, the estimate and pilot a blur of
    it (steps 1–3 of the refinement, as ``ssbsn.restore.wiener.torch_step4`` receives them,
    with the noise covariances it computes), saved to ``path`` (.npz, float32)."""
    import torch

    from ssbsn.restore import wiener
    from ssbsn.restore.collaborative import DEFAULT, coefficient_covariances
    from ssbsn.restore.lowpass import gaussian_lowpass
    noisy, _ = wiener_compare.synthetic_photo(height, width)
    x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
    est = gaussian_lowpass(x, 1.0)

    class Done(Exception):
        pass

    def keep(z, p, psds, guide):
        cov = np.stack([coefficient_covariances(psd, DEFAULT.block) for psd in psds])
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        np.savez(path, z=f32(z), p=f32(p), cov=f32(cov),
                 **({} if guide is None else dict(guide=f32(guide))))
        raise Done
    try:
        wiener.refine(x, est, est, keep)
    except Done:
        pass


def run_one(variant: str, inputs: str, threads: int) -> dict:
    """Step 4 once as ``variant`` on the saved inputs with ``threads`` torch threads: its
    seconds, the process's CPU seconds over it, and the SHA-256 of the output's bytes."""
    import hashlib

    import torch

    from ssbsn.restore.collaborative import DEFAULT, collaborative_wiener
    torch.set_num_threads(threads)
    d = np.load(inputs)
    t = lambda k: torch.from_numpy(d[k]) if k in d else None  # noqa: E731
    run = whole_pass if variant == "whole" else collaborative_wiener
    t0, c0 = time.perf_counter(), time.process_time()
    out = run(t("z"), t("p"), t("cov"), DEFAULT, t("guide"))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return dict(step4_s=round(wall, 2), cpu_s=round(cpu, 1),
                sha256=hashlib.sha256(out.numpy().tobytes()).hexdigest())


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


def time_variant(variant: str, inputs: Path, threads: int, limit: float) -> dict:
    """One run of step 4 as ``variant`` in a fresh process, stopped after ``limit`` seconds."""
    from ssbsn.restore.collaborative import default_bands
    h = int(np.load(inputs)["z"].shape[1])
    bands = VARIANTS[variant] or default_bands(h, "cpu", threads)[0]
    load0 = _load()
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", variant,
                            "--inputs", str(inputs), "--threads", str(threads)],
                           capture_output=True, text=True, check=True, timeout=limit)
        got = json.loads(r.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        got = dict(step4_s=None, stopped_after_s=round(time.perf_counter() - t0, 1))
    return dict(variant=variant, bands=bands, threads=threads, **got, load_before=load0,
                load_after=_load())


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
          "Step 4 of `ssbsn.restore.wiener` (the collaborative filter) on the inputs that steps "
          f"1–3 give it for a synthetic {env['width']}×{env['height']} RGB photo "
          "(`wiener_compare.synthetic_photo`), as `whole` (one pass over the image, every op on all the threads: the filter before "
          "the bands) or `bands` (`collaborative_wiener` as it runs: bands of the image on "
          "single-threaded workers). `quiet`: the machine as it was (other jobs "
          f"share it: see the load); `busy`: with {env['busy']} processes of "
          "`while True: pass` running. The variants ran back to back under each condition, each "
          f"in a fresh process stopped after {env['limit']:.0f} s; load averages over 1, 5 and "
          "15 minutes.", "",
          "| condition | variant | bands | step 4 s | CPU s | load before | load after |",
          "|---|---|---|---|---|---|---|"]
    for r in runs:
        secs = (f"{r['step4_s']:.1f} | {r['cpu_s']:.0f}" if r["step4_s"] is not None else
                f"stopped after {r['stopped_after_s']:.0f} | ")
        md.append(f"| {r['condition']} | {r['variant']} | {r['bands']} | {secs} | "
                  f"{' / '.join(f'{v:.2f}' for v in r['load_before'])} | "
                  f"{' / '.join(f'{v:.2f}' for v in r['load_after'])} |")
    md += ["", "The outputs of all the runs that finished equal to the bit: "
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
    ap.add_argument("--limit", type=float, default=1800.0,
                    help="seconds after which a run is stopped (and reported as such)")
    ap.add_argument("--memory", action="store_true", help="the peak memory of each variant too")
    ap.add_argument("--out", default=str(HERE / "results" / "wiener" / "contention"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)     # a run's own process
    ap.add_argument("--inputs", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from ssbsn.allocator import use_huge_pages
    use_huge_pages()  # as the ssbsn command does, before torch is imported
    if args.one:
        print(json.dumps(run_one(args.one, args.inputs, args.threads)))
        return 0
    import tempfile
    w, h = (int(v) for v in args.size.lower().split("x"))
    variants = [v for v in args.variants.split(",") if v]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "step4.npz"
        step4_inputs(h, w, inputs)
        for _ in range(max(1, args.repeat)):
            for cond in [c for c in args.conditions.split(",") if c]:
                procs = busy_processes(args.busy) if cond == "busy" else []
                try:
                    for v in variants:
                        runs.append(dict(condition=cond,
                                         **time_variant(v, inputs, args.threads, args.limit)))
                        print(f"wiener_contention: {runs[-1]}", flush=True)
                finally:
                    end(procs)
    sums = {r["sha256"] for r in runs if r.get("sha256")}
    same = len(sums) == 1
    memory = {v: step4_memory(h, w, v, args.threads) for v in variants} \
        if args.memory else {}
    env = quality.environment()
    env.pop("threads_per_run", None)
    env.pop("bm3d", None)
    env.update(threads=args.threads, busy=args.busy, width=w, height=h, limit=args.limit,
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
