"""``ssbsn demo``: self-supervised denoising end to end, with no data to download.

1. Takes photos shipped inside scikit-image (astronaut, coffee, chelsea, rocket), cropped.
2. Renders each through a random camera twice with the Brooks et al. pipeline
   (:mod:`ssbsn.noise`): once without noise (the clean reference) and once with raw shot/read
   noise — demosaicking makes it spatially correlated, gamma makes it signal-dependent, like
   real sRGB noise. Both are quantised to 8 bits and written as PNG.
3. Trains SS-BSN with the ``quick`` preset (:mod:`ssbsn.presets`) on the noisy PNGs alone
   (``ssbsn train --preset quick``; the clean images are never seen) within a time budget.
4. Denoises the noisy photos with the trained model's own inference settings, prints PSNR of
   noisy and denoised against clean, and writes ``side_by_side.png`` (noisy | denoised |
   clean, with PSNR).

The run folder (``OUT/run``) is an ordinary training run: ``ssbsn train --config
OUT/run/config.yaml`` repeats it, and ``ssbsn denoise ... -w OUT/run/model.safetensors`` uses it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")

# The demo trains with the quick preset for DEMO["minutes"] (one thread); --quick is a few
# seconds for tests (a tiny model, no gain expected).
DEMO = dict(size=256, shot=0.01, minutes=4.0, steps=None)
QUICK = dict(size=48, shot=0.01, minutes=None, steps=3, base_channels=8, crop=24, batch=2,
             warmup=1)


def demo_outputs(out) -> list[Path]:
    """Every file and folder the demo writes into ``out`` (none is replaced without
    ``--overwrite``)."""
    out = Path(out)
    return [out / "run", out / "report.json", out / "side_by_side.png"] + [
        out / sub / f"{name}.png" for sub in ("noisy", "clean", "denoised")
        for name in DEMO_IMAGES]


def demo_photos(size: int) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB) photos from skimage.data, centre-cropped to at most size×size."""
    from skimage import data

    from .data.tiles import centre_crop
    return [(name, centre_crop(getattr(data, name)(), size)) for name in DEMO_IMAGES]


def make_pairs(size: int, shot: float, seed: int):
    """(name, noisy uint8, clean uint8) through one random camera per photo."""
    from .noise import camera_pair
    rng = np.random.default_rng(seed)
    return [(name, *camera_pair(img, rng, shot)) for name, img in demo_photos(size)]


