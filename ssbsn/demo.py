"""``ssbsn demo``: self-supervised denoising end to end, with no data to download.

1. Takes photos shipped inside scikit-image (astronaut, coffee, chelsea, rocket), cropped.
2. Renders each through a random camera twice with the Brooks et al. pipeline
   (:mod:`ssbsn.noise`): once without noise (the clean reference) and once with raw shot/read
   noise — demosaicking makes it spatially correlated, gamma makes it signal-dependent, like
   real sRGB noise. Both are quantised to 8 bits and written as PNG.
3. Trains a small SS-BSN on the noisy PNGs alone (``ssbsn train``; the clean images are never
   seen), within a step and time budget.
4. Denoises the noisy photos (PD-2; R3 with ``r3=True``, which pays off only for a
   well-trained model) and prints PSNR of noisy and denoised against clean.

The run folder (``OUT/run``) is an ordinary training run: ``ssbsn train --config
OUT/run/config.yaml`` repeats it, and ``ssbsn denoise ... -w OUT/run/model.safetensors`` uses it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

DEMO_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")

# Tuned on a 2-core CPU (one thread): +2.2 to +3.4 dB over seeds 0-5 after 1200 steps, about
# two minutes in all. PD stride 3 in training (the paper: 5) is enough here because
# bilinear demosaicking correlates the synthetic noise over at most two pixels, and it learns
# faster; higher learning rates (1e-2) learn faster still but can kill a branch's ReLUs.
DEMO = dict(size=256, shot=0.01, base_channels=16, num_modules=2, ss_blocks=1, pd_train=3,
            crop=42, batch=4, lr=3e-3, steps=1200, min_steps=800, minutes=1.75)
QUICK = dict(size=48, shot=0.01, base_channels=8, num_modules=2, ss_blocks=1, pd_train=3,
             crop=21, batch=2, lr=3e-3, steps=3, min_steps=1, minutes=None)


def demo_photos(size: int) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 RGB) photos from skimage.data, centre-cropped to at most size×size."""
    from skimage import data
    out = []
    for name in DEMO_IMAGES:
        img = getattr(data, name)()
        h, w = img.shape[:2]
        s = min(size, h, w)
        y, x = (h - s) // 2, (w - s) // 2
        out.append((name, np.ascontiguousarray(img[y:y + s, x:x + s, :3])))
    return out


def make_pairs(size: int, shot: float, seed: int):
    """(name, noisy uint8, clean uint8) through one random camera per photo."""
    from .metrics import quantize
    from .noise import camera_noise, random_camera
    rng = np.random.default_rng(seed)
    pairs = []
    for name, img in demo_photos(size):
        cam = random_camera(rng)
        x = img / 255.0
        clean, _ = camera_noise(x, rng, shot=0.0, read=0.0, cam=cam)
        noisy, _ = camera_noise(x, rng, shot=shot, cam=cam)
        pairs.append((name, quantize(noisy * 255.0), quantize(clean * 255.0)))
    return pairs


def seconds_per_step(cfg, device: str) -> float:
    """Seconds per training step of the demo model (median of 3, after a warm-up step)."""
    import torch

    from .model import SSBSN
    from .train import pick_device
    dev = pick_device(device)
    torch.manual_seed(0)
    model = SSBSN(**cfg.model_kwargs()).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    x = torch.rand(cfg.batch, cfg.in_channels, cfg.crop, cfg.crop, device=dev) * 255
    times = []
    for _ in range(4):
        t = time.perf_counter()
        loss = (model(x) - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:]))


def run_demo(out="demo_out", steps: int | None = None, minutes: float | None = None,
             quick: bool = False, seed: int = 0, device: str = "auto", r3: bool = False,
             threads: int | None = None, overwrite: bool = False, log=print) -> dict:
    """Run the demo; returns the per-image PSNRs and the mean gain (also in OUT/report.json)."""
    import torch

    threads_before = torch.get_num_threads()
    # One thread unless told otherwise: a model this small gains little from a second one,
    # and on a busy machine OpenMP threads waiting for each other make it many times slower.
    torch.set_num_threads(threads or 1)
    try:
        return _run_demo(out, steps, minutes, quick, seed, device, r3, overwrite, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(out, steps, minutes, quick, seed, device, r3, overwrite, log) -> dict:
    import torch

    from .api import denoise_array, load_model
    from .atomic import check_writable_dir as _check_writable_dir
    from .errors import UserError as CLIError
    from .images import write_image
    from .metrics import psnr, quantize
    from .train import TrainConfig, train

    p = dict(QUICK if quick else DEMO)
    if steps is not None:
        if steps < 1:
            raise CLIError("--steps must be at least 1")
        p["steps"] = p["min_steps"] = steps
        p["minutes"] = minutes  # an explicit step count is not cut short unless asked
    if minutes is not None:
        p["minutes"], p["min_steps"] = minutes, 1
    if p["minutes"] is not None and p["minutes"] <= 0:
        raise CLIError("--minutes must be positive")
    out = Path(out)
    run = out / "run"
    if run.exists():
        if not overwrite:
            raise CLIError(f"{out} holds an earlier demo; use --overwrite to replace it or "
                           "choose another -o")
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

    cfg = TrainConfig(data=[str(out / "noisy")], out=str(run), base_channels=p["base_channels"],
                      num_modules=p["num_modules"], ss_blocks=p["ss_blocks"],
                      pd_train=p["pd_train"], crop=p["crop"], batch=p["batch"], lr=p["lr"],
                      steps=p["steps"], repeat=max(1, 64 // len(pairs)), seed=seed,
                      init_bias=True, warmup=p.get("warmup", 0),
                      device=device, log_every=10 if not quick else 1, keep=1,
                      progress=not quick)
    if p["minutes"] is not None:
        per_step = seconds_per_step(cfg, device)
        budget = max(int(p["minutes"] * 60 / per_step), p["min_steps"], 1)
        if budget < cfg.steps:
            log(f"demo: {per_step:.2f} s per training step on this machine; {budget} steps "
                f"(--steps/--minutes to change)")
            cfg.steps = budget
    cfg.save_every = cfg.steps
    summary = train(cfg)

    model = load_model(summary["weights"], device, "fused")
    rows = []
    for name, noisy, clean in pairs:
        with torch.no_grad():
            den = quantize(denoise_array(model, noisy.astype(np.float32), r3=r3))
        write_image(out / "denoised" / f"{name}.png", den)
        rows.append(dict(image=name, psnr_noisy=psnr(noisy, clean), psnr_denoised=psnr(den, clean)))
    gain = float(np.mean([r["psnr_denoised"] - r["psnr_noisy"] for r in rows]))
    report = dict(images=rows, mean_psnr_noisy=float(np.mean([r["psnr_noisy"] for r in rows])),
                  mean_psnr_denoised=float(np.mean([r["psnr_denoised"] for r in rows])),
                  mean_gain_db=gain, steps=summary["steps"], seconds=time.perf_counter() - t0,
                  settings=p, seed=seed)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    for r in rows:
        log(f"  {r['image']:<10} noisy {r['psnr_noisy']:6.2f} dB -> denoised "
            f"{r['psnr_denoised']:6.2f} dB ({r['psnr_denoised'] - r['psnr_noisy']:+.2f})")
    log(f"PSNR gain {gain:+.2f} dB (mean over {len(rows)} photos: {report['mean_psnr_noisy']:.2f} "
        f"-> {report['mean_psnr_denoised']:.2f} dB), {summary['steps']} training steps, "
        f"{report['seconds']:.0f} s; images in {out}/")
    return report
