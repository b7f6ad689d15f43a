"""All runs of the quality benchmark in one table: other noise seeds, other training seeds.

    python benchmarks/quality_summary.py benchmarks/results/quality

A single 8-minute training run is a noisy measurement: two runs on the same noisy photos that
differ only in the training seed can differ by a few tenths of a dB after the whole pipeline.
This reads every ``results.json`` under the folder (smoke runs left out), which must all come
from the same preset, levels, photos and main budget, and writes ``summary.md`` and
``summary.json`` there:

* per run (noise seed, training seed): the mean gain over the noisy input of SS-BSN and AP-BSN
  at each level, their difference, the steps each took, SS-BSN's worst photo and largest
  |shift|;
* over all runs: the mean of each, the mean SS − AP difference with its standard error (the
  runs' spread over √n), how many runs have SS-BSN ahead;
* the quality targets (:func:`quality.targets`) checked on every image of every run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

try:
    from .quality import targets, targets_table  # imported as benchmarks.quality_summary
except ImportError:
    from quality import targets, targets_table  # run as a script: benchmarks/ is on the path

SAME = ("preset", "shots", "main_minutes", "photos", "size", "inference")


def load_runs(root: Path, smoke: bool = False) -> list[tuple[str, dict]]:
    """(folder relative to root, report) of every results.json under root; the smoke runs
    only with ``smoke``."""
    runs = []
    for p in sorted(root.rglob("results.json")):
        try:
            r = json.loads(p.read_text())
            if not all(k in r for k in SAME + ("images", "runs", "seed")):
                raise ValueError("fields missing")
        except (OSError, ValueError) as e:
            raise SystemExit(f"quality_summary: {p} is not a results.json of "
                             f"benchmarks/quality.py ({e})") from None
        if smoke or not r.get("smoke"):
            runs.append((str(p.parent.relative_to(root)) if p.parent != root else root.name, r))
    return runs


def _gains(rows: list[dict], method: str, shot: float) -> list[float]:
    return [r[method]["psnr"] - r["noisy"]["psnr"] for r in rows
            if r["shot"] == shot and r.get(method)]


def run_summary(name: str, r: dict) -> dict:
    """One run's mean gains per level (SS-BSN, AP-BSN, difference), steps, worst photo, shift."""
    rows, shots = r["images"], r["shots"]
    ss_gains = [_gains(rows, "ssbsn", s) for s in shots]
    ss = [float(np.mean(g)) for g in ss_gains]
    ap = [float(np.mean(_gains(rows, "apbsn", s))) for s in shots]
    steps = {t["method"]: t["steps"] for t in r["runs"] if t["minutes"] == r["main_minutes"]}
    return dict(run=name, seed=r["seed"], train_seed=r.get("train_seed", r["seed"]),
                ssbsn=ss, apbsn=ap, diff=[a - b for a, b in zip(ss, ap)],
                steps_ssbsn=steps.get("ssbsn"), steps_apbsn=steps.get("apbsn"),
                worst=min(min(g) for g in ss_gains),
                shift=max(abs(x["ssbsn"]["shift"]) for x in rows))


def check_alike(runs: list[tuple[str, dict]], prog: str) -> None:
    """One clear line (from ``prog``) unless every run has the first one's SAME fields."""
    name0, first = runs[0]
    for name, r in runs[1:]:
        for k in SAME:
            if r.get(k) != first.get(k):
                raise SystemExit(f"{prog}: {name} differs from {name0} in {k!r} "
                                 f"({r.get(k)!r} against {first.get(k)!r}); take like runs")


def mean_over_runs(per_run: list[dict], keys) -> dict:
    """The runs' mean of each per-level list ``keys``, and of their SS − AP ``diff`` its mean,
    standard error (None for one run) and how many runs have SS-BSN at least level."""
    diff = np.array([p["diff"] for p in per_run])  # (runs, levels)
    n = len(per_run)
    return {**{k: np.mean([p[k] for p in per_run], axis=0).tolist() for k in keys},
            "diff": diff.mean(axis=0).tolist(),
            "diff_stderr": (diff.std(axis=0, ddof=1) / np.sqrt(n)).tolist() if n > 1 else None,
            "ss_ahead": [int(v) for v in (diff >= 0).sum(axis=0)]}


