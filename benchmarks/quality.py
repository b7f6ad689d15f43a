"""Denoising quality of self-supervised training on a handful of photos, on CPU.

    python benchmarks/quality.py --minutes 2,8,32 --main-minutes 8   # the committed run (~1 h)
    python benchmarks/quality.py --photos DIR          # your own photos instead
    python benchmarks/quality.py --skimage camera,cat,coins,colorwheel  # other built-in photos
    python benchmarks/quality.py --seed 3 --train-seed 1003  # train again on seed 3's photos
    python benchmarks/quality.py --smoke --out /tmp/q  # seconds: the CI check of the pipeline

What it does:

1. Photos: held-out scikit-image colour photos (not the demo's, on which the quick recipe was
   tuned), centre crops of ``--size`` (256) pixels; or every image of ``--photos DIR``, or the
   scikit-image photos named by ``--skimage`` (grey ones repeated into three channels).
2. Noise: the project's camera pipeline (:func:`ssbsn.noise.camera_noise`: raw shot/read noise
   through demosaicking, colour correction and tone curve) at shot 2e-3, 4e-3 and 1e-2, one
   random camera per photo and level; the clean reference is the same camera without noise.
3. Training: the recipe under test (``--preset``, default ``quick``) on the noisy photos alone
   (the noisy images of every level together, or one run per level with ``--per-level``), for a
   fixed budget of CPU minutes of one thread per run (``--minutes``, several for the frontier),
   once as SS-BSN and once with ``ss_blocks=0`` (AP-BSN) at the same budget. Runs go to
   ``--jobs`` processes of one thread each; the budget is counted in each process's CPU time,
   so a busy machine does not shorten it.
4. Denoising with the trained model's own inference settings (what ``ssbsn denoise -w MODEL``
   does with no flags), and, for a model whose settings blend with the noisy pixel, refine
   with the Wiener stage or debias, once more as the network's estimate alone, without any of
   them ("plain" in the tables). A model from the cache runs with the preset's current
   inference settings, which a model trained today would carry.
5. Baselines: non-local means (scikit-image) and BM3D (the ``bm3d`` package, an optional
   baseline: its columns are left out, with a note, where it is not installed), each blind (its
   noise level from ``skimage.restoration.estimate_sigma``) and with the true σ (the standard
   deviation of noisy − clean).
6. Per image: PSNR/SSIM (:mod:`ssbsn.metrics`, outputs rounded to 8 bits), the brightness shift
   mean(output − clean) in grey levels; the tables ``results.md`` and ``results.json`` (with
   device, versions, date, steps and CPU/wall minutes of every run) and ``crops.jpg`` (noisy |
   SS-BSN | BM3D with the true σ | clean, with their PSNR) in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ssbsn.presets import preset_values

HELD_OUT = ("immunohistochemistry", "retina", "motorcycle_left", "hubble_deep_field")
SHOTS = (2e-3, 4e-3, 1e-2)
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ data

def _skimage_photo(name: str) -> np.ndarray:
    from skimage import data
    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    img = getattr(data, name, None)
    try:
        img = img() if callable(img) else None
    except Exception:  # noqa: BLE001 -- e.g. a photo that needs a download (pooch)
        img = None
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise SystemExit(f"quality: {name!r} is not one of scikit-image's 8-bit photos "
                         "(skimage.data) that ship with it")
    return img


def load_photos(folder: str | None, size: int, names=HELD_OUT) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB) centre crops of at most size×size."""
    if folder:
        from ssbsn.data import list_images
        from ssbsn.images import read_image, split_alpha
        files = list_images(Path(folder), recursive=True)
        if not files:
            raise SystemExit(f"quality: no images in {folder}")
        raw = []
        for f in files:
            img = split_alpha(read_image(f))[0]
            if img.dtype != np.uint8:
                img = np.clip(np.floor(img / 257.0 + 0.5), 0, 255).astype(np.uint8)
            raw.append((f.stem, img))
    else:
        raw = [(n, _skimage_photo(n)) for n in names]
    from ssbsn.data.tiles import centre_crop
    out = []
    for name, img in raw:
        if img.ndim == 2 or img.shape[-1] == 1:
            img = np.repeat(img.reshape(img.shape[:2] + (1,)), 3, axis=-1)
        out.append((name, centre_crop(img, size)))
    return out


