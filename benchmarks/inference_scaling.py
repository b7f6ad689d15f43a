"""Inference cost against image size, whole-map SS-Attention groups against the bounded scope
(``attention_window``), and what the scope does to quality — side by side in one run.

    python -m benchmarks.inference_scaling --out benchmarks/results/inference_scaling \\
        --quality-cache CACHE --demo-model demo_out/run/model.safetensors
    python -m benchmarks.inference_scaling --smoke --out OUT       # seconds: the CI check

Timing (the quick preset's network, random weights unless ``--weights``: the time does not
depend on their values; large tensors on huge pages, as the ``ssbsn`` command runs,
:mod:`ssbsn.allocator`):

* ``pass``: one network pass at the inference PD stride (``model(x, pd=pd_test)``: PD → BSN →
  inverse PD), one thread, at 256², 512², 1024², 2048² and 4000×3000 (``--sizes``), the second
  of two calls (the first, ``cold_s``, also sets up oneDNN's kernels for the size);
* ``full``: the preset's whole default inference (``model.denoise(x)``: shifted-PD ensemble,
  lowpass, the blend's second estimate, the Wiener stage, the debias) with ``--threads``
  threads (default 2), its wall time split into network passes, the Wiener stage and the rest.

Each is measured with whole-map groups (``attention_window=0``) and with the preset's window.
Whole-map groups cost the square of the area: a measurement whose time, extrapolated from
the previous size by the square of the area ratio, would pass ``--max-seconds`` is not run
and the extrapolation is recorded instead (``"predicted_s"``).

Quality (``--quality-cache``): the SS-BSN models that ``benchmarks/quality.py --cache DIR``
trained and kept, on the same held-out photos and noise, denoised with each window of
``--windows`` (0 = whole-map groups) with everything else the preset's; ``--demo-model``: a
model trained by ``ssbsn demo``, on the demo's photos. PSNR in dB against the clean photos.

Results: ``results.json`` and ``results.md`` in ``--out``, with the targets of the
linear-time issue.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

SIZES = ((256, 256), (512, 512), (1024, 1024), (2048, 2048), (3000, 4000))


def preset_model(weights: str | None, window: int, preset: str = "quick"):
    """The preset's model (with its inference settings) and SS-Attention's scope ``window``."""
    import torch

    from ssbsn import SSBSN
    from ssbsn.config import model_field_names
    from ssbsn.presets import preset_values
    if weights:
        return SSBSN.load(weights, attention_window=window).eval()
    q = preset_values(preset)
    torch.manual_seed(0)
    fields = {k: v for k, v in q.items() if k in model_field_names()}
    fields["attention_window"] = window
    return SSBSN(**fields, inference=q.get("inference")).eval()


class StepClock:
    """Wall time of the network passes (forward hooks on ``model.bsn``) and of the Wiener
    stage (``ssbsn.restore.wiener.collaborative_refinement`` wrapped) during one ``denoise``
    call."""

    def __init__(self, model):
        import ssbsn.restore.wiener as sm
        self.model, self.sm, self.net, self.wiener, self.passes = model, sm, 0.0, 0.0, 0
        self._t = None
        self._orig = sm.collaborative_refinement

    def __enter__(self):
        def pre(*_):
            self._t = time.perf_counter()

        def post(*_):
            self.net += time.perf_counter() - self._t
            self.passes += 1

        def wiener(*a, **k):
            t = time.perf_counter()
            try:
                return self._orig(*a, **k)
            finally:
                self.wiener += time.perf_counter() - t
        self._hooks = [self.model.bsn.register_forward_pre_hook(pre),
                       self.model.bsn.register_forward_hook(post)]
        self.sm.collaborative_refinement = wiener
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self.sm.collaborative_refinement = self._orig


def time_one(kind: str, model, size, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    H, W = size
    x = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)) * 255
    times = []
    for _ in range(2 if kind == "pass" else 1):  # a pass: the second call, warm
        with torch.no_grad(), StepClock(model) as clock:
            t0 = time.perf_counter()
            y = model(x, pd=model.pd_test) if kind == "pass" else model.denoise(x)
            times.append(time.perf_counter() - t0)
    total = times[-1]
    assert torch.isfinite(y).all()
    r = dict(seconds=round(total, 3), us_per_pixel=round(total / (H * W) * 1e6, 4))
    if len(times) > 1:
        r["cold_s"] = round(times[0], 3)
    if kind == "full":
        r.update(network_s=round(clock.net, 2), passes=clock.passes,
                 wiener_s=round(clock.wiener, 2),
                 other_s=round(total - clock.net - clock.wiener, 2))
    return r


def timing(args, window: int) -> list[dict]:
    rows = []
    for kind, threads in (("pass", 1), ("full", args.threads)):
        if kind not in args.kinds:
            continue
        for w in (0, window):
            model = preset_model(args.weights, w, args.preset)
            last = None
            for size in args.sizes:
                row = dict(kind=kind, window=w, height=size[0], width=size[1], threads=threads)
                if w == 0 and last is not None:
                    pred = last[1] * (size[0] * size[1] / last[0]) ** 2
                    if pred > args.max_seconds:  # the square of the area: not run
                        row["predicted_s"] = round(pred, 1)
                        rows.append(row)
                        print(f"scaling: {kind} {size[1]}x{size[0]} whole map: predicted "
                              f"{pred:.0f} s, not run", flush=True)
                        continue
                row.update(time_one(kind, model, size, threads))
                last = (size[0] * size[1], row["seconds"])
                rows.append(row)
                print(f"scaling: {kind} {size[1]}x{size[0]} window {w}: {row['seconds']:.2f} s",
                      flush=True)
    return rows


# ------------------------------------------------------------------ quality

def _psnr_rows(model, pairs, windows) -> list[dict]:
    import torch

    from benchmarks.quality import scores
    from ssbsn.metrics import quantize
    rows = []
    for name, shot, noisy, clean in pairs:
        x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
        row = dict(name=name, shot=shot, noisy=scores(noisy, clean)["psnr"])
        for w in windows:
            model.set_attention_window(w)
            with torch.no_grad():
                y = model.denoise(x)
            row[f"w{w}"] = scores(quantize(y[0].numpy().transpose(1, 2, 0)), clean)["psnr"]
        rows.append(row)
    return rows


def quality(args, windows) -> list[dict]:
    """Per model: PSNR per image for each window."""
    import torch

    from benchmarks.quality import HELD_OUT, SHOTS, load_photos, make_items
    from ssbsn import SSBSN
    from ssbsn.presets import preset_values
    torch.set_num_threads(args.threads)
    inference = preset_values("quick")["inference"]
    out = []
    if args.quality_cache:
        photos = load_photos(None, 256, names=HELD_OUT)
        pat = re.compile(r"run_ssbsn_([\d.]+)_quick_all_None_256_(\d+)_" +
                         "_".join(f"{s:g}" for s in SHOTS) + r"\.safetensors$")
        for f in sorted(Path(args.quality_cache).glob("run_ssbsn_*.safetensors")):
            m = pat.match(f.name)
            if not m:
                continue
            seed = int(m.group(2))
            items = make_items(photos, SHOTS, seed)
            pairs = [(it["name"], it["shot"], it["noisy"], it["clean"]) for it in items]
            model = SSBSN.load(f, inference=inference).eval()
            out.append(dict(set="held-out", model=f.name, noise_seed=seed,
                            minutes=float(m.group(1)), rows=_psnr_rows(model, pairs, windows)))
            print(f"scaling: quality of {f.name} done", flush=True)
    if args.demo_model:
        from ssbsn.demo import DEMO, make_pairs
        pairs = [(n, DEMO["shot"], noisy, clean) for n, noisy, clean in
                 make_pairs(DEMO["size"], DEMO["shot"], 0)]
        model = SSBSN.load(args.demo_model, inference=inference).eval()
        out.append(dict(set="demo", model=str(Path(args.demo_model).name), noise_seed=0,
                        rows=_psnr_rows(model, pairs, windows)))
    return out


def quality_summary(runs, windows) -> list[dict]:
    """Mean PSNR per model, set and level for each window, and its change from whole-map
    groups (window 0)."""
    out = []
    for r in runs:
        for shot in sorted({row["shot"] for row in r["rows"]}):
            rows = [row for row in r["rows"] if row["shot"] == shot]
            s = dict(set=r["set"], noise_seed=r["noise_seed"], shot=shot, images=len(rows),
                     noisy=round(float(np.mean([row["noisy"] for row in rows])), 3))
            for w in windows:
                s[f"w{w}"] = round(float(np.mean([row[f"w{w}"] for row in rows])), 3)
                s[f"d{w}"] = round(float(np.mean([row[f"w{w}"] - row["w0"] for row in rows])), 3)
                s[f"worst_d{w}"] = round(float(min(row[f"w{w}"] - row["w0"] for row in rows)), 3)
            out.append(s)
    return out


# ------------------------------------------------------------------ report

def targets(rows, summary, window, windows) -> list[dict]:
    t = []
    p = {(r["height"], r["width"]): r for r in rows if r["kind"] == "pass"
         and r["window"] == window and "seconds" in r}
    if (512, 512) in p and (3000, 4000) in p:
        ratio = p[(3000, 4000)]["us_per_pixel"] / p[(512, 512)]["us_per_pixel"]
        t.append(dict(target="network pass: time per pixel at 4000x3000 within 1.3x of 512x512",
                      value=round(ratio, 3), met=ratio <= 1.3))
    f = [r for r in rows if r["kind"] == "full" and r["window"] == window
         and (r["height"], r["width"]) == (3000, 4000) and "seconds" in r]
    if f:
        t.append(dict(target="4000x3000 through the quick preset's full default inference "
                             "<= 300 s (both cores)", value=f[0]["seconds"],
                      met=f[0]["seconds"] <= 300))
    if summary and window in windows:
        worst = min(s[f"d{window}"] for s in summary)
        t.append(dict(target=f"quality with window {window}: mean PSNR per set and level "
                             "within 0.05 dB of whole-map groups, or better",
                      value=worst, met=worst >= -0.05))
    return t


def markdown(res) -> str:
    md = [f"# Inference scaling ({res['preset']} preset's model): whole-map groups against "
          f"window {res['window']}", "",
          f"CPU: {res['env']['cpu']}; torch {res['env']['torch']}; {res['env']['date']}; "
          f"commit {res['env']['git_commit']}; load {res['env']['loadavg_1m']}", ""]
    if res["timing"]:
        md += ["| kind | size | threads | whole map (s) | window (s) | whole map µs/px | "
               "window µs/px | split of the windowed run (network / Wiener / rest, s) |",
               "|---|---|---|---|---|---|---|---|"]
    by = {(r["kind"], r["height"], r["width"], r["window"]): r for r in res["timing"]}
    for kind in sorted({r["kind"] for r in res["timing"]}, key=("pass", "full").index):
        for h, w in res["sizes"]:
            a, b = by.get((kind, h, w, 0), {}), by.get((kind, h, w, res["window"]), {})
            whole = (f"{a['seconds']:.2f}" if "seconds" in a else
                     f"(~{a['predicted_s']:.0f}, not run)" if "predicted_s" in a else "—")
            split = (f"{b['network_s']:.1f} ({b['passes']} passes) / {b['wiener_s']:.1f} / "
                     f"{b['other_s']:.1f}" if "network_s" in b else "")
            md.append(f"| {kind} | {w}×{h} | {a.get('threads', b.get('threads', ''))} | {whole} | "
                      f"{b.get('seconds', '—')} | {a.get('us_per_pixel', '—')} | "
                      f"{b.get('us_per_pixel', '—')} | {split} |")
    if res["quality"]:
        ws = res["windows"]
        md += ["", "Quality: mean PSNR (dB) per set, noise seed and level; Δ against whole-map "
                   "groups (worst image in brackets)", "",
               "| set | noise seed | shot | images | noisy | " +
               " | ".join(f"window {w}" if w else "whole map" for w in ws) + " | " +
               " | ".join(f"Δ {w}" for w in ws if w) + " |",
               "|---|---|---|---|---|" + "---|" * (2 * len(ws) - 1)]
        for s in res["quality"]:
            md.append(f"| {s['set']} | {s['noise_seed']} | {s['shot']:g} | {s['images']} | "
                      f"{s['noisy']:.2f} | " + " | ".join(f"{s[f'w{w}']:.2f}" for w in ws) +
                      " | " + " | ".join(f"{s[f'd{w}']:+.3f} ({s[f'worst_d{w}']:+.2f})"
                                         for w in ws if w) + " |")
    md += ["", "| target | value | met |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else 'no'} |"
           for t in res["targets"]]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--weights", default=None, help="a trained model (default: random weights "
                                                    "of the preset's architecture)")
    ap.add_argument("--preset", default="quick", help="the timed model's preset (quick, paper)")
    ap.add_argument("--window", type=int, default=None,
                    help="the bounded scope to time (default: the quick preset's)")
    ap.add_argument("--sizes", default=",".join(f"{w}x{h}" for h, w in SIZES),
                    help="WxH,... (default 256x256,...,4000x3000)")
    ap.add_argument("--threads", type=int, default=2, help="threads of the full inference")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--no-timing", dest="timing", action="store_false")
    ap.add_argument("--kinds", default="pass,full", help="what to time: pass, full or both")
    ap.add_argument("--quality-cache", default=None)
    ap.add_argument("--demo-model", default=None)
    ap.add_argument("--windows", default=None,
                    help="windows for the quality part, comma-separated (default: 0 and the "
                         "preset's)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    from ssbsn.allocator import use_huge_pages
    huge_pages = use_huge_pages()  # as the ssbsn command does, before torch is imported
    from benchmarks.env import env_info
    from ssbsn.presets import preset_values
    window = args.window or preset_values("quick").get("attention_window", 0)
    try:
        args.sizes = [tuple(int(v) for v in s.split("x"))[::-1] for s in args.sizes.split(",")]
        windows = [int(w) for w in args.windows.split(",")] if args.windows else [0, window]
    except ValueError:
        ap.error("--sizes is WxH,... and --windows N,... (integers)")
    if 0 not in windows:
        windows = [0] + windows
    if args.smoke:
        args.sizes = [(48, 64), (96, 128)]
    res = dict(preset=args.preset, window=window, windows=windows, sizes=args.sizes,
               env={**env_info(), "huge_pages": huge_pages},
               timing=timing(args, window) if args.timing else [])
    res["quality_runs"] = quality(args, windows)
    res["quality"] = quality_summary(res["quality_runs"], windows)
    res["targets"] = targets(res["timing"], res["quality"], window, windows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
