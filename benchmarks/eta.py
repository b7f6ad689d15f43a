"""The progress bar's ETA against the true remaining time: ``ssbsn denoise --progress`` on a
synthetic noisy 2000×1500 photo with the quick preset's network (random weights: the time
does not depend on their values) and its default inference, its stderr read as it comes.

    python -m benchmarks.eta --out benchmarks/results/eta [--size 1500x2000] [--threads 2]

At every update of the bar (each network pass, then the steps after the network) the script
records the time since the command started, done/total, the ETA shown and the true remaining
time (the time of the bar's last update minus this one's). Writes ``table.md`` and
``table.json`` in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BAR = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+),")  # a whole line


def seconds(text: str) -> float | None:
    if "?" in text:
        return None
    out = 0.0
    for part in text.split(":"):
        out = out * 60 + int(part)
    return out


def synthetic_photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth shapes, edges and texture with signal-dependent noise, 8-bit RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([120 + 70 * np.sin(9 * xx + 4 * yy), 100 + 60 * np.cos(7 * yy - 3 * xx),
                    90 + 50 * xx], axis=-1)
    for _ in range(40):
        cy, cx, r = rng.random() * h, rng.random() * w, 20 + rng.random() * 200
        mask = (np.mgrid[0:h, 0:w][0] - cy) ** 2 + (np.mgrid[0:h, 0:w][1] - cx) ** 2 < r * r
        img[mask] = img[mask] * 0.5 + rng.random(3) * 120
    img += 10 * np.sin(xx * 900)[..., None] * (yy > 0.5)[..., None]
    noisy = img + rng.normal(0, 1, img.shape) * np.sqrt(4 + 0.3 * np.clip(img, 0, 255))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def run(args) -> dict:
    import torch

    from benchmarks.inference_scaling import preset_model
    from ssbsn.images import write_image
    work = Path(tempfile.mkdtemp(prefix="ssbsn-eta-"))
    h, w = args.size
    write_image(work / "photo.png", synthetic_photo(h, w))
    model = preset_model(None, 42)
    model.save(work / "model.safetensors")
    del model, torch
    cmd = [sys.executable, "-m", "ssbsn", "denoise", str(work / "photo.png"), "-o",
           str(work / "out.png"), "-w", str(work / "model.safetensors"), "--progress",
           "--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env={**os.environ, "COLUMNS": "120"})
    rows, seen, buf = [], set(), b""
    while True:
        chunk = proc.stderr.read1(4096)
        if not chunk:
            break
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        now = time.perf_counter() - t0
        # tqdm writes "\r" and then the line: the line after the last "\r" is the one shown now
        for line in lines + [buf]:
            m = BAR.search(line.decode(errors="replace"))
            if m and int(m[1]) not in seen and int(m[1]) > 0:
                seen.add(int(m[1]))
                rows.append(dict(t=round(now, 1), done=int(m[1]), total=int(m[2]),
                                 eta=seconds(m[4])))
    rc = proc.wait()
    end = time.perf_counter() - t0
    if rc:
        raise SystemExit(f"ssbsn denoise failed ({rc})")
    last = rows[-1]["t"] if rows and rows[-1]["done"] == rows[-1]["total"] else end
    for r in rows:
        r["true"] = round(last - r["t"], 1)
        r["error_pct"] = (None if r["eta"] is None or r["true"] <= 0
                          else round(100 * (r["eta"] - r["true"]) / r["true"], 1))
    return dict(size=f"{w}x{h}", threads=args.threads, wall_s=round(end, 1), rows=rows,
                loadavg=os.getloadavg())


def table(result: dict) -> str:
    out = ["| time (s) | done/total | ETA shown (s) | true remaining (s) | error |",
           "|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        eta = "?" if r["eta"] is None else f"{r['eta']:.0f}"
        err = "" if r["error_pct"] is None else f"{r['error_pct']:+.0f} %"
        out.append(f"| {r['t']:.1f} | {r['done']}/{r['total']} | {eta} | {r['true']:.1f} "
                   f"| {err} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--size", default="1500x2000", help="HxW")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.split("x"))
    before = os.getloadavg()
    result = run(args)
    result["loadavg_before"] = before
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "table.md").write_text(table(result))
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