def run_demo(out="demo_out", steps: int | None = None, minutes: float | None = None,
             quick: bool = False, seed: int = 0, device: str = "auto", r3: bool | None = None,
             threads: int | None = None, overwrite: bool = False, log=print,
             budget_clock: str = "wall", progress: bool | None = None) -> dict:
    """Run the demo; returns the per-image PSNRs and the mean gain (also in OUT/report.json).
    ``budget_clock="cpu"`` counts the training minutes in CPU time (for a busy machine);
    ``progress``: the training's progress bar (None: on, except with ``quick``)."""
    import torch

    threads_before = torch.get_num_threads()
    # One thread unless told otherwise: a model this small gains little from a second one,
    # and on a busy machine OpenMP threads waiting for each other make it many times slower.
    torch.set_num_threads(threads or 1)
    try:
        return _run_demo(out, steps, minutes, quick, seed, device, r3, overwrite, log,
                         budget_clock, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(out, steps, minutes, quick, seed, device, r3, overwrite, log,
              budget_clock="wall", progress=None) -> dict:
    import torch

    from .api import denoise_array, load_model
    from .atomic import check_writable_dir as _check_writable_dir
    from .errors import UserError as CLIError
    from .images import write_image
    from .metrics import psnr, quantize
    from .presets import preset_values
    from .train import TrainConfig, train

    p = dict(QUICK if quick else DEMO)
    if steps is not None:
        if steps < 1:
            raise CLIError("--steps must be at least 1")
        p["steps"], p["minutes"] = steps, minutes  # a step count is not cut short unless asked
    elif minutes is not None:
        p["minutes"] = minutes
    if p["minutes"] is not None and p["minutes"] <= 0:
        raise CLIError("--minutes must be positive")
    out = Path(out)
    run = out / "run"
    existing = next((f for f in demo_outputs(out) if f.exists()), None)
    if existing is not None and not overwrite:
        raise CLIError(f"{out} holds an earlier demo ({existing} exists); use --overwrite to "
                       "replace it or choose another -o")
    if run.exists():
        import shutil
        shutil.rmtree(run)
    t0 = time.perf_counter()
    for sub in ("noisy", "clean", "denoised"):
        _check_writable_dir(out / sub)

    pairs = make_pairs(p["size"], p["shot"], seed)
    for name, noisy, clean in pairs:
        write_image(out / "noisy" / f"{name}.png", noisy)
        write_image(out / "clean" / f"{name}.png", clean)
    log(f"demo: {len(pairs)} photos of {pairs[0][1].shape[0]}×{pairs[0][1].shape[1]} with "
        f"synthetic camera noise (shot {p['shot']}) in {out}/noisy")

    train_kw = {**preset_values("quick"),
                **{k: v for k, v in p.items() if k not in ("size", "shot", "minutes", "steps")}}
    cfg = TrainConfig(**train_kw)
    cfg.data, cfg.out, cfg.preset = [str(out / "noisy")], str(run), "quick"
    cfg.minutes, cfg.steps, cfg.budget_clock = p["minutes"], p["steps"], budget_clock
    cfg.repeat, cfg.seed, cfg.device = max(cfg.repeat, 64 // len(pairs)), seed, device
    cfg.log_every, cfg.keep = (1 if quick else 10), 1
    cfg.progress = not quick if progress is None else progress
    cfg.save_every = 10 ** 9  # the final weights only
    if cfg.minutes is not None:
        log(f"demo: training for {cfg.minutes:g} minutes (--minutes to change)")
    summary = train(cfg)

    model = load_model(summary["weights"], device, "fused")
    rows, shown = [], []
    for name, noisy, clean in pairs:
        with torch.no_grad():
            den = quantize(denoise_array(model, noisy.astype(np.float32), r3=r3))
        write_image(out / "denoised" / f"{name}.png", den)
        rows.append(dict(image=name, psnr_noisy=psnr(noisy, clean), psnr_denoised=psnr(den, clean),
                         shift=float(den.astype(np.float64).mean() - clean.astype(np.float64).mean())))
        shown.append((name, noisy, den, clean))
    side_by_side(out / "side_by_side.png", shown)
    gain = float(np.mean([r["psnr_denoised"] - r["psnr_noisy"] for r in rows]))
    report = dict(images=rows, mean_psnr_noisy=float(np.mean([r["psnr_noisy"] for r in rows])),
                  mean_psnr_denoised=float(np.mean([r["psnr_denoised"] for r in rows])),
                  mean_gain_db=gain, steps=summary["steps"], seconds=time.perf_counter() - t0,
                  settings=dict(p, inference=dict(model.inference, pd_test=model.pd_test)),
                  cpu_seconds=summary.get("cpu_seconds"), seed=seed, check=summary.get("check"))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for r in rows:
        log(f"  {r['image']:<10} noisy {r['psnr_noisy']:6.2f} dB -> denoised "
            f"{r['psnr_denoised']:6.2f} dB ({r['psnr_denoised'] - r['psnr_noisy']:+.2f})")
    log(f"PSNR gain {gain:+.2f} dB (mean over {len(rows)} photos: {report['mean_psnr_noisy']:.2f} "
        f"-> {report['mean_psnr_denoised']:.2f} dB), {summary['steps']} training steps, "
        f"{report['seconds']:.0f} s; images in {out}/")
    if report["check"] and not report["check"]["ok"]:  # a warning, as 'ssbsn train' says it
        import warnings
        warnings.warn(report["check"]["message"].removeprefix("warning: "), RuntimeWarning,
                      stacklevel=2)
    return report


def side_by_side(path, shown, title: str | None = None) -> None:
    """One row per photo: noisy | denoised | clean, each labelled with its PSNR (dB)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .atomic import atomic_path
    from .metrics import psnr
    n = len(shown)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n), squeeze=False)
    for i, (name, noisy, den, clean) in enumerate(shown):
        for j, (label, img) in enumerate((("noisy", noisy), ("SS-BSN", den), ("clean", clean))):
            ax = axes[i, j]
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if label != "clean":
                label = f"{label}  {psnr(img, clean):.2f} dB"
            ax.set_title(f"{name}: {label}" if j == 0 else label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
