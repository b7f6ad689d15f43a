"""What the tone-curve debias leaves of the brightness shift when it is told the true noise
variance instead of fitting it on the image: where the quality benchmark's brightness target
is missed because of the model of step 9 (docs/model.md), and where because of the noise curve
it is fed.

    python benchmarks/debias_ceiling.py --weights MODEL [--seed N] [--skimage NAMES] --out DIR

MODEL is a model trained by ``benchmarks/quality.py`` (its ``--cache`` folder keeps them as
``run_ssbsn_8_quick_all_..._<seed>_....safetensors``) on the same photos and noise seed. The
photos, levels and noisy images are the quality benchmark's (``quality.make_items``); the true
variance of every noisy pixel comes from ``--draws`` more renderings through the same camera.
Per image and level, with the model's own inference settings:

* the brightness shift mean(output − clean) and PSNR of the output as the benchmark scores it
  (the debias fitting the noise curve on the image), and with the true variance in its place
  (:func:`ssbsn.restore.debias.tone_curve_debias` with ``noise_var``);
* the fitted noise curve over the true one in the three darkest of its 16 intensity bins, per
  channel (where the raw-clip term acts).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (a sibling script: photos, noise and scores shared with it)

DARKEST_BINS = 3


def true_variance(img: np.ndarray, seed: int, level: int, index: int, shot: float,
                  draws: int, item: dict) -> np.ndarray:
    """The variance (0..255 units, (H, W, 3)) of ``draws`` noisy renderings of the photo through
    the camera that ``quality.make_items`` drew for this photo and level; checks that the camera
    reproduces the benchmark's own clean and noisy images first."""
    from ssbsn.noise import add_camera_noise, random_camera
    rng = np.random.default_rng([seed, level, index])  # make_items' generator
    cam = random_camera(rng)
    clean = add_camera_noise(img, rng, shot=0.0, read=0.0, cam=cam)
    noisy = add_camera_noise(img, rng, shot=shot, cam=cam)
    if not (np.array_equal(clean, item["clean"]) and np.array_equal(noisy, item["noisy"])):
        raise RuntimeError("the camera does not reproduce quality.make_items' images")
    renders = np.stack([add_camera_noise(img, np.random.default_rng([seed, level, index, 1, r]),
                                         shot=shot, cam=cam) for r in range(draws)])
    return renders.astype(np.float64).var(axis=0, ddof=1)


def run_image(task: dict) -> dict:
    quality._one_thread()
    import torch

    from ssbsn import SSBSN
    from ssbsn.restore.debias import debias_curves, tone_curve_debias
    from ssbsn.metrics import quantize
    it = task["item"]
    var = true_variance(task["photo"], task["seed"], task["level"], task["index"], it["shot"],
                        task["draws"], it)
    model = SSBSN.load(task["weights"]).eval()
    chw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None]  # noqa
    x = chw(it["noisy"].astype(np.float32))
    with torch.no_grad():
        out = model.denoise(x, debias=False)  # blend and refinement, as the model's settings say
        y = model.denoise(x, blend=False, wiener=False, debias=False)  # what the debias keys on
    v = chw(var)
    fitted = debias_curves(x, y, lag=model.pd_train)[1][0]  # the curve the debias measures
    known = debias_curves(x, y, noise_var=v)[1][0]
    row = dict(name=it["name"], shot=it["shot"],
               noisy_shift=quality.scores(it["noisy"], it["clean"])["shift"],
               darkest_ratio=[round(float((f[1][:DARKEST_BINS] / k[1][:DARKEST_BINS]).mean()), 3)
                              for f, k in zip(fitted, known)])
    for kind, nv in (("fitted", None), ("true_variance", v)):
        o = quantize(tone_curve_debias(x, y, out, noise_var=nv, lag=model.pd_train)[0]
                     .numpy().transpose(1, 2, 0))
        s = quality.scores(o, it["clean"])
        row[kind] = dict(psnr=s["psnr"], shift=s["shift"],
                         shift_rgb=[round(float(c), 3) for c in
                                    (o.astype(float) - it["clean"]).mean(axis=(0, 1))])
    return row