def summarize(runs: list[tuple[str, dict]]) -> dict:
    if not runs:
        raise SystemExit("quality_summary: no results.json (other than smoke runs) found")
    check_alike(runs, "quality_summary")
    first = runs[0][1]
    per_run = [run_summary(n, r) for n, r in runs]
    all_rows = [row for _, r in runs for row in r["images"]]
    return dict(
        preset=first["preset"], shots=first["shots"], main_minutes=first["main_minutes"],
        photos=first["photos"], runs=per_run, mean=mean_over_runs(per_run, ("ssbsn", "apbsn")),
        targets=targets(all_rows, first["shots"]))


def _three(v) -> str:
    return " / ".join(f"{x:+.2f}" for x in v)


def stderr_text(m: dict) -> str:
    """' (± a / b / c)' of a mean_over_runs' standard error; '' for one run."""
    if m["diff_stderr"] is None:
        return ""
    return " (± " + " / ".join(f"{e:.2f}" for e in m["diff_stderr"]) + ")"


def folder(path: str, prog: str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"{prog}: {root} is not a folder")
    return root


def write_report(root: Path, stem: str, s: dict, md: str) -> None:
    """``stem``.json and ``stem``.md into root, and the markdown on stdout."""
    (root / f"{stem}.json").write_text(json.dumps(s, indent=1) + "\n")
    (root / f"{stem}.md").write_text(md)
    print(md)


def markdown(s: dict) -> str:
    shots = " / ".join(f"{x:g}" for x in s["shots"])
    n = len(s["runs"])
    md = [f"# Quality benchmark: {n} runs together", "",
          f"Preset `{s['preset']}`, {s['main_minutes']:g} CPU-minutes of training per model; "
          f"photos {', '.join(s['photos'])}; mean PSNR gain over the noisy input (dB) at shot "
          f"{shots}. Each run: one noise seed (cameras and noise of the photos) and one training "
          "seed (initialisation and crops), SS-BSN and AP-BSN trained side by side. Written by "
          "`python benchmarks/quality_summary.py` from the runs' results.json.", "",
          "| run | noise seed | training seed | SS-BSN | AP-BSN | SS − AP | steps SS / AP "
          "| worst photo (SS) | largest \\|shift\\| (SS) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in s["runs"]:
        md.append(f"| {p['run']} | {p['seed']} | {p['train_seed']} | {_three(p['ssbsn'])} | "
                  f"{_three(p['apbsn'])} | {_three(p['diff'])} | "
                  f"{p['steps_ssbsn']:,} / {p['steps_apbsn']:,} | {p['worst']:+.2f} | "
                  f"{p['shift']:.2f} |")
    m = s["mean"]
    md.append(f"| mean | | | {_three(m['ssbsn'])} | {_three(m['apbsn'])} | "
              f"{_three(m['diff'])}{stderr_text(m)} | | | |")
    md += ["", f"SS − AP: the mean over the {n} runs" +
           ("" if m["diff_stderr"] is None else ", ± its standard error (the runs' standard "
            "deviation over √n)") + f"; SS-BSN at least level with AP-BSN in "
           f"{' / '.join(str(k) for k in m['ss_ahead'])} of the {n} runs at shot {shots}."]
    md.append(targets_table(s["targets"]).replace(
        "Targets (the main SS-BSN run):", f"Targets, on every image of the {n} runs:"))
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="All quality-benchmark runs in one table.")
    ap.add_argument("folder", help="folder holding the runs' results.json (searched recursively)")
    args = ap.parse_args(argv)
    root = folder(args.folder, "quality_summary")
    s = summarize(load_runs(root))
    write_report(root, "summary", s, markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
