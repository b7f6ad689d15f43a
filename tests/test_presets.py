"""Training presets and the --minutes budget: the preset sets what it says, --minutes stops on
time with the schedule laid over the budget, and the paper preset is the paper's recipe."""
import json
import time

import pytest
import yaml

from helpers import noisy_folder
from ssbsn import SSBSN
from ssbsn.cli import main
from ssbsn.presets import PRESETS, QUICK, preset_values
from ssbsn.train import TrainConfig, lr_at_progress, read_log, train


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture
def images(tmp_path):
    return noisy_folder(tmp_path / "imgs", 3, 48, 50)


def test_paper_preset_is_the_papers_recipe():
    # the paper (Han & Yu, IJCAI-23) and the authors' config: written out, not read from code
    paper = dict(base_channels=128, num_modules=9, ss_blocks=3, gamma=2, pd_train=5, pd_test=2,
                 pd_pad=2, crop=120, batch=4, epochs=20, steps=None, lr=1e-4, lr_decay_at=0.8,
                 lr_gamma=0.1, warmup=0, lr_schedule="step", minutes=None, init_bias=False,
                 group_stats=False, inference=None)
    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in paper} == paper
    assert preset_values("paper") == {}
    m = SSBSN(**cfg.model_kwargs())
    assert m.inference == dict(r3=True, shifts=False, self_ensemble=False, tile=0, overlap=64,
                               lowpass=0.0, blend=False, wiener=False, debias=False)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_values("fast")


def _run_cli(args, tmp_path, name):
    out = tmp_path / name
    assert main(["train", *args, "--out", str(out), "--no-progress"]) == 0
    return yaml.safe_load((out / "config.yaml").read_text()), out


def test_cli_preset_sets_what_it_says_and_flags_override(images, tmp_path):
    cfg, out = _run_cli([str(images), "--preset", "quick", "--steps", "2", "--crop", "21",
                         "--minutes", "5"], tmp_path, "q")
    expect = {**QUICK, "crop": 21, "minutes": 5.0}
    for k, v in expect.items():
        assert cfg[k] == v, k
    assert cfg["preset"] == "quick" and cfg["steps"] == 2
    model = SSBSN.load(out / "model.safetensors")
    assert model.inference == QUICK["inference"]
    assert (model.config["base_channels"], model.config["num_modules"]) == (
        QUICK["base_channels"], QUICK["num_modules"])
    # no preset = paper (the default), and --preset paper is the same
    small = ["--steps", "1", "--crop", "20", "--channels", "8", "--modules", "1",
             "--ss-blocks", "0", "--batch", "1"]
    cfg_p, _ = _run_cli([str(images), "--preset", "paper", *small], tmp_path, "p")
    cfg_d, _ = _run_cli([str(images), *small], tmp_path, "d")
    cfg_d["out"] = cfg_p["out"]
    assert cfg_p == cfg_d
    assert cfg_p["lr"] == 1e-4 and cfg_p["pd_train"] == 5 and cfg_p["minutes"] is None


def test_minutes_stops_on_time_with_the_schedule_fitted(images, tmp_path):
    cfg = TrainConfig(data=[str(images)], out=str(tmp_path / "m"), base_channels=8,
                      num_modules=1, ss_blocks=1, crop=20, batch=2, repeat=4, lr=1e-3,
                      lr_schedule="cosine", warmup=2, minutes=0.05, log_every=1,
                      progress=False)
    t0 = time.perf_counter()
    s = train(cfg)
    wall = time.perf_counter() - t0
    assert 3.0 <= s["budget_spent"] < 3.0 + 2.0 and wall < 20.0
    log = read_log(tmp_path / "m")
    assert s["steps"] >= 3 and log[-1]["step"] <= s["steps"]
    lrs = [r["lr"] for r in log]
    # warm-up, then a cosine that reaches ~0 at the end of the budget (not of a step count)
    assert lrs[0] < lrs[2] and max(lrs) <= 1e-3
    assert lrs[-1] < 0.25 * max(lrs)
    assert SSBSN.load(s["weights"]).config["base_channels"] == 8
    # the schedule as a function of progress: the oracle is the formula
    assert lr_at_progress(cfg, 10, 0.5) == pytest.approx(0.5e-3)
    assert lr_at_progress(cfg, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    paper = TrainConfig(minutes=1.0)
    assert lr_at_progress(paper, 0, 0.79) == 1e-4 and lr_at_progress(paper, 0, 0.81) == 1e-5


def test_minutes_with_steps_stops_at_whichever_comes_first(images, tmp_path):
    cfg = TrainConfig(data=[str(images)], out=str(tmp_path / "s"), base_channels=8,
                      num_modules=1, ss_blocks=0, crop=20, batch=2, steps=3, minutes=10.0,
                      progress=False, budget_clock="cpu")
    s = train(cfg)
    assert s["steps"] == 3


def test_bad_budget_is_one_clear_error(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # an option out of its range: a usage error
        main(["train", str(images), "--out", str(tmp_path / "x"), "--minutes", "0"])
    assert e.value.code == 2
    assert "--minutes: must be a number above 0" in capsys.readouterr().err
    assert not (tmp_path / "x" / "model.safetensors").exists()


def test_demo_uses_the_quick_preset_and_writes_the_side_by_side(tmp_path):
    from ssbsn.demo import run_demo
    from ssbsn.images import read_image
    report = run_demo(tmp_path / "demo", quick=True, device="cpu", log=lambda s: None)
    cfg = yaml.safe_load((tmp_path / "demo" / "run" / "config.yaml").read_text())
    assert cfg["preset"] == "quick"
    for k in ("pd_train", "pd_test", "pd_pad", "ss_blocks", "lr_schedule", "inference"):
        assert cfg[k] == QUICK[k], k
    pic = read_image(tmp_path / "demo" / "side_by_side.png")
    assert pic.ndim == 3 and pic.shape[1] > pic.shape[0] / 2
    assert report["settings"]["inference"]["lowpass"] == QUICK["inference"]["lowpass"]
