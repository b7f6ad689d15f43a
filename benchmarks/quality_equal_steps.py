"""SS-BSN against AP-BSN at equal training steps, for the runs of the quality benchmark.

    python benchmarks/quality_equal_steps.py benchmarks/results/quality --jobs 2

``quality.py`` compares SS-BSN and AP-BSN at equal CPU minutes, in which AP-BSN takes about
half as many steps again. This asks whether a step with SS-Attention is worth more than a
step without it. For every ``results.json`` under the folder (smoke runs only with
``--smoke``) it trains AP-BSN once more:

* on the run's own noisy photos, rebuilt from its noise seed (checked against the run's noisy
  PSNR);
* with SS-BSN's configuration from that run, training seed included, less its SS-Blocks;
* for exactly the steps SS-BSN took in the run's main budget (the learning-rate schedule laid
  over those steps).

It then denoises with the run's inference settings and scores against the run's own SS-BSN
and AP-BSN rows. It writes ``equal_steps.md`` and ``equal_steps.json`` into the folder:

* per run: the three mean gains over the noisy input (SS-BSN, AP-BSN at SS-BSN's steps, AP-BSN
  at the run's minutes), SS − AP at equal steps, and the steps;
* over the runs: the mean of each, and SS − AP at equal steps with its standard error.

``--photos DIR`` gives the folder of photos for runs made with ``quality.py --photos``.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

try:  # imported as benchmarks.quality_equal_steps
    from .quality import environment, load_photos, make_items, run_training
    from .quality_summary import (_gains, _three, check_alike, folder, load_runs,
                                  mean_over_runs, stderr_text, write_report)
except ImportError:  # run as a script: benchmarks/ is on the path
    from quality import environment, load_photos, make_items, run_training
    from quality_summary import (_gains, _three, check_alike, folder, load_runs, mean_over_runs,
                                 stderr_text, write_report)

# TrainConfig fields that run_training sets itself
_SET_BY_RUN = ("out", "progress", "seed", "budget_clock", "log_every", "steps", "minutes",
               "preset", "data")


def task_for(name: str, r: dict, photos_dir: str | None) -> dict:
    """The AP-BSN training task of one run: its photos and noise, SS-BSN's configuration and
    training seed without SS-Blocks, SS-BSN's steps, the run's inference settings."""
    ss = [t for t in r["runs"] if t["method"] == "ssbsn" and t["minutes"] == r["main_minutes"]]
    if not ss:
        raise SystemExit(f"quality_equal_steps: {name} has no SS-BSN run at its main budget "
                         f"({r['main_minutes']:g} min)")
    ss = ss[0]
    photos = load_photos(photos_dir, r["size"], names=r["photos"])
    if [n for n, _ in photos] != r["photos"]:
        raise SystemExit(f"quality_equal_steps: {name} was run on the photos {r['photos']}, "
                         f"got {[n for n, _ in photos]} (give the run's --photos folder)")
    items = make_items(photos, r["shots"], r["seed"])
    from ssbsn.metrics import psnr
    for row in r["images"]:
        it = next(i for i in items if (i["name"], i["shot"]) == (row["name"], row["shot"]))
        if abs(psnr(it["noisy"], it["clean"]) - row["noisy"]["psnr"]) > 0.01:
            raise SystemExit(f"quality_equal_steps: the noisy {row['name']} at {row['shot']:g} "
                             f"rebuilt from seed {r['seed']} is not the run's ({name})")
    cfg = ss["config"]
    overrides = {k: v for k, v in cfg.items() if k not in _SET_BY_RUN}
    overrides.update(ss_blocks=0, inference=r["inference"])
    return dict(kind="train", method="apbsn", minutes=0.0, items=items, preset=r["preset"],
                overrides=overrides, seed=cfg["seed"], steps=ss["steps"], run=name)


def compare(name: str, r: dict, trained: dict) -> dict:
    """One run's mean gains per level: SS-BSN, AP-BSN at SS-BSN's steps, AP-BSN at the run's
    minutes; and SS − AP at equal steps."""
    noisy = {(x["name"], x["shot"]): x["noisy"]["psnr"] for x in r["images"]}
    shots = r["shots"]
    ss = [float(np.mean(_gains(r["images"], "ssbsn", s))) for s in shots]
    ap_eq = [float(np.mean([x["psnr"] - noisy[(x["name"], s)] for x in trained["rows"]
                            if x["shot"] == s])) for s in shots]
    ap = [float(np.mean(_gains(r["images"], "apbsn", s))) for s in shots]
    steps = {t["method"]: t["steps"] for t in r["runs"] if t["minutes"] == r["main_minutes"]}
    return dict(run=name, seed=r["seed"], train_seed=r.get("train_seed", r["seed"]),
                ssbsn=ss, apbsn_equal_steps=ap_eq, apbsn=ap,
                diff=[a - b for a, b in zip(ss, ap_eq)],
                steps_ssbsn=steps["ssbsn"], steps_apbsn=steps.get("apbsn"),
                steps_apbsn_equal=trained["steps"], train_cpu_min=trained["train_cpu_min"],
                rows=[dict(name=x["name"], shot=x["shot"], psnr=x["psnr"], shift=x["shift"])
                      for x in trained["rows"]])


def summarize(per_run: list[dict], first: dict) -> dict:
    return dict(preset=first["preset"], shots=first["shots"], main_minutes=first["main_minutes"],
                photos=first["photos"], environment=environment(), runs=per_run,
                mean=mean_over_runs(per_run, ("ssbsn", "apbsn_equal_steps", "apbsn")))


def markdown(s: dict) -> str:
    shots = " / ".join(f"{x:g}" for x in s["shots"])
    n = len(s["runs"])
    md = [f"# SS-BSN against AP-BSN at equal steps: {n} runs", "",
          f"Preset `{s['preset']}`; photos {', '.join(s['photos'])}; mean PSNR gain over the "
          f"noisy input (dB) at shot {shots}. For each run of the quality benchmark, AP-BSN was "
          f"trained again with SS-BSN's configuration and training seed, less its SS-Blocks, for "
          f"exactly the steps SS-BSN took in {s['main_minutes']:g} CPU-minutes, and denoised "
          "with the run's inference settings. Written by "
          "`python benchmarks/quality_equal_steps.py` "
          f"({s['environment']['device']}, torch {s['environment']['torch']}, "
          f"{s['environment']['date']}).", "",
          f"| run | noise seed | training seed | steps | SS-BSN | AP-BSN, same steps | SS − AP "
          f"(same steps) | AP-BSN, {s['main_minutes']:g} min (steps) |",
          "|---|---|---|---|---|---|---|---|"]
    for p in s["runs"]:
        md.append(f"| {p['run']} | {p['seed']} | {p['train_seed']} | {p['steps_ssbsn']:,} | "
                  f"{_three(p['ssbsn'])} | {_three(p['apbsn_equal_steps'])} | "
                  f"{_three(p['diff'])} | {_three(p['apbsn'])} ({p['steps_apbsn']:,}) |")
    m = s["mean"]
    md.append(f"| mean | | | | {_three(m['ssbsn'])} | {_three(m['apbsn_equal_steps'])} | "
              f"{_three(m['diff'])}{stderr_text(m)} | {_three(m['apbsn'])} |")
    md += ["", f"SS − AP at the same steps: the mean over the {n} runs" +
           ("" if m["diff_stderr"] is None else ", ± its standard error") +
           f"; SS-BSN at least level in {' / '.join(str(k) for k in m['ss_ahead'])} of the "
           f"{n} runs."]
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="SS-BSN against AP-BSN at equal training steps.")
    ap.add_argument("folder", help="folder holding the runs' results.json (searched recursively)")
    ap.add_argument("--photos", default=None, help="the photos folder the runs were made with")
    ap.add_argument("--jobs", type=int, default=2, help="parallel processes (one thread each)")
    ap.add_argument("--smoke", action="store_true", help="take the smoke runs too")
    args = ap.parse_args(argv)
    root = folder(args.folder, "quality_equal_steps")
    runs = load_runs(root, smoke=args.smoke)
    if not runs:
        raise SystemExit(f"quality_equal_steps: no results.json of quality.py under {root}")
    check_alike(runs, "quality_equal_steps")
    tasks = [task_for(name, r, args.photos) for name, r in runs]
    t0 = time.perf_counter()
    print(f"quality_equal_steps: {len(tasks)} AP-BSN runs, {args.jobs} jobs", flush=True)
    if args.jobs > 1:
        import multiprocessing as mp
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn")) as ex:
            futs = [ex.submit(run_training, t) for t in tasks]
            results = []
            for t, f in zip(tasks, futs):
                results.append(f.result())
                print(f"  {t['run']} done ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    else:
        results = [run_training(t) for t in tasks]
    per_run = [compare(name, r, res) for (name, r), res in zip(runs, results)]
    s = summarize(per_run, runs[0][1])
    write_report(root, "equal_steps", s, markdown(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
