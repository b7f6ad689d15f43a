"""The blend's reference estimate: all stride² shifts against a Latin square of stride shifts
and against no shifts, on the quality benchmark's models and the demo's, side by side.

    python -m benchmarks.blend_reference --quality-cache CACHE \\
        --demo-model demo_out/run/model.safetensors --out benchmarks/results/blend_reference

The blend keys the estimate's error variance on the texture of a second estimate at the
training PD stride (:class:`ssbsn.restore.blend.Blend`). With the shifted-PD ensemble on,
that estimate costs stride² network passes (9 of the quick preset's 13); its Latin square
(the shifts (i, (s − i) mod s): every PD row and column phase once) costs stride. Every other
setting is the model's own (the quick preset's). ``--quality-cache``: the SS-BSN models
``benchmarks/quality.py --cache DIR`` trained and kept, on the same held-out photos and noise;
``--demo-model``: a model trained by ``ssbsn demo``, on the demo's photos. PSNR in dB against
the clean photos; ``results.json`` and ``results.md`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("all", "latin", "none")  # the reference's shifts


def _denoise(model, x, mode: str):
    """``model.denoise(x)`` with the blend's reference made with the shifts of ``mode``."""
    import dataclasses

    from ssbsn.restore import pipeline as pl

    class Ctx(pl.Context):
        def estimate_at(self, stride, latin=False):
            if stride == self.config.pd or mode == "latin":
                return super().estimate_at(stride, latin)
            if mode == "all":
                return super().estimate_at(stride, False)
            # "none": the reference without the shifted-PD ensemble
            plain = pl.Context(self.model, self.noisy,
                               dataclasses.replace(self.config, shifts=False), self.steps)
            return plain.estimate_at(stride)

    p = pl.Pipeline(model)
    config = p.settings()
    ctx = Ctx(model, x, config, pl.configured_steps(config))
    out = ctx.estimate
    for _, step, value in ctx.steps:
        if step.stage == "output":
            out = step(ctx, out, value)
    return out


def _rows(model, pairs, set_name: str) -> list[dict]:
    import torch

    from benchmarks.quality import scores
    from ssbsn.metrics import quantize
    rows = []
    for name, shot, noisy, clean in pairs:
        x = torch.from_numpy(noisy.astype(np.float32).transpose(2, 0, 1).copy())[None]
        row = dict(set=set_name, name=name, shot=shot, noisy=scores(noisy, clean)["psnr"])
        for mode in MODES:
            with torch.no_grad():
                y = _denoise(model, x, mode)
            row[mode] = scores(quantize(y[0].numpy().transpose(1, 2, 0)), clean)["psnr"]
        rows.append(row)
        print(f"blend_reference: {row}", flush=True)
    return rows


def summary(rows) -> list[dict]:
    """Mean PSNR per set and level, and each mode's change from all shifts (worst photo)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["set"], r["shot"]), []).append(r)
    out = []
    for (set_name, shot), rs in groups.items():
        base = float(np.mean([r["all"] for r in rs]))
        s = dict(set=set_name, shot=shot, photos=len(rs), noisy=float(np.mean([r["noisy"] for r in rs])),
                 all=base)
        for mode in MODES[1:]:
            s[f"{mode}_delta"] = float(np.mean([r[mode] for r in rs])) - base
            s[f"{mode}_worst"] = float(min(r[mode] - r["all"] for r in rs))
        out.append(s)
    return out


def markdown(res) -> str:
    lines = ["# The blend's reference: all shifts, a Latin square of shifts, none", "",
             f"CPU: {res['env']['cpu']}; torch {res['env']['torch']}; {res['env']['date']}", "",
             "Mean PSNR (dB) per set and level with the reference at all stride² shifts; the change "
             "with a Latin square (stride shifts) and with none (worst photo in brackets).", "",
             "| set | shot | photos | noisy | all shifts | Latin square | none |", "|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        lines.append(f"| {s['set']} | {s['shot']:g} | {s['photos']} | {s['noisy']:.2f} | {s['all']:.3f} | "
                     f"{s['latin_delta']:+.3f} ({s['latin_worst']:+.3f}) | "
                     f"{s['none_delta']:+.3f} ({s['none_worst']:+.3f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quality-cache", default=None)
    ap.add_argument("--demo-model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from benchmarks.env import cpu_model_name, git_commit
    from benchmarks.quality import HELD_OUT, SHOTS, load_photos, make_items
    from ssbsn import SSBSN
    from ssbsn.presets import preset_values
    torch.set_num_threads(args.threads)
    inference = preset_values("quick")["inference"]
    rows = []
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
            model = SSBSN.load(f, inference=inference).eval()
            rows += _rows(model, [(it["name"], it["shot"], it["noisy"], it["clean"]) for it in items],
                          f"held-out, noise seed {seed}")
    if args.demo_model:
        from ssbsn.demo import DEMO, make_pairs
        model = SSBSN.load(args.demo_model, inference=inference).eval()
        rows += _rows(model, [(n, DEMO["shot"], a, b) for n, a, b in
                              make_pairs(DEMO["size"], DEMO["shot"], 0)], "demo")
    res = dict(env=dict(cpu=cpu_model_name(), commit=git_commit(), torch=torch.__version__, python=platform.python_version(),
                        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
               rows=rows, summary=summary(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