def markdown(report: dict) -> str:
    lines = [
        "# The debias with the true noise variance",
        "",
        f"{report['environment']['device']}; torch {report['environment']['torch']}; "
        f"{report['environment']['date']}. Model `{report['model']}`; photos "
        f"{', '.join(report['photos'])}; noise seed {report['seed']}; true variance from "
        f"{report['draws']} renderings per image. Command: `{report['command']}`.",
        "",
        "Shift = mean(output − clean) in grey levels (per channel R / G / B in brackets); "
        "fitted/true: the noise curve the debias fits on the image over the true variance, in "
        f"its {DARKEST_BINS} darkest intensity bins, R / G / B.",
        "",
        "| image | shot | noisy shift | shift, fitted curve | shift, true variance | PSNR fitted / true "
        "| fitted/true variance, darkest bins |",
        "|---|---|---|---|---|---|---|",
    ]
    f3 = lambda v: " / ".join(f"{c:+.2f}" for c in v)  # noqa: E731
    for r in report["images"]:
        a, b = r["fitted"], r["true_variance"]
        lines.append(f"| {r['name']} | {r['shot']:g} | {r['noisy_shift']:+.2f} | "
                     f"{a['shift']:+.2f} ({f3(a['shift_rgb'])}) | "
                     f"{b['shift']:+.2f} ({f3(b['shift_rgb'])}) | "
                     f"{a['psnr']:.2f} / {b['psnr']:.2f} | "
                     f"{' / '.join(f'{c:.2f}' for c in r['darkest_ratio'])} |")
    s = report["summary"]
    lines += ["", f"Largest |shift|: {s['largest_fitted']:.2f} with the fitted curve, "
                  f"{s['largest_true']:.2f} with the true variance (target < 1); mean |shift| "
                  f"{s['mean_fitted']:.2f} and {s['mean_true']:.2f}; mean PSNR "
                  f"{s['psnr_fitted']:.2f} and {s['psnr_true']:.2f} dB.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="The tone-curve debias told the true noise "
                                             "variance, against the curve it fits.")
    ap.add_argument("--weights", required=True, help="a model trained by quality.py on these "
                                                     "photos and this noise seed")
    ap.add_argument("--skimage", default=None, metavar="NAMES",
                    help="comma-separated scikit-image photos instead of the held-out ones")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shots", default=",".join(f"{s:g}" for s in quality.SHOTS))
    ap.add_argument("--seed", type=int, default=0, help="the noise seed of quality.py's run")
    ap.add_argument("--draws", type=int, default=32, help="renderings for the true variance")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    weights = Path(args.weights)
    if not weights.is_file():
        ap.error(f"no such model: {weights}")
    if args.draws < 2:
        ap.error("--draws must be at least 2")
    from ssbsn import SSBSN
    from ssbsn.errors import UserError
    try:
        debias = SSBSN.load(weights).inference["debias"]
    except (UserError, ValueError, OSError) as e:
        ap.error(f"{weights}: {e}")
    if not debias:
        ap.error(f"{weights}: the model does not debias its output (its inference settings)")
    names = tuple(n for n in (args.skimage or "").split(",") if n) or quality.HELD_OUT
    photos = quality.load_photos(None, args.size, names=names)  # a bad name: one line
    shots = tuple(float(s) for s in args.shots.split(","))
    items = quality.make_items(photos, shots, args.seed)
    tasks = [dict(item=it, photo=photos[i % len(photos)][1], level=i // len(photos),
                  index=i % len(photos), seed=args.seed, draws=args.draws, weights=str(weights))
             for i, it in enumerate(items)]  # make_items: levels outer, photos inner
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(run_image, tasks))
    fitted = [abs(r["fitted"]["shift"]) for r in rows]
    true = [abs(r["true_variance"]["shift"]) for r in rows]
    report = dict(
        environment=quality.environment(), model=weights.name, photos=[n for n, _ in photos],
        size=args.size, shots=list(shots), seed=args.seed, draws=args.draws, images=rows,
        summary=dict(largest_fitted=max(fitted), largest_true=max(true),
                     mean_fitted=float(np.mean(fitted)), mean_true=float(np.mean(true)),
                     psnr_fitted=float(np.mean([r["fitted"]["psnr"] for r in rows])),
                     psnr_true=float(np.mean([r["true_variance"]["psnr"] for r in rows]))),
        seconds=round(time.perf_counter() - t0, 1),
        command="python benchmarks/debias_ceiling.py " + " ".join(quality._public_args(
            sys.argv[1:] if argv is None else argv, paths=("--weights", "--out"))))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