def make_items(photos, shots, seed: int) -> list[dict]:
    """One noisy/clean pair per photo and level, each through its own random camera."""
    from ssbsn.noise import camera_pair
    items = []
    for li, shot in enumerate(shots):
        for pi, (name, img) in enumerate(photos):
            noisy, clean = camera_pair(img, np.random.default_rng([seed, li, pi]), shot)
            items.append(dict(name=name, shot=shot, noisy=noisy, clean=clean))
    return items


def scores(out: np.ndarray, clean: np.ndarray) -> dict:
    from ssbsn.metrics import psnr, ssim
    return dict(psnr=round(psnr(out, clean), 3), ssim=round(ssim(out, clean), 4),
                shift=round(float(out.astype(np.float64).mean() - clean.astype(np.float64).mean()),
                            3))


# ------------------------------------------------------------------ baselines

def true_sigma(noisy: np.ndarray, clean: np.ndarray) -> float:
    """σ in 0..1 units: the standard deviation of noisy − clean."""
    return float((noisy.astype(np.float64) - clean.astype(np.float64)).std() / 255.0)


def blind_sigma(noisy: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma
    return float(estimate_sigma(noisy / 255.0, channel_axis=-1, average_sigmas=True))


def nlm(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """scikit-image's non-local means with its documented setting h = 0.8σ (5×5 patches,
    13×13 search window)."""
    from skimage.restoration import denoise_nl_means
    y = denoise_nl_means(noisy / 255.0, h=0.8 * sigma, sigma=sigma, fast_mode=True,
                         patch_size=5, patch_distance=6, channel_axis=-1)
    return np.clip(np.floor(y * 255.0 + 0.5), 0, 255).astype(np.uint8)


def have_bm3d() -> bool:
    """Whether the ``bm3d`` package (the BM3D baseline; not a dependency) is installed."""
    try:
        import bm3d  # noqa: F401
    except ImportError:
        return False
    return True


def bm3d_rgb(noisy: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d
    y = bm3d.bm3d_rgb(noisy / 255.0, sigma)
    return np.clip(np.floor(np.asarray(y) * 255.0 + 0.5), 0, 255).astype(np.uint8)


def run_baselines(task: dict) -> dict:
    """NLM and BM3D, blind and with the true σ, for the items of ``task``."""
    _one_thread()
    rows, images = [], {}
    for it in task["items"]:
        s_true, s_blind = true_sigma(it["noisy"], it["clean"]), blind_sigma(it["noisy"])
        row = dict(name=it["name"], shot=it["shot"], sigma_true=round(s_true * 255, 3),
                   sigma_blind=round(s_blind * 255, 3))
        for method, fn in (("nlm", nlm), ("bm3d", bm3d_rgb)):
            if method == "bm3d" and (task.get("no_bm3d") or not have_bm3d()):
                continue
            for kind, s in (("blind", s_blind), ("true", s_true)):
                out = fn(it["noisy"], s)
                row[f"{method}_{kind}"] = scores(out, it["clean"])
                if method == "bm3d" and kind == "true":
                    images[(it["name"], it["shot"])] = out
        rows.append(row)
    return dict(rows=rows, images=images)


# ------------------------------------------------------------------ training

def _one_thread() -> None:
    import torch
    torch.set_num_threads(1)


def run_training(task: dict) -> dict:
    """Train one model (the recipe, or AP-BSN with ss_blocks=0) on the noisy images of
    ``task`` for its budget, then denoise them with the model's own settings."""
    _one_thread()
    from ssbsn.data.patches import ArraySource
    from ssbsn.train import TrainConfig, train
    items = task["items"]
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(**{**preset_values(task["preset"]), **task["overrides"]})
        cfg.out, cfg.progress, cfg.seed = str(Path(d) / "run"), False, task["seed"]
        cfg.budget_clock, cfg.log_every = "cpu", 50
        if task.get("steps"):
            cfg.steps, cfg.minutes = task["steps"], None
        else:
            cfg.minutes, cfg.steps = task["minutes"], None
        cfg.preset = task["preset"]
        cfg.data = ["(in memory)"]
        t0, c0 = time.perf_counter(), time.process_time()
        summary = train(cfg, source=ArraySource([it["noisy"] for it in items],
                                                [f"{it['name']}@{it['shot']}" for it in items]))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if task.get("cache"):  # keep the model: a later run re-denoises with today's code
            Path(task["cache"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(summary["weights"], Path(task["cache"]).with_suffix(".safetensors"))
            shutil.copyfile(Path(cfg.out) / "log.jsonl",
                            Path(task["cache"]).with_suffix(".log.jsonl"))
        r = dict(method=task["method"], minutes=task["minutes"], steps=summary["steps"],
                 check=summary["check"],
                 train_cpu_min=round(cpu / 60, 2), train_wall_min=round(wall / 60, 2),
                 config={k: v for k, v in cfg.to_dict().items() if k not in ("data", "out")})
        return {**r, **denoise_items(summary["weights"], items)}


def denoise_items(weights, items, inference: dict | None = None) -> dict:
    """Denoise the noisy images of ``items`` with the model's own inference settings (what
    ``ssbsn denoise -w MODEL`` does with no flags), or ``inference`` where given, and score
    them."""
    _one_thread()
    import torch

    from ssbsn import SSBSN
    from ssbsn.metrics import quantize
    model = SSBSN.load(weights, inference=inference).eval()
    rows, images = [], {}
    t0 = time.perf_counter()
    for it in items:
        x = torch.from_numpy(it["noisy"].astype(np.float32).transpose(2, 0, 1).copy())[None]
        with torch.no_grad():
            y = model.denoise(x)  # the model's own inference settings
        out = quantize(y[0].numpy().transpose(1, 2, 0))
        row = dict(name=it["name"], shot=it["shot"], **scores(out, it["clean"]))
        if any(model.inference[k] for k in ("blend", "wiener", "debias")):  # what they add
            with torch.no_grad():
                plain = model.denoise(x, blend=False, wiener=False, debias=False)
            row["plain"] = scores(quantize(plain[0].numpy().transpose(1, 2, 0)), it["clean"])
        rows.append(row)
        images[(it["name"], it["shot"])] = out
    return dict(rows=rows, images=images,
                denoise_s_per_image=round((time.perf_counter() - t0) / len(items), 2),
                inference=dict(model.inference, pd_test=model.pd_test))


def _save_run(path: Path, r: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    d = {k: v for k, v in r.items() if k != "images"}
    np.savez_compressed(path.with_suffix(".npz"),
                        **{f"{n}@{s!r}": v for (n, s), v in r["images"].items()})
    path.write_text(json.dumps(d))


def _load_run(path: Path) -> dict:
    r = json.loads(path.read_text())
    with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
        r["images"] = {(k.split("@")[0], float(k.split("@")[1])): z[k] for k in z.files}
    return r


# ------------------------------------------------------------------ report

def _fmt(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _mean_min(gains) -> str:
    return f"{np.mean(gains):+.2f} (min {min(gains):+.2f})" if gains else "—"


def build_tables(photos, shots, base, trained, main_minutes) -> tuple[list[dict], str]:
    """Per-image rows (one per photo and level) and the markdown report."""
    by = {(r["name"], r["shot"]): r for r in base["rows"]}
    runs = {(t["method"], t["minutes"]): {(r["name"], r["shot"]): r for r in t["rows"]}
            for t in trained}
    rows = []
    for shot in shots:
        for name, _ in photos:
            b = by[(name, shot)]
            row = dict(name=name, shot=shot, noisy=b["noisy"], sigma_true=b["sigma_true"],
                       sigma_blind=b["sigma_blind"])
            for method in ("ssbsn", "apbsn"):
                r = runs.get((method, main_minutes), {}).get((name, shot))
                row[method] = None if r is None else {k: r[k] for k in ("psnr", "ssim", "shift")}
                row[method + "_plain"] = None if r is None else r.get("plain")
            for k in ("nlm_blind", "nlm_true", "bm3d_blind", "bm3d_true"):
                row[k] = b.get(k)
            rows.append(row)
    cols = ["noisy", "ssbsn", "apbsn", "nlm_blind", "nlm_true", "bm3d_blind", "bm3d_true"]
    if any(r["ssbsn_plain"] or r["apbsn_plain"] for r in rows):
        cols[3:3] = ["ssbsn_plain", "apbsn_plain"]
    head = ["photo", "shot", "σ true/blind"] + [
        {"noisy": "noisy", "ssbsn": "SS-BSN", "apbsn": "AP-BSN", "nlm_blind": "NLM blind",
         "ssbsn_plain": "SS-BSN plain", "apbsn_plain": "AP-BSN plain",
         "nlm_true": "NLM true σ", "bm3d_blind": "BM3D blind", "bm3d_true": "BM3D true σ"}[c]
        for c in cols] + ["shift noisy", "shift SS-BSN", "shift AP-BSN"]
    md = [f"PSNR (dB) / SSIM against the clean photo; SS-BSN and AP-BSN after {main_minutes:g} "
          "CPU-minutes of training (one thread), denoised with the model's own settings, and "
          "'plain' the network's estimate alone (without the blend with the noisy pixel, the "
          "Wiener refinement and the tone-curve debias); shift = mean(output − clean) in grey "
          "levels (the noisy images' own shift comes from the camera's tone curve and "
          "clipping).",
          "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['shot']:g}", f"{r['sigma_true']:.1f}/{r['sigma_blind']:.1f}"]
        for c in cols:
            v = r[c]
            cells.append("—" if v is None else f"{v['psnr']:.2f} / {v['ssim']:.3f}")
        for c in ("noisy", "ssbsn", "apbsn"):
            cells.append("—" if r[c] is None else f"{r[c]['shift']:+.2f}")
        md.append("| " + " | ".join(cells) + " |")
    md += ["", "Mean gain over the noisy input (dB) per level:", "",
           "| shot | " + " | ".join(c for c in cols[1:]) + " |", "|---|" + "---|" * (len(cols) - 1)]
    for shot in shots:
        sel = [r for r in rows if r["shot"] == shot]
        cells = [f"{shot:g}"]
        for c in cols[1:]:
            vals = [r[c]["psnr"] - r["noisy"]["psnr"] for r in sel if r[c] is not None]
            cells.append(_mean_min(vals))
        md.append("| " + " | ".join(cells) + " |")
    if len({t["minutes"] for t in trained}) > 1 or trained:
        md += ["", "Quality against training minutes (mean PSNR gain in dB over the photos; "
               "steps; CPU and wall minutes of the run):", "",
               "| method | minutes | steps | CPU min | wall min | " +
               " | ".join(f"shot {s:g}" for s in shots) + " | mean abs shift |",
               "|---|---|---|---|---|" + "---|" * len(shots) + "---|"]
        def gain_cells(scored):
            """Mean (worst) gain per level and the mean |shift| of (row, its scores) pairs."""
            cells = [_mean_min([s["psnr"] - by[(r["name"], r["shot"])]["noisy"]["psnr"]
                                for r, s in scored if r["shot"] == shot]) for shot in shots]
            return cells + [f"{np.mean([abs(s['shift']) for _, s in scored]):.2f}"]
        for t in sorted(trained, key=lambda t: (t["method"], t["minutes"])):
            cells = [t["method"], f"{t['minutes']:g}", str(t["steps"]),
                     f"{t['train_cpu_min']:.1f}", f"{t['train_wall_min']:.1f}"]
            md.append("| " + " | ".join(cells + gain_cells([(r, r) for r in t["rows"]])) + " |")
            if all("plain" in r for r in t["rows"]):
                cells = [t["method"] + " plain", f"{t['minutes']:g}", "″", "″", "″"]
                plain = gain_cells([(r, r["plain"]) for r in t["rows"]])
                md.append("| " + " | ".join(cells + plain) + " |")
        checked = [t for t in trained if t.get("check")]
        if checked:  # runs trained since the check exists
            md += ["", "Training check (`ssbsn.health`: the network's blind-spot loss over that "
                   "of the mean of the 8 pixels at the training PD stride, per channel, on "
                   "whole training images; a model above 1.1 in any channel failed):", ""]
            for t in sorted(checked, key=lambda t: (t["method"], t["minutes"])):
                c = t["check"]
                md.append(f"- {t['method']} {t['minutes']:g} min: "
                          + " / ".join("—" if v is None else f"{v:.2f}" for v in c["ratio"])
                          + (" (ok)" if c["ok"] else " (**failed**)"))
    return rows, "\n".join(md) + "\n"


def targets(rows, shots) -> list[dict]:
    """The issue's quality targets for the main SS-BSN run: each as {name, value, target, met}."""
    out = []
    ss = [r for r in rows if r["ssbsn"] is not None]
    if not ss:
        return out

    worst = min(r["ssbsn"]["psnr"] - r["noisy"]["psnr"] for r in ss)
    out.append(dict(name="every photo improves at every level (worst gain, dB)",
                    value=round(worst, 2), target="> 0", met=worst > 0))
    for shot, need in ((4e-3, 2.0), (1e-2, 5.0)):
        g = [r["ssbsn"]["psnr"] - r["noisy"]["psnr"] for r in ss if r["shot"] == shot]
        if g:
            out.append(dict(name=f"every photo gains ≥ {need:g} dB at shot {shot:g} (worst, dB)",
                            value=round(min(g), 2), target=f"≥ {need:g}", met=min(g) >= need))
    for shot in shots:
        both = [r for r in ss if r["shot"] == shot and r["apbsn"] is not None]
        if both:
            d = float(np.mean([r["ssbsn"]["psnr"] - r["apbsn"]["psnr"] for r in both]))
            out.append(dict(name=f"SS-BSN at least as good as AP-BSN at shot {shot:g} "
                                 "(mean PSNR difference, dB)",
                            value=round(d, 2), target="≥ 0", met=d >= 0))
    shift = max(abs(r["ssbsn"]["shift"]) for r in ss)
    out.append(dict(name="brightness: abs(mean(output − clean)) < 1 grey level (largest)",
                    value=round(shift, 2), target="< 1", met=shift < 1))
    noisy = max(abs(r["noisy"]["shift"]) for r in ss)
    out.append(dict(name="... the noisy input's own shift, for comparison (largest)",
                    value=round(noisy, 2), target="—", met=None))
    return out


def targets_table(items: list[dict]) -> str:
    lines = ["", "Targets (the main SS-BSN run):", "", "| target | value | goal | |",
             "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['value']:+.2f} | {t['target']} | "
              f"{'—' if t['met'] is None else 'MET' if t['met'] else 'MISSED'} |" for t in items]
    return "\n".join(lines) + "\n"


def crops_figure(path, photos, shot, base_imgs, items, ss_imgs, crop: int = 96) -> None:
    """noisy | SS-BSN | BM3D (true σ) | clean, one photo per row, centre crops, with PSNR."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssbsn.metrics import psnr
    sel = [it for it in items if it["shot"] == shot]
    fig, axes = plt.subplots(len(sel), 4, figsize=(8, 2.15 * len(sel)), squeeze=False)
    for i, it in enumerate(sel):
        key = (it["name"], it["shot"])
        panels = [("noisy", it["noisy"]), ("SS-BSN", ss_imgs.get(key)),
                  ("BM3D (true σ)", base_imgs.get(key)), ("clean", it["clean"])]
        h, w = it["clean"].shape[:2]
        c = min(crop, h, w)
        y, x = (h - c) // 2, (w - c) // 2
        for j, (label, img) in enumerate(panels):
            ax = axes[i, j]
            ax.axis("off")
            if img is None:
                continue
            ax.imshow(img[y:y + c, x:x + c], interpolation="nearest")
            t = label if label == "clean" else f"{label} {psnr(img, it['clean']):.2f} dB"
            ax.set_title(t, fontsize=8)
        axes[i, 0].text(-4, c / 2, it["name"], rotation=90, va="center", ha="right", fontsize=8)
    fig.suptitle(f"camera noise shot {shot:g}; centre {crop}×{crop} crops (PSNR of the "
                 f"whole image)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80, pil_kwargs={"quality": 85})
    plt.close(fig)


def _public_args(argv, paths=("--cache", "--out", "--photos")) -> list[str]:
    """The command line without this machine's paths (the values of the options ``paths``)."""
    out, hide = [], False
    for a in argv:
        out.append(a.split("=")[0] + "=PATH" if hide is False and "=" in a and
                   a.split("=")[0] in paths else ("PATH" if hide else a))
        hide = a in paths
    return out


def environment() -> dict:
    import skimage
    import torch
    try:
        import bm3d
        bm3d_v = getattr(bm3d, "__version__", None)
        if bm3d_v is None:
            from importlib.metadata import version
            bm3d_v = version("bm3d")
    except Exception:
        bm3d_v = None
    import ssbsn
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(device=f"CPU: {cpu} ({os.cpu_count()} cores visible)", threads_per_run=1,
                python=platform.python_version(), torch=torch.__version__,
                skimage=skimage.__version__, bm3d=bm3d_v, ssbsn=ssbsn.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Denoising quality of the quick recipe.")
    ap.add_argument("--photos", default=None, help="folder of clean photos (default: held-out "
                                                   "scikit-image photos)")
    ap.add_argument("--skimage", default=None, metavar="NAMES",
                    help="comma-separated scikit-image photos instead of the held-out ones "
                         "(e.g. camera,cat,coins,colorwheel)")
    ap.add_argument("--size", type=int, default=256, help="centre crop (default 256)")
    ap.add_argument("--shots", default=",".join(f"{s:g}" for s in SHOTS))
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="change one training option of the preset for both models (e.g. "
                         "--set pd_layout=batch --set crop=36); repeatable")
    ap.add_argument("--minutes", default="8", help="training budgets in CPU minutes, comma-"
                                                  "separated (e.g. 2,8,32); the last is the "
                                                  "main table's unless --main-minutes")
    ap.add_argument("--main-minutes", type=float, default=None)
    ap.add_argument("--per-level", action="store_true",
                    help="one training run per noise level (default: one run on all levels)")
    ap.add_argument("--methods", default="ssbsn,apbsn",
                    help="which trained models: ssbsn (the recipe), apbsn (ss_blocks=0)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-seed", type=int, default=None,
                    help="seed of the training runs (default: --seed); another value trains "
                         "again on the same noisy photos, for the spread of single runs")
    ap.add_argument("--out", default=str(HERE / "results" / "quality"))
    ap.add_argument("--cache", default=None,
                    help="folder for the baselines' results and the trained models (a second "
                         "run with the same photos, levels and seed reuses them: the baselines "
                         "as they are, the models re-denoised with today's inference code)")
    ap.add_argument("--baselines-only", action="store_true",
                    help="compute (and cache) the NLM/BM3D baselines only")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: two tiny photos, one "
                                                         "level, a few training steps")
    args = ap.parse_args(argv)
    if args.photos and args.skimage:
        ap.error("give --photos or --skimage, not both")
    names = tuple(n for n in (args.skimage or "").split(",") if n) or HELD_OUT

    shots = tuple(float(s) for s in args.shots.split(","))
    budgets = [float(m) for m in args.minutes.split(",")]
    main_minutes = args.main_minutes or max(budgets)
    train_seed = args.seed if args.train_seed is None else args.train_seed
    steps = None
    import yaml

    from ssbsn.train import TrainConfig
    given: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__ or key in ("ss_blocks", "data",
                                                                              "out", "seed"):
            ap.error(f"--set {item!r}: expected KEY=VALUE with KEY a training option "
                     "(not ss_blocks, data, out or seed)")
        given[key] = yaml.safe_load(value)  # as config.yaml reads it
    try:  # typed and checked as a config.yaml is: one line here, not a worker's traceback
        cfg = TrainConfig.from_dict({**preset_values(args.preset), **given})
        cfg.validate()
    except ValueError as e:  # ConfigError is a ValueError
        ap.error(f"--set: {e}")
    overrides: dict = {k: getattr(cfg, k) for k in given}
    user_set = dict(overrides)  # what --set changed (the smoke run's sizes are not the user's)
    if args.smoke:
        shots, budgets, main_minutes, steps = (1e-2,), [0.0], 0.0, 3
        overrides = {**dict(base_channels=8, crop=24, batch=2, warmup=1), **overrides}
        args.size = 32
    photos = load_photos(args.photos, args.size, names=names)  # every name checked once
    if args.smoke and not args.photos:
        photos = photos[:1]
    items = make_items(photos, shots, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    groups = [[it for it in items if it["shot"] == s] for s in shots] if args.per_level \
        else [items]
    tasks = []
    for m in budgets:
        for method, extra in (("ssbsn", {}), ("apbsn", {"ss_blocks": 0})):
            if method not in args.methods.split(","):
                continue
            for gi, group in enumerate(groups):
                tasks.append(dict(kind="train", method=method, minutes=m, items=group,
                                  preset=args.preset, overrides={**overrides, **extra},
                                  seed=train_seed + gi, steps=steps))
    tasks.sort(key=lambda t: -t["minutes"])  # the longest first
    if args.baselines_only:
        tasks = []
    cache = None
    # the inference settings the preset's models carry (a cached model runs with these)
    preset_inference = preset_values(args.preset).get("inference")
    run_cached: dict = {}
    if args.cache:
        source = args.photos and Path(args.photos).name
        if args.skimage:
            source = "skimage-" + "-".join(names)
        key = f"{source}_{args.size}_{args.seed}_" + \
              "_".join(f"{s:g}" for s in shots)
        run_key = key if train_seed == args.seed else f"{key}_train{train_seed}"
        if args.set:  # models trained with other options are other models
            run_key += "_" + "_".join(f"{k}-{v}" for k, v in sorted(overrides.items()))
        cache = Path(args.cache) / f"base_{key}.npz"
        for t in tasks:
            t["cache"] = str(Path(args.cache) / (
                f"run_{t['method']}_{t['minutes']:g}_{args.preset}_"
                f"{'lvl' + str(t['seed']) if args.per_level else 'all'}_{run_key}.json"))
            if Path(t["cache"]).is_file():
                model = Path(t["cache"]).with_suffix(".safetensors")
                if model.is_file():  # today's inference code and settings on the cached model
                    r = json.loads(Path(t["cache"]).read_text())
                    r.update(denoise_items(model, t["items"], preset_inference))
                else:
                    r = _load_run(Path(t["cache"]))
                run_cached[id(t)] = r
                print(f"quality: {t['method']} {t['minutes']:g} min from {t['cache']}"
                      f"{' (model re-run)' if model.is_file() else ''}", flush=True)
    cached = None
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            cached = dict(rows=json.loads(str(z["rows"])),
                          images={(k.split("@")[0], float(k.split("@")[1])): z[k]
                                  for k in z.files if "@" in k})
        print(f"quality: baselines from {cache}", flush=True)
    chunks = [items[i::max(1, args.jobs)] for i in range(max(1, args.jobs))]
    base_tasks = [] if cached else [dict(kind="base", items=c, no_bm3d=False)
                                    for c in chunks if c]

    t0 = time.perf_counter()
    print(f"quality: {len(photos)} photos × {len(shots)} levels; {len(tasks)} training runs "
          f"({', '.join(f'{m:g}' for m in budgets)} CPU-min), baselines; {args.jobs} jobs",
          flush=True)
    results = []
    todo = [t for t in tasks if id(t) not in run_cached]
    done_runs = {}
    order = tasks
    tasks = todo
    if args.jobs > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_training if t["kind"] == "train" else run_baselines, t)
                    for t in tasks + base_tasks]
            for f in futs:
                results.append(f.result())
                print(f"  done {len(results)}/{len(futs)} ({(time.perf_counter() - t0) / 60:.1f} "
                      "min)", flush=True)
    else:
        for t in tasks + base_tasks:
            results.append((run_training if t["kind"] == "train" else run_baselines)(t))
    for t, r in zip(tasks, results[:len(tasks)]):
        done_runs[id(t)] = r
        if t.get("cache"):
            _save_run(Path(t["cache"]), r)
    trained_parts = [run_cached.get(id(t)) or done_runs[id(t)] for t in order]
    base_parts = results[len(tasks):]
    base = cached or dict(rows=[r for p in base_parts for r in p["rows"]],
                          images={k: v for p in base_parts for k, v in p["images"].items()})
    if cache is not None and cached is None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, rows=json.dumps(base["rows"]),
                            **{f"{n}@{s!r}": v for (n, s), v in base["images"].items()})
    if args.baselines_only:
        print(f"quality: baselines in {cache}")
        return 0
    noisy_scores = {(it["name"], it["shot"]): scores(it["noisy"], it["clean"]) for it in items}
    for r in base["rows"]:
        r["noisy"] = noisy_scores[(r["name"], r["shot"])]
    # merge per-level runs of the same method and budget
    trained: dict = {}
    for t in trained_parts:
        k = (t["method"], t["minutes"])
        if k not in trained:
            trained[k] = dict(t, rows=list(t["rows"]), images=dict(t["images"]), runs=1)
        else:
            m = trained[k]
            m["rows"] += t["rows"]
            m["images"].update(t["images"])
            m["steps"] += t["steps"]
            m["train_cpu_min"] = round(m["train_cpu_min"] + t["train_cpu_min"], 2)
            m["train_wall_min"] = round(m["train_wall_min"] + t["train_wall_min"], 2)
            m["runs"] += 1
    trained_list = list(trained.values())
    rows, md = build_tables(photos, shots, base, trained_list, main_minutes)
    goals = targets(rows, shots)
    md += targets_table(goals) if goals else ""
    ss_main = trained.get(("ssbsn", main_minutes))
    fig_shot = 4e-3 if 4e-3 in shots else shots[-1]
    crops_figure(out / "crops.jpg", photos, fig_shot, base["images"], items,
                 ss_main["images"] if ss_main else {})
    env = environment()
    report = dict(
        environment=env, photos=[n for n, _ in photos], size=args.size, shots=list(shots),
        preset=args.preset, set=user_set, budgets_cpu_minutes=budgets, main_minutes=main_minutes,
        per_level=args.per_level, smoke=args.smoke, seed=args.seed, train_seed=train_seed,
        inference=preset_inference,
        runs=[{k: v for k, v in t.items() if k not in ("rows", "images")} for t in trained_list],
        images=rows, targets=goals, seconds=round(time.perf_counter() - t0, 1),
        command="python benchmarks/quality.py " + " ".join(_public_args(
            argv if argv is not None else sys.argv[1:])))
    header = (f"# Quality benchmark\n\n{env['device']}; torch {env['torch']}, "
              f"scikit-image {env['skimage']}, bm3d {env['bm3d']}; {env['date']}.\n"
              f"Photos: {', '.join(report['photos'])} (centre {args.size}²); preset "
              f"`{args.preset}`"
              + (f" with {', '.join(f'{k}={v}' for k, v in user_set.items())}" if user_set else "")
              + "; training on the noisy photos of "
              f"{'each level separately' if args.per_level else 'all levels together'}; "
              f"runs of one thread, budgets in CPU minutes; denoised with the preset's "
              f"inference settings (those its models carry: "
              f"{', '.join(f'{k}={v}' for k, v in (preset_inference or {}).items())}). "
              f"Command: `{report['command']}`.\n\n")
    if not any(r.get("bm3d_true") for r in rows):
        header += ("BM3D: no results (the `bm3d` package, an optional baseline, is not "
                   "installed), so its columns are empty.\n\n")
    (out / "results.md").write_text(header + md)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(md)
    print(f"quality: wrote {out}/results.md, results.json, crops.jpg "
          f"({report['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    sys.exit(main())
