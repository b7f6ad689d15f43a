"""The Wiener refinement's step 4 (docs/model.md, step 8): the torch collaborative filter of
:mod:`ssbsn.restore.collaborative` against the ``bm3d`` package it replaced, on the same
estimates, and its speed on a large photo.

    python benchmarks/wiener_compare.py --cache CACHE [--seeds 0,1] --out DIR

CACHE holds models trained by ``benchmarks/quality.py --cache CACHE`` (8 CPU-minutes of the
quick preset on the held-out photos: ``run_ssbsn_8_quick_all_None_256_<seed>_...safetensors``).
For each seed whose model is there, each held-out photo and noise level of the quality
benchmark: the network's estimate and the blend with the noisy pixel as ``SSBSN.denoise``
computes them, then steps 1–5 of :mod:`ssbsn.restore.wiener` with step 4 done by

* ``new``: :func:`ssbsn.restore.collaborative.collaborative_wiener` (what
  ``collaborative_refinement`` runs),
* ``bm3d``: the ``bm3d`` package's Wiener stage (its correlated-noise profile, one thread;
  the groups found on the luminance reused for the chroma), when the package is installed,

then the tone-curve debias; PSNR/SSIM of the 8-bit outputs against the clean photo, and the
seconds each refinement took. ``--demo MODEL`` adds the demo's photos with a demo model.

Speed (``--size``): the whole refinement (steps 1–5) and step 4 alone on a synthetic photo of
4000×3000 pixels (a mosaic of scikit-image's colour photos through a simulated camera, the
estimate and pilot a blur of the noisy photo) and on a 1000×1000 crop of it, with each number
of torch threads of ``--timing-threads`` (``--repeat`` times), the machine's load average
beside each time; the blend's and the debias's fits on the same photos (their seconds per
megapixel at 1 and 12 MP); and the peak memory of step 4 alone on the large photo (a fresh
process).

    python benchmarks/wiener_compare.py --cache CACHE --seeds 0,1 --demo DEMO/run/model.safetensors \
        --threads 1 --timing-threads 2,1 --repeat 2 --out benchmarks/results/wiener  # committed

Writes ``results.json`` and ``results.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (a sibling script: photos, noise and scores shared with it)

MODEL = "run_ssbsn_8_quick_all_None_256_{seed}_0.002_0.004_0.01.safetensors"


# ------------------------------------------------------------------ the bm3d package's step 4

@contextmanager
def _numpy_trapz():
    """bm4d 4.2 (under bm3d) calls ``numpy.trapz``, which numpy 2.4 removed in favour of
    ``numpy.trapezoid``: lend it the new name for the duration of the call."""
    if hasattr(np, "trapz"):
        yield
        return
    np.trapz = np.trapezoid
    try:
        yield
    finally:
        del np.trapz


def have_bm3d() -> bool:
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


def bm3d_step4(z: np.ndarray, p: np.ndarray, psds: list, guide: np.ndarray) -> np.ndarray:
    """Step 4 as it was: the bm3d package's Wiener stage on each channel with its spectrum, the
    block matches found on the first channel filtered (the luminance) reused for the others;
    one thread, so that the output is repeatable."""
    import bm3d
    profile = bm3d.BM3DProfile()
    profile.num_threads = 1
    out, matches = [], None
    with _numpy_trapz():
        for c in range(z.shape[0]):
            if matches is None:
                w, matches = bm3d.bm3d(z[c], psds[c], profile, stage_arg=p[c],
                                       blockmatches=(False, True))
            else:
                w = bm3d.bm3d(z[c], psds[c], profile, stage_arg=p[c], blockmatches=matches)
            out.append(w)
    return np.stack(out)


# ------------------------------------------------------------------ quality

def estimates(model, x):
    """(the network's estimate, the blend) as ``SSBSN.denoise`` computes them with the model's
    own settings (the pilot of the Wiener stage)."""
    import torch

    from ssbsn.restore.blend import noisy_pixel_blend
    with torch.no_grad():
        y = model.denoise(x, blend=False, wiener=False, debias=False)
        ref = y if model.pd_train == model.pd_test else model.denoise(
            x, blend=False, wiener=False, debias=False, pd=model.pd_train)
        return y, noisy_pixel_blend(x, y, ref)


def compare_items(model, items, bm3d: bool, check_first: bool = True) -> list[dict]:
    """Per item: the scores of no refinement, the new step 4 and (``bm3d``) the package's, each
    followed by the debias, and the seconds of each refinement."""
    import torch

    from ssbsn.restore import wiener
    from ssbsn.restore.debias import tone_curve_debias
    from ssbsn.metrics import quantize
    rows = []
    for i, it in enumerate(items):
        x = torch.from_numpy(it["noisy"].astype(np.float32).transpose(2, 0, 1).copy())[None]
        y, pilot = estimates(model, x)
        finish = lambda w: quantize(tone_curve_debias(  # noqa: E731
            x, y, w, lag=model.pd_train)[0].numpy().transpose(1, 2, 0))
        row = dict(name=it["name"], shot=it["shot"],
                   noisy=quality.scores(it["noisy"], it["clean"]),
                   none=quality.scores(finish(pilot), it["clean"]))
        t0 = time.perf_counter()
        new = wiener.collaborative_refinement(x, y, pilot)
        row["new_s"] = round(time.perf_counter() - t0, 3)
        row["new"] = quality.scores(finish(new), it["clean"])
        if check_first and i == 0 and model.inference["wiener"]:  # the model's own pipeline
            with torch.no_grad():
                own = quantize(model.denoise(x)[0].numpy().transpose(1, 2, 0))
            row["same_as_denoise"] = bool(np.array_equal(own, finish(new)))
        if bm3d:
            t0 = time.perf_counter()
            old = wiener.refine(x, y, pilot, bm3d_step4)
            row["bm3d_s"] = round(time.perf_counter() - t0, 3)
            row["bm3d"] = quality.scores(finish(old), it["clean"])
        rows.append(row)
        print(f"  {it['name']:22s} {it['shot']:g}: none {row['none']['psnr']:.2f}  new "
              f"{row['new']['psnr']:.2f} ({row['new_s']:.1f} s)"
              + (f"  bm3d {row['bm3d']['psnr']:.2f} ({row['bm3d_s']:.1f} s)" if bm3d else ""),
              flush=True)
    return rows


def demo_items(size: int = 256, shot: float = 0.01, seed: int = 0) -> list[dict]:
    from ssbsn.demo import make_pairs
    return [dict(name=n, shot=shot, noisy=a, clean=b) for n, a, b in make_pairs(size, shot, seed)]


# ------------------------------------------------------------------ speed

def synthetic_photo(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) uint8 (H, W, 3): a mosaic of scikit-image's colour photos (tiles of about
    1000 pixels, each resized to its tile) through a simulated camera at shot 4e-3."""
    from skimage import data, transform

    from ssbsn.noise import camera_pair
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket(),
              data.immunohistochemistry(), data.retina(), data.stereo_motorcycle()[0]]
    ny, nx = max(1, round(height / 1000)), max(1, round(width / 1000))
    ys, xs = np.linspace(0, height, ny + 1).astype(int), np.linspace(0, width, nx + 1).astype(int)
    img = np.zeros((height, width, 3), np.uint8)
    k = 0
    for i in range(ny):
        for j in range(nx):
            h, w = ys[i + 1] - ys[i], xs[j + 1] - xs[j]
            tile = transform.resize(photos[k % len(photos)], (h, w), order=1)
            img[ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = np.clip(tile * 255 + 0.5, 0, 255)
            k += 1
    noisy, clean = camera_pair(img, np.random.default_rng(seed), 4e-3)
    return noisy, clean


def time_refinement(noisy: np.ndarray, threads: int) -> dict:
    """Seconds of the whole refinement (steps 1–5) and of step 4 alone with ``threads`` torch
    threads, the CPU seconds of the process, and the load average (1 minute) before and after;
    the estimate and the pilot are a blur of the noisy photo."""
    import torch

    from ssbsn.restore import wiener
    from ssbsn.restore.lowpass import gaussian_lowpass
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
        est = gaussian_lowpass(x, 1.0)
        step4 = wiener.torch_step4("cpu")
        spent = {}

        def timed(*a):
            t = time.perf_counter()
            r = step4(*a)
            spent["step4_s"] = round(time.perf_counter() - t, 2)
            return r
        load0 = os.getloadavg()
        t0, c0 = time.perf_counter(), time.process_time()
        wiener.refine(x, est, est, timed)
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(before)
    return dict(height=noisy.shape[0], width=noisy.shape[1], threads=threads,
                total_s=round(total, 2), **spent, cpu_s=round(cpu, 1),
                load_before=[round(v, 2) for v in load0],
                load_after=[round(v, 2) for v in os.getloadavg()])


def time_fits(noisy: np.ndarray, threads: int) -> dict:
    """Seconds of the blend's fit (:func:`ssbsn.restore.blend.noisy_pixel_blend`) and of the debias's
    (:func:`ssbsn.restore.debias.tone_curve_debias`, the quick preset's lag) on ``noisy``, the estimate a
    blur of it, with ``threads`` torch threads."""
    import torch

    from ssbsn.restore.blend import noisy_pixel_blend
    from ssbsn.restore.debias import tone_curve_debias
    from ssbsn.restore.lowpass import gaussian_lowpass
    from ssbsn.presets import preset_values
    lag = preset_values("quick")["pd_train"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
        est = gaussian_lowpass(x, 1.0)
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        out = noisy_pixel_blend(x, est, est)
        t1 = time.perf_counter()
        tone_curve_debias(x, est, out, lag=lag)
        t2 = time.perf_counter()
    finally:
        torch.set_num_threads(before)
    mp = noisy.shape[0] * noisy.shape[1] / 1e6
    return dict(height=noisy.shape[0], width=noisy.shape[1], threads=threads,
                blend_s=round(t1 - t0, 2), debias_s=round(t2 - t1, 2),
                blend_s_per_mp=round((t1 - t0) / mp, 3), debias_s_per_mp=round((t2 - t1) / mp, 3),
                load_before=[round(v, 2) for v in load0],
                load_after=[round(v, 2) for v in os.getloadavg()])


def _peak_rss() -> int:
    """The process's peak resident memory so far (bytes; Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def step4_memory(height: int, width: int) -> dict:
    """Peak memory of step 4 alone (ssbsn.restore.collaborative.collaborative_wiener, float32, three
    channels) on a ``height``×``width`` image, beyond its inputs: run in a fresh process, the
    growth of its peak resident memory over the call."""
    import subprocess
    code = f"""
import json, sys
sys.path[:0] = {[str(HERE), str(HERE.parent)]!r}
import numpy as np, torch
import wiener_compare as wc
from ssbsn.restore.collaborative import collaborative_wiener, coefficient_covariances
rng = np.random.default_rng(0)
z = torch.from_numpy(rng.standard_normal((3, {height}, {width}), dtype=np.float32))
p = torch.nn.functional.avg_pool2d(z[None], 3, 1, 1)[0]
cov = torch.from_numpy(np.stack([coefficient_covariances(np.full((64, 64), 64.0 * 64))] * 3)
                       .astype(np.float32))
base = wc._peak_rss()
out = collaborative_wiener(z, p, cov)
print(json.dumps(dict(inputs_bytes=2 * z.numel() * 4, peak_growth_bytes=wc._peak_rss() - base)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return dict(height=height, width=width, peak_growth_gb=round(d["peak_growth_bytes"] / 2**30, 2),
                inputs_gb=round(d["inputs_bytes"] / 2**30, 2))


# ------------------------------------------------------------------ report

def _mean(v):
    return float(np.mean(v)) if v else float("nan")


def summary(rows: list[dict], have_old: bool) -> list[dict]:
    """Per seed and level (and all together): mean PSNR of none/new/bm3d and new − bm3d
    (mean, worst)."""
    out = []
    keys = sorted({(r["set"], r["shot"]) for r in rows}) + sorted({(r["set"], None) for r in rows})
    for s, shot in keys:
        sel = [r for r in rows if r["set"] == s and (shot is None or r["shot"] == shot)]
        d = dict(set=s, shot=shot, n=len(sel),
                 none=_mean([r["none"]["psnr"] for r in sel]),
                 new=_mean([r["new"]["psnr"] for r in sel]),
                 new_s=_mean([r["new_s"] for r in sel]))
        if have_old and all("bm3d" in r for r in sel):
            diff = [r["new"]["psnr"] - r["bm3d"]["psnr"] for r in sel]
            d.update(bm3d=_mean([r["bm3d"]["psnr"] for r in sel]), diff_mean=_mean(diff),
                     diff_worst=min(diff), bm3d_s=_mean([r["bm3d_s"] for r in sel]))
        out.append(d)
    return out


def report_md(env, rows, summ, speed, have_old, memory=(), fits=()) -> str:
    md = ["# The Wiener refinement's step 4: torch collaborative filter against the bm3d package",
          "", f"{env['device']}; torch {env['torch']}, bm3d {env['bm3d']}; {env['date']}; "
          f"CPU tensors on transparent huge pages (as the `ssbsn` command runs): "
          f"{'yes' if env.get('huge_pages') else 'no'}. Command: `{env['command']}`.", ""]
    if rows:
        md += ["PSNR (dB) of the 8-bit output against the clean photo; every column ends with "
               "the tone-curve debias. 'none': the blend without the Wiener refinement; 'new': "
               "step 4 by `ssbsn.restore.collaborative`; 'bm3d': step 4 by the bm3d package (as "
               "before). Seconds: the whole refinement of one 256×256 image.", ""]
        head = ["set", "photo", "shot", "noisy", "none", "new"] + (
            ["bm3d", "new − bm3d", "new s", "bm3d s"] if have_old else ["new s"])
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            c = [r["set"], r["name"], f"{r['shot']:g}", f"{r['noisy']['psnr']:.2f}",
                 f"{r['none']['psnr']:.2f}", f"{r['new']['psnr']:.2f}"]
            if have_old:
                c += [f"{r['bm3d']['psnr']:.2f}", f"{r['new']['psnr'] - r['bm3d']['psnr']:+.2f}",
                      f"{r['new_s']:.1f}", f"{r['bm3d_s']:.1f}"]
            else:
                c += [f"{r['new_s']:.1f}"]
            md.append("| " + " | ".join(c) + " |")
        md += ["", "Means per set and level (worst: the lowest per-photo new − bm3d):", ""]
        head = ["set", "shot", "photos", "none", "new"] + (
            ["bm3d", "new − bm3d mean", "worst", "new s", "bm3d s"] if have_old else ["new s"])
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in summ:
            c = [d["set"], "all" if d["shot"] is None else f"{d['shot']:g}", str(d["n"]),
                 f"{d['none']:.2f}", f"{d['new']:.2f}"]
            if "bm3d" in d:
                c += [f"{d['bm3d']:.2f}", f"{d['diff_mean']:+.3f}", f"{d['diff_worst']:+.2f}",
                      f"{d['new_s']:.2f}", f"{d['bm3d_s']:.1f}"]
            else:
                c += [f"{d['new_s']:.2f}"] + ([""] * 5 if have_old else [])
            md.append("| " + " | ".join(c) + " |")
        if not have_old:
            md += ["", "The bm3d package is not installed: its columns are left out."]
    if speed:
        md += ["", "Speed of the refinement (steps 1–5) and of step 4 alone on a synthetic RGB "
               "photo, with the machine's 1-minute load average before and after (other jobs "
               "share the CPU):", "",
               "| size | threads | total s | step 4 s | CPU s | load before | load after |",
               "|---|---|---|---|---|---|---|"]
        for s in speed:
            md.append(f"| {s['width']}×{s['height']} | {s['threads']} | {s['total_s']:.1f} | "
                      f"{s['step4_s']:.1f} | {s['cpu_s']:.0f} | {s['load_before'][0]:.1f} | "
                      f"{s['load_after'][0]:.1f} |")
    if fits:
        md += ["", "The blend's and the debias's fits against the pixel count (the same photo and "
               "its crop; seconds per megapixel stay level when they scale linearly):", "",
               "| size | threads | blend s | blend s/MP | debias s | debias s/MP | load before | "
               "load after |", "|---|---|---|---|---|---|---|---|"]
        for f in fits:
            md.append(f"| {f['width']}×{f['height']} | {f['threads']} | {f['blend_s']:.2f} | "
                      f"{f['blend_s_per_mp']:.3f} | {f['debias_s']:.2f} | "
                      f"{f['debias_s_per_mp']:.3f} | {f['load_before'][0]:.1f} | "
                      f"{f['load_after'][0]:.1f} |")
    for m in memory:
        md += ["", f"Memory of step 4 alone on {m['width']}×{m['height']} RGB (float32; a fresh "
               f"process, the growth of its peak resident memory over the call): "
               f"{m['peak_growth_gb']:.2f} GB, beside its inputs' {m['inputs_gb']:.2f} GB."]
    return "\n".join(md) + "\n"


def environment(argv) -> dict:
    env = quality.environment()
    env.pop("threads_per_run", None)
    import torch
    env.update(threads=torch.get_num_threads(), machine=platform.machine(),
               command="python benchmarks/wiener_compare.py " + " ".join(
                   quality._public_args(argv, paths=("--cache", "--out"))))
    return env


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="folder of the quality benchmark's models")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--out", default=str(HERE / "results" / "wiener"))
    ap.add_argument("--no-bm3d", action="store_true", help="leave the bm3d package out")
    ap.add_argument("--demo", metavar="MODEL", default=None,
                    help="the demo's photos too, with this demo model (the model.safetensors "
                         "that `ssbsn demo -o DIR` trains: DIR/run/model.safetensors)")
    ap.add_argument("--size", default="4000x3000,1000x1000",
                    help="photos to time (WxH, comma-separated; empty: no timing)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for the photos' comparison (default: torch's)")
    ap.add_argument("--timing-threads", default=None,
                    help="torch threads of each timing, comma-separated (default: torch's)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time each size and thread count this many times (the machine may be "
                         "shared: every run is reported with its load)")
    ap.add_argument("--fits-only", action="store_true",
                    help="time only the blend's and the debias's fits at the --size photos")
    args = ap.parse_args(argv)
    from ssbsn.allocator import use_huge_pages
    huge_pages = use_huge_pages()  # as the ssbsn command does, before torch is imported
    import torch

    from ssbsn import SSBSN
    if args.threads:
        torch.set_num_threads(args.threads)
    use_old = have_bm3d() and not args.no_bm3d
    if not use_old and not args.no_bm3d:
        print("wiener_compare: the bm3d package is not installed; its columns are left out")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",") if s] if args.cache else []:
        path = Path(args.cache) / MODEL.format(seed=seed)
        if not path.is_file():
            print(f"wiener_compare: no model for seed {seed} ({path.name}); skipped")
            continue
        print(f"wiener_compare: seed {seed}", flush=True)
        model = SSBSN.load(path).eval()
        photos = quality.load_photos(None, 256, names=quality.HELD_OUT)
        items = quality.make_items(photos, quality.SHOTS, seed)
        rows += [dict(r, set=f"seed {seed}") for r in compare_items(model, items, use_old)]
    if args.demo:
        if not Path(args.demo).is_file():
            print(f"wiener_compare: no demo model {args.demo}", file=sys.stderr)
            return 1
        print("wiener_compare: the demo's photos", flush=True)
        model = SSBSN.load(args.demo).eval()
        rows += [dict(r, set="demo") for r in compare_items(model, demo_items(), use_old)]
    speed, memory, fits = [], [], []
    sizes = [s for s in args.size.split(",") if s]
    threads = [int(t) for t in (args.timing_threads or str(torch.get_num_threads())).split(",")]
    if sizes:
        w0, h0 = (int(v) for v in sizes[0].lower().split("x"))
        noisy, _ = synthetic_photo(h0, w0)
        for s in sizes:
            w, h = (int(v) for v in s.lower().split("x"))
            y0, x0 = (noisy.shape[0] - h) // 2, (noisy.shape[1] - w) // 2
            crop = np.ascontiguousarray(noisy[max(0, y0):max(0, y0) + h,
                                              max(0, x0):max(0, x0) + w])
            for _ in range(max(1, args.repeat)):
                for t in threads:
                    if not args.fits_only:
                        speed.append(time_refinement(crop, t))
                        print(f"wiener_compare: {w}×{h}: {speed[-1]}", flush=True)
                    fits.append(time_fits(crop, t))
                    print(f"wiener_compare: fits {w}×{h}: {fits[-1]}", flush=True)
        if not args.fits_only:
            memory.append(step4_memory(h0, w0))
            print(f"wiener_compare: memory {memory[-1]}", flush=True)
    summ = summary(rows, use_old) if rows else []
    env = environment(argv)
    env["huge_pages"] = huge_pages
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from ssbsn.restore.collaborative import DEFAULT
    report = dict(environment=env, params=DEFAULT.__dict__, bm3d=use_old, images=rows,
                  summary=summ, speed=speed, memory=memory, fits=fits)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    md = report_md(env, rows, summ, speed, use_old, memory, fits)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
