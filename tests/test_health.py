"""The training check (ssbsn.health): the neighbour mean against a plain loop, the losses
against a direct computation, and a real failure of the quality benchmark caught."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssbsn import SSBSN
from ssbsn.data import ArraySource
from ssbsn.health import LIMIT, check_size, check_training, neighbour_mean

FAILED = (Path(__file__).parents[1] / "benchmarks" / "results" / "quality_lag_debias" / "seed1"
          / "apbsn_failed_run.safetensors")


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_neighbour_mean_against_a_loop(stride):
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    got = neighbour_mean(x, stride).numpy()
    a = x.numpy()
    s = stride
    for r in range(s, 11 - s):
        for c in range(s, 13 - s):
            nb = [a[..., r + dy, c + dx] for dy in (-s, 0, s) for dx in (-s, 0, s)
                  if (dy, dx) != (0, 0)]
            np.testing.assert_allclose(got[..., r - s, c - s], np.mean(nb, 0), rtol=1e-12)
    with pytest.raises(ValueError, match="no interior"):
        neighbour_mean(torch.zeros(1, 1, 6, 9), 3)


def _noisy_images(n=3, size=60, sigma=12.0, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for i in range(n):
        clean = 128 + 80 * np.sin(2 * np.pi * (xx * (i + 1) + yy))
        img = clean[..., None] * np.array([1.0, 0.8, 0.6]) + rng.normal(0, sigma, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_losses_match_a_direct_computation():
    torch.manual_seed(0)
    imgs = _noisy_images()
    src = ArraySource(imgs, ["a", "b", "c"])
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=1, pd_train=3, pd_pad=0)
    c = check_training(model, src, 3, 24)
    assert c.size == check_size(src, 3, 24) == 60 and c.crops == 3  # the whole images, once
    net, nb = np.zeros(3), np.zeros(3)
    with torch.no_grad():
        for img in imgs:  # 60 px images: the check's crops are the images themselves
            x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1).copy())[None]
            y = model(x)
            inner = x[..., 3:-3, 3:-3]
            net += (y[..., 3:-3, 3:-3] - inner).abs().mean((0, 2, 3)).double().numpy()
            nb += (neighbour_mean(x, 3) - inner).abs().mean((0, 2, 3)).double().numpy()
    np.testing.assert_allclose(c.network, net / 3, rtol=1e-5)
    np.testing.assert_allclose(c.neighbours, nb / 3, rtol=1e-5)
    assert c.ratio == pytest.approx(list(np.array(c.network) / np.array(c.neighbours)))


def test_an_untrained_network_fails_and_says_so():
    torch.manual_seed(1)
    model = SSBSN(base_channels=8, num_modules=1, ss_blocks=0, pd_train=3, pd_pad=0)
    c = check_training(model, ArraySource(_noisy_images(), ["a", "b", "c"]), 3, 24)
    assert not c.ok and min(c.ratio) > LIMIT  # its output is near 0: far from any pixel
    assert c.describe().startswith("warning: training failed")
    assert "another --seed" in c.describe()
    d = c.to_dict()
    assert d["ok"] is False and d["message"] == c.describe() and d["size"] == 60


def _stripes(n=2, size=48, sigma=8.0, seed=0):
    """Vertical stripes of period 4: the pixels 2 apart across the stripes have the opposite
    value, so the plain neighbour mean at stride 2 is a poor prediction that a network beats
    within a few dozen steps."""
    rng = np.random.default_rng(seed)
    xx = np.arange(size)[None, :].repeat(size, 0)
    out = []
    for i in range(n):
        clean = 128 + 90 * np.sign(np.sin(2 * np.pi * (xx + i) / 4 + 0.3))
        img = clean[..., None] * np.array([1.0, 0.8, 0.6]) + rng.normal(0, sigma, (size, size, 3))
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def test_training_writes_the_check_and_a_trained_network_passes(tmp_path):
    from ssbsn.train import TrainConfig, train
    src = ArraySource(_stripes(), ["a", "b"])
    cfg = TrainConfig(base_channels=8, num_modules=1, ss_blocks=0, pd_train=2, pd_pad=0,
                      crop=24, batch=4, repeat=8, lr=3e-3, steps=60, init_bias=True,
                      out=str(tmp_path / "run"), progress=False, log_every=20,
                      lr_schedule="cosine")
    summary = train(cfg, source=src)
    check = summary["check"]
    assert check == json.loads((tmp_path / "run" / "check.json").read_text())
    assert check["size"] == 48 and check["stride"] == 2 and check["crops"] == 2
    assert check["ok"] and max(check["ratio"]) < 0.8, check["ratio"]
    # the same numbers from the saved weights
    again = check_training(SSBSN.load(summary["weights"]), src, 2, 24)
    np.testing.assert_allclose(again.network, check["network"], rtol=1e-6)


@pytest.mark.skipif(not FAILED.is_file(), reason="the failed benchmark model is not here")
def test_the_failed_benchmark_model_is_caught_at_image_scale_not_at_crop_scale():
    """The AP-BSN model that failed in the quality benchmark (noise seed 1) learned to rely on
    the pixels next to the blind spot that PD's tiled map offers at 42-px crops. On those crops
    it even beats a healthy model; on whole images it is worse than the neighbour mean. The
    images here are smooth synthetic ones, not the benchmark's: the failure is the model's."""
    model = SSBSN.load(FAILED)
    assert model.pd_layout == "mosaic" and model.pd_train == 3
    src = ArraySource(_noisy_images(n=2, size=240, sigma=10.0, seed=3), ["a", "b"])
    whole = check_training(model, src, 3, 42)
    assert whole.size == 240 and not whole.ok
    small = ArraySource(_noisy_images(n=4, size=42, sigma=10.0, seed=3), list("abcd"))
    crops = check_training(model, small, 3, 42)
    assert crops.size == 42 and max(crops.ratio) < min(whole.ratio)


def test_cli_train_prints_the_check_and_a_failed_one_on_stderr(tmp_path, capsys):
    from ssbsn.cli import main
    from ssbsn.images import write_image
    (tmp_path / "imgs").mkdir()
    for i, img in enumerate(_noisy_images(n=2, size=48)):
        write_image(tmp_path / "imgs" / f"{i}.png", img)
    args = ["train", str(tmp_path / "imgs"), "--channels", "8", "--modules", "1",
            "--ss-blocks", "0", "--pd-train", "3", "--pd-pad", "0", "--crop", "24",
            "--batch", "2", "--no-progress"]
    # two steps from a network whose output starts near 0: it has not learned
    assert main([*args, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert "trained 2 steps" in out
    assert err.strip().startswith("ssbsn: warning: training failed") and err.count("\n") == 1
    saved = json.loads((tmp_path / "a" / "check.json").read_text())
    assert saved["ok"] is False and "ssbsn: " + saved["message"] == err.strip()


def test_a_noise_free_flat_image_is_judged_without_dividing_by_zero():
    from ssbsn.health import TrainingCheck
    exact = TrainingCheck(network=[0.0, 0.0, 0.0], neighbours=[0.0, 0.0, 0.0], stride=2,
                          crops=1, size=8)
    assert exact.ok and exact.ratio == [0.0, 0.0, 0.0]
    worse = TrainingCheck(network=[0.5, 0.0, 0.0], neighbours=[0.0, 0.0, 0.0], stride=2,
                          crops=1, size=8)
    assert not worse.ok and json.loads(json.dumps(worse.to_dict(), allow_nan=False))["ratio"] == [
        None, 0.0, 0.0]
