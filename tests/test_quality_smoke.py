"""benchmarks/quality.py --smoke: the whole quality pipeline in seconds (tiny photo, few steps).
The numbers it reports are checked against scikit-image computed here independently."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def _benchmark(name: str):
    """A module of benchmarks/ (a folder of scripts, not a package on the path)."""
    import importlib
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_quality_smoke(tmp_path):
    quality = _benchmark("quality")
    out = tmp_path / "q"
    assert quality.main(["--smoke", "--out", str(out), "--jobs", "1"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text().count("|") > 20
    assert (out / "crops.jpg").stat().st_size > 1000
    assert report["smoke"] and report["environment"]["torch"] == torch.__version__
    assert {r["method"] for r in report["runs"]} == {"ssbsn", "apbsn"}
    assert all(r["steps"] == 3 for r in report["runs"])
    # the AP-BSN run really has no SS-Blocks, the SS-BSN run has the preset's
    cfg = {r["method"]: r["config"] for r in report["runs"]}
    assert cfg["apbsn"]["ss_blocks"] == 0 and cfg["ssbsn"]["ss_blocks"] >= 1
    # each run carries the trainer's check, and the report lists it
    md = (out / "results.md").read_text()
    for r in report["runs"]:
        c = r["check"]
        assert c["ok"] == all(v <= 1.1 for v in c["ratio"]) and c["size"] == 30  # 32 px, PD 3
        assert f"- {r['method']} 0 min: " + " / ".join(f"{v:.2f}" for v in c["ratio"]) in md
    # independent oracle for the noisy row and the true σ: the same pairs, skimage's PSNR
    from skimage.metrics import peak_signal_noise_ratio
    items = quality.make_items(quality.load_photos(None, 32, quality.HELD_OUT[:1]), (1e-2,), 0)
    (row,) = report["images"]
    it = items[0]
    assert row["noisy"]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(it["clean"], it["noisy"], data_range=255), abs=1e-3)
    assert row["sigma_true"] == pytest.approx(
        np.std(it["noisy"].astype(float) - it["clean"].astype(float)), abs=1e-3)
    baselines = ("nlm_blind", "nlm_true") + (
        ("bm3d_blind", "bm3d_true") if quality.have_bm3d() else ())  # bm3d: optional
    if not quality.have_bm3d():
        assert row.get("bm3d_true") is None and "BM3D: no results" in md
    for k in ("ssbsn", "apbsn") + baselines:
        assert 5.0 < row[k]["psnr"] < 60.0 and -1.0 <= row[k]["ssim"] <= 1.0, k
    # NLM told the true σ smooths more than blind NLM on this correlated noise
    assert row["nlm_true"]["psnr"] > row["nlm_blind"]["psnr"]
    # the quick preset blends with the noisy pixel, refines and debiases, so each run is also scored
    # as the network's estimate alone
    assert row["ssbsn_plain"] is not None and row["apbsn_plain"] is not None
    assert row["ssbsn_plain"]["psnr"] != row["ssbsn"]["psnr"]
    # the targets in the report, recomputed here from its own rows
    goals = {t["name"].split(" (")[0]: t for t in report["targets"]}
    worst = min(r["ssbsn"]["psnr"] - r["noisy"]["psnr"] for r in report["images"])
    g = goals["every photo improves at every level"]
    assert g["value"] == pytest.approx(worst, abs=0.006) and g["met"] == (worst > 0)
    d = row["ssbsn"]["psnr"] - row["apbsn"]["psnr"]
    g = goals["SS-BSN at least as good as AP-BSN at shot 0.01"]
    assert g["value"] == pytest.approx(d, abs=0.006) and g["met"] == (d >= 0)
    g = goals["brightness: abs(mean(output − clean)) < 1 grey level"]
    assert g["value"] == pytest.approx(abs(row["ssbsn"]["shift"]), abs=0.006)
    g = goals["... the noisy input's own shift, for comparison"]
    assert g["value"] == pytest.approx(abs(row["noisy"]["shift"]), abs=0.006) and g["met"] is None
    assert "MET" in (out / "results.md").read_text()


def test_quality_skimage_photos_by_name(tmp_path):
    """--skimage NAMES: other scikit-image photos than the held-out set (a grey one repeated into
    three channels); an unknown name or --photos beside it is one clear line."""
    from skimage import data
    from skimage.metrics import peak_signal_noise_ratio
    quality = _benchmark("quality")
    out = tmp_path / "q"
    assert quality.main(["--smoke", "--skimage", "coins", "--out", str(out), "--jobs", "1"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["photos"] == ["coins"] and "--skimage coins" in report["command"]
    (photo,) = quality.load_photos(None, 32, ("coins",))
    coins = data.coins()
    assert photo[1].shape == (32, 32, 3) and (photo[1] == photo[1][..., :1]).all()
    assert any(np.array_equal(photo[1][..., 0], coins[y:y + 32, x:x + 32])
               for y in range(coins.shape[0] - 31) for x in range(coins.shape[1] - 31))
    it = quality.make_items([photo], (1e-2,), 0)[0]
    (row,) = report["images"]
    assert row["noisy"]["psnr"] == pytest.approx(
        peak_signal_noise_ratio(it["clean"], it["noisy"], data_range=255), abs=1e-3)
    with pytest.raises(SystemExit, match="'nonsense' is not one of scikit-image's"):
        quality.main(["--smoke", "--skimage", "coins,nonsense", "--out", str(out), "--jobs", "1"])
    with pytest.raises(SystemExit):
        quality.main(["--smoke", "--skimage", "coins", "--photos", str(tmp_path), "--out",
                      str(out), "--jobs", "1"])


def test_quality_train_seed_trains_again_on_the_same_photos(tmp_path):
    """--train-seed: the same noisy photos and cached baselines, the training runs with another
    seed, kept in the cache apart from the runs with the default seed."""
    quality = _benchmark("quality")
    cache = tmp_path / "cache"
    reports = {}
    for seed in (None, 7):
        out = tmp_path / f"q{seed}"
        argv = ["--smoke", "--out", str(out), "--jobs", "1", "--cache", str(cache)]
        assert quality.main(argv + ([] if seed is None else ["--train-seed", str(seed)])) == 0
        reports[seed] = json.loads((out / "results.json").read_text())
    a, b = reports[None], reports[7]
    assert (a["seed"], a["train_seed"], b["seed"], b["train_seed"]) == (0, 0, 0, 7)
    assert {r["config"]["seed"] for r in a["runs"]} == {0}
    assert {r["config"]["seed"] for r in b["runs"]} == {7}
    # the same noisy photo and the same (cached) baselines
    for k in ("noisy", "bm3d_true", "nlm_true"):
        assert a["images"][0][k] == b["images"][0][k]
    assert "--train-seed 7" in b["command"]
    runs = sorted(p.name for p in cache.glob("run_*.json"))
    assert len(runs) == 4 and sum("_train7" in n for n in runs) == 2
    assert len(list(cache.glob("base_*.npz"))) == 1
    # the two runs summarised: the mean difference, its standard error and the targets, recomputed
    # here from the runs' own rows
    import statistics
    quality_summary = _benchmark("quality_summary")
    s = quality_summary.summarize(quality_summary.load_runs(tmp_path, smoke=True))
    diffs = [r["images"][0]["ssbsn"]["psnr"] - r["images"][0]["apbsn"]["psnr"] for r in (a, b)]
    assert sorted(p["train_seed"] for p in s["runs"]) == [0, 7]
    assert s["mean"]["diff"][0] == pytest.approx(statistics.mean(diffs), abs=1e-9)
    assert s["mean"]["diff_stderr"][0] == pytest.approx(statistics.stdev(diffs) / 2 ** 0.5,
                                                         abs=1e-9)
    assert s["mean"]["ss_ahead"] == [sum(d >= 0 for d in diffs)]
    worst = min(r["images"][0]["ssbsn"]["psnr"] - r["images"][0]["noisy"]["psnr"] for r in (a, b))
    assert s["targets"][0]["value"] == pytest.approx(worst, abs=0.006)
    assert quality_summary.load_runs(tmp_path) == []  # smoke runs are left out by default
    b["preset"] = "paper"  # unlike runs are refused
    with pytest.raises(SystemExit, match="preset"):
        quality_summary.summarize([("a", a), ("b", b)])
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    (bad / "results.json").write_text("{")  # a broken file: one clear line, no traceback
    with pytest.raises(SystemExit, match="is not a results.json of benchmarks/quality.py"):
        quality_summary.load_runs(tmp_path / "bad")


def test_equal_steps_trains_the_runs_own_apbsn_again(tmp_path):
    """quality_equal_steps on a smoke run, whose AP-BSN took the same 3 steps as its SS-BSN with
    the same seed and configuration: AP-BSN trained again from the run's record (SS-BSN's
    configuration less its SS-Blocks, its steps, the noisy photos rebuilt from the noise seed, the
    run's inference settings) gives the run's own AP-BSN rows to the bit."""
    quality = _benchmark("quality")
    run = tmp_path / "runs" / "smoke"
    assert quality.main(["--smoke", "--out", str(run), "--jobs", "1"]) == 0
    equal_steps = _benchmark("quality_equal_steps")
    with pytest.raises(SystemExit, match="no results.json"):  # smoke runs only when asked
        equal_steps.main([str(tmp_path / "runs"), "--jobs", "1"])
    assert equal_steps.main([str(tmp_path / "runs"), "--smoke", "--jobs", "1"]) == 0
    s = json.loads((tmp_path / "runs" / "equal_steps.json").read_text())
    r = json.loads((run / "results.json").read_text())
    (p,) = s["runs"]
    assert p["steps_apbsn_equal"] == p["steps_ssbsn"] == 3
    ap_rows = {(x["name"], x["shot"]): x["apbsn"] for x in r["images"]}
    for x in p["rows"]:
        assert (x["psnr"], x["shift"]) == (ap_rows[(x["name"], x["shot"])]["psnr"],
                                           ap_rows[(x["name"], x["shot"])]["shift"])
    (row,) = r["images"]
    assert p["ssbsn"] == [pytest.approx(row["ssbsn"]["psnr"] - row["noisy"]["psnr"], abs=1e-9)]
    assert p["diff"] == [pytest.approx(p["ssbsn"][0] - p["apbsn_equal_steps"][0], abs=1e-12)]
    assert "| smoke |" in (tmp_path / "runs" / "equal_steps.md").read_text()
    # a run whose noisy photos cannot be rebuilt (another noise seed recorded) is refused
    r["seed"] = 5
    (run / "results.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match="is not the run's"):
        equal_steps.main([str(tmp_path / "runs"), "--smoke", "--jobs", "1"])


def test_debias_ceiling_scores_what_the_benchmark_scores_and_the_true_variance(tmp_path):
    """benchmarks/debias_ceiling.py on tiny crops with an untrained model: its 'fitted' row is the
    model's own output as the quality benchmark scores it, recomputed here; its 'true variance'
    row is the debias told the variance of renderings through the same camera, also recomputed
    here from draws of that camera; a missing model is one line."""
    from ssbsn import SSBSN
    from ssbsn.restore.debias import tone_curve_debias
    from ssbsn.metrics import quantize
    from ssbsn.noise import add_camera_noise, random_camera
    ceiling, quality = _benchmark("debias_ceiling"), _benchmark("quality")
    torch.manual_seed(0)
    settings = dict(r3=False, shifts=True, self_ensemble=False, tile=0, overlap=16, lowpass=4.0,
                    blend=True, wiener=False, debias=True)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_test=2, inference=settings)
    weights = tmp_path / "m.safetensors"
    model.save(weights)
    out = tmp_path / "c"
    argv = ["--weights", str(weights), "--size", "32", "--shots", "0.01", "--draws", "6",
            "--skimage", "coins", "--jobs", "1", "--out", str(out)]
    assert ceiling.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    (row,) = report["images"]
    assert "--weights PATH" in report["command"] and str(tmp_path) not in report["command"]
    assert "| coins | 0.01 |" in (out / "results.md").read_text()
    (photo,) = quality.load_photos(None, 32, ("coins",))
    it = quality.make_items([photo], (1e-2,), 0)[0]
    x = torch.from_numpy(it["noisy"].astype(np.float32).transpose(2, 0, 1).copy())[None]
    model = SSBSN.load(weights).eval()
    with torch.no_grad():
        own = quantize(model.denoise(x)[0].numpy().transpose(1, 2, 0))
        pre = model.denoise(x, debias=False)
        est = model.denoise(x, blend=False, wiener=False, debias=False)
    assert row["fitted"]["shift_rgb"] == pytest.approx(
        list((own.astype(float) - it["clean"]).mean(axis=(0, 1))), abs=1e-3)
    assert row["fitted"]["psnr"] == quality.scores(own, it["clean"])["psnr"]
    assert row["fitted"]["shift"] == quality.scores(own, it["clean"])["shift"]
    rng = np.random.default_rng([0, 0, 0])  # make_items' generator for the first photo and level
    cam = random_camera(rng)
    draws = np.stack([add_camera_noise(photo[1], np.random.default_rng([0, 0, 0, 1, r]),
                                       shot=1e-2, cam=cam) for r in range(6)]).astype(float)
    var = torch.from_numpy(draws.var(0, ddof=1).transpose(2, 0, 1).copy())[None]
    known = quantize(tone_curve_debias(x, est, pre, noise_var=var)[0].numpy().transpose(1, 2, 0))
    assert row["true_variance"]["psnr"] == quality.scores(known, it["clean"])["psnr"]
    assert row["true_variance"]["shift"] == quality.scores(known, it["clean"])["shift"]
    assert len(row["darkest_ratio"]) == 3 and all(r > 0 for r in row["darkest_ratio"])
    with pytest.raises(SystemExit) as e:
        ceiling.main(["--weights", str(tmp_path / "none.safetensors"), "--out", str(out)])
    assert e.value.code == 2


def test_quality_set_changes_the_recipe_of_both_models_and_bad_values_are_one_line(
        tmp_path, capsys):
    quality = _benchmark("quality")
    out, cache = tmp_path / "q", tmp_path / "cache"
    assert quality.main(["--smoke", "--out", str(out), "--jobs", "1", "--cache", str(cache),
                         "--set", "pd_layout=batch", "--set", "lr=1e-3"]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["set"] == {"pd_layout": "batch", "lr": 1e-3}
    for r in report["runs"]:
        assert r["config"]["pd_layout"] == "batch" and r["config"]["lr"] == 1e-3
    assert "preset `quick` with pd_layout=batch, lr=0.001" in (out / "results.md").read_text()
    # the models are cached under names of their own: without --set they are not reused
    models = sorted(p.name for p in cache.glob("run_*.safetensors"))
    assert len(models) == 2 and all("pd_layout-batch" in m for m in models)
    assert all(p.with_suffix(".log.jsonl").is_file() for p in cache.glob("run_*.safetensors"))
    capsys.readouterr()
    for bad, says in (("crop=abc", "configuration key crop: 'abc' is not an integer"),
                      ("ss_blocks=2", "not ss_blocks"),
                      ("pd_layout=tiles", "pd_layout='tiles' out of range"),
                      ("init_bias=maybe", "true or false"), ("nonsense=1", "KEY=VALUE")):
        with pytest.raises(SystemExit) as e:
            quality.main(["--smoke", "--out", str(tmp_path / "bad"), "--set", bad])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert says in err and ": error: --set" in err
    assert not (tmp_path / "bad").exists()
