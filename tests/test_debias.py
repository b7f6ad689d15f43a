"""The tone-curve debias (ssbsn.restore.debias), judged against Monte Carlo draws of the noise
model and against the project's camera pipeline, whose clean rendering is known."""
import numpy as np
import pytest
import torch

from ssbsn.restore.debias import clean_levels, inverse_tone, raw_clip_bias, tone, tone_curve_debias
from ssbsn.noise import Camera, camera_noise, random_camera


def test_tone_curve_is_the_camera_pipelines():
    u = np.linspace(0.0, 1.0, 101)
    from ssbsn.noise import gamma_compression, smoothstep
    np.testing.assert_allclose(tone(u), smoothstep(gamma_compression(u)))
    np.testing.assert_allclose(tone(inverse_tone(np.linspace(0.01, 0.99, 50))),
                               np.linspace(0.01, 0.99, 50), atol=1e-9)


@pytest.mark.parametrize("s", [0.03, 0.06, 0.12])
def test_clean_levels_invert_monte_carlo_moments(s):
    """Noisy means and variances drawn by Monte Carlo (not by the module's quadrature) map back
    to the clean levels they came from."""
    rng = np.random.default_rng(0)
    clean = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
    eps = rng.standard_normal((clean.size, 400_000))
    y = tone(np.clip(inverse_tone(clean)[:, None] + s * eps, 0.0, 1.0))
    mean, var = y.mean(1), y.var(1)
    got = clean_levels(mean, var)
    # the noisy mean is off by up to several grey levels; the recovered level by a fraction of one
    assert np.abs(mean - clean).max() * 255 > 0.8
    np.testing.assert_allclose(got * 255, clean * 255, atol=0.25)


def test_raw_clip_bias_is_the_mean_of_the_clipped_gaussian():
    rng = np.random.default_rng(1)
    u, s = np.array([-0.02, 0.0, 0.01, 0.05, 0.3]), np.array([0.03, 0.02, 0.04, 0.01, 0.05])
    draws = np.maximum(u[:, None] + s[:, None] * rng.standard_normal((u.size, 1_000_000)), 0)
    np.testing.assert_allclose(raw_clip_bias(u, s), draws.mean(1) - u, atol=1e-4)
    assert raw_clip_bias(np.array([0.5]), np.array([0.0]))[0] == 0.0


def test_clean_levels_with_raw_clip_invert_monte_carlo_moments():
    """The same with the raw clip: the mean of clip(u + s·ε) feeds the final noise (κ = 1)."""
    rng = np.random.default_rng(2)
    clean, s = np.array([0.03, 0.08, 0.2, 0.5]), 0.02
    u = inverse_tone(clean)
    z = np.maximum(u[:, None] + s * rng.standard_normal((clean.size, 400_000)), 0).mean(1)
    y = tone(np.clip(z[:, None] + s * rng.standard_normal((clean.size, 400_000)), 0.0, 1.0))
    mean, var = y.mean(1), y.var(1)
    np.testing.assert_allclose(clean_levels(mean, var, kappa=1.0) * 255, clean * 255, atol=0.3)
    assert np.abs(clean_levels(mean, var) - clean).max() * 255 > 2  # without the term: off


def test_raw_clip_term_corrects_the_darkest_tones_of_random_cameras():
    """Flat dark colours through random cameras of the project's pipeline (not those the
    constants were fitted on): the mean of many noisy renderings, debiased, is closer to the
    clean rendering in red and blue with the raw-clip term than without it."""
    rng = np.random.default_rng(12345)
    t = lambda v: torch.from_numpy(255 * v.transpose(2, 0, 1).copy())[None]  # noqa: E731
    errors = {True: [], False: []}
    for _ in range(4):
        cam = random_camera(rng)
        xx = np.linspace(0.0, 1.0, 64)[None, :, None]
        photo = np.broadcast_to(0.02 + 0.2 * xx * rng.uniform(0.5, 1.0, 3), (64, 64, 3))
        clean, _ = camera_noise(photo, rng, shot=0.0, read=0.0, cam=cam)
        draws = [camera_noise(photo, rng, shot=1e-2, cam=cam)[0] for _ in range(48)]
        est, noisy = t(np.mean(draws, 0)), t(draws[0])
        for on in (True, False):
            out = tone_curve_debias(noisy, est, est, raw_clip=None if on else (0, 0, 0))
            errors[on].append((out - t(clean))[..., 8:-8, 8:-8].mean(dim=(-2, -1))[0].numpy())
    on, off = np.abs(errors[True]), np.abs(errors[False])
    assert off[:, [0, 2]].mean() > 3.0 and on[:, [0, 2]].mean() < 0.5 * off[:, [0, 2]].mean(), (
        on, off)
    assert on[:, 1].mean() < off[:, 1].mean() + 0.25  # green takes no raw-clip term


def test_no_noise_no_correction():
    est = torch.linspace(5, 250, 64 * 64, dtype=torch.float64).view(1, 1, 64, 64).repeat(1, 3, 1, 1)
    torch.testing.assert_close(tone_curve_debias(est, est, est), est, atol=1e-3, rtol=0)


def ramp_scene(seed=0, n=256, a=8e-3, b=5e-4):
    """(clean, the exact conditional mean, noisy) of a smooth sRGB ramp 0.05..0.95 whose linear
    values carry Gaussian noise of variance a·u + b before the clip and the tone curve; the
    'estimate' is the mean over 512 draws (a perfect denoiser of the noisy-target kind)."""
    rng = np.random.default_rng(seed)
    c = np.linspace(0.05, 0.95, n)[None, :].repeat(n, 0)
    u = inverse_tone(c)
    sd = np.sqrt(a * u + b)
    draw = lambda: tone(np.clip(u + sd * rng.standard_normal(u.shape), 0.0, 1.0))  # noqa: E731
    mean = np.mean([draw() for _ in range(512)], axis=0)
    t = lambda v: torch.from_numpy(255 * v)[None, None].repeat(1, 3, 1, 1)  # noqa: E731
    return t(c), t(mean), t(draw())


NO_RAW_CLIP = (0.0, 0.0, 0.0)  # the ramp's noise is clipped once, after it is added


def test_debias_recovers_the_clean_brightness_of_a_noisy_target_estimate():
    clean, est, noisy = ramp_scene()
    out = tone_curve_debias(noisy, est, est, raw_clip=NO_RAW_CLIP)
    before, after = float((est - clean).mean()), float((out - clean).mean())
    assert abs(before) > 1.0 and abs(after) < 0.25 * abs(before), (before, after)
    mse = lambda v: float(((v - clean) ** 2).mean())  # noqa: E731
    assert mse(out) < 0.5 * mse(est), (mse(est), mse(out))  # the rest: 512 draws


def test_debias_is_scale_aware_and_per_image():
    clean, est, noisy = ramp_scene()
    out = tone_curve_debias(noisy, est, est)
    scaled = tone_curve_debias(noisy / 255, est / 255, est / 255, white=1.0)
    torch.testing.assert_close(scaled * 255, out)
    _, est2, noisy2 = ramp_scene(seed=1, a=2e-2)
    both = tone_curve_debias(torch.cat([noisy, noisy2]), torch.cat([est, est2]),
                             torch.cat([est, est2]))
    torch.testing.assert_close(both[:1], out)
    grey = tone_curve_debias(noisy[:, :1], est[:, :1], est[:, :1])  # one channel: no raw clip
    torch.testing.assert_close(grey, tone_curve_debias(noisy, est, est, raw_clip=NO_RAW_CLIP)[:, :1])
    assert (out[:, 0] - grey[:, 0]).abs().max() > 0.5  # RGB red: the raw clip's term


def test_debias_moves_the_camera_pipelines_mean_towards_the_clean_rendering():
    """The project's camera pipeline (noise in raw, demosaic, colour matrix, clip, tone curve):
    the mean of many noisy renderings is several grey levels darker than the clean rendering in
    the mid-tones; the debias takes most of that out."""
    rng = np.random.default_rng(0)
    cam = Camera(np.eye(3), 1.25, 2.1, 1.7)
    yy, xx = np.mgrid[0:96, 0:96] / 95.0
    photo = np.stack([0.3 + 0.5 * xx, 0.35 + 0.4 * yy, 0.6 - 0.3 * xx], -1)
    clean, _ = camera_noise(photo, rng, shot=0.0, read=0.0, cam=cam)
    draws = [camera_noise(photo, rng, shot=1e-2, cam=cam)[0] for _ in range(96)]
    t = lambda v: torch.from_numpy(255 * v.transpose(2, 0, 1).copy())[None]  # noqa: E731
    clean, est, noisy = t(clean), t(np.mean(draws, 0)), t(draws[0])
    out = tone_curve_debias(noisy, est, est)
    core = (..., slice(8, -8), slice(8, -8))  # the demosaic's mirrored border aside
    before = (est - clean)[core].mean(dim=(-2, -1)).abs()
    after = (out - clean)[core].mean(dim=(-2, -1)).abs()
    assert float(before.min()) > 0.8 and bool((after < 0.25 * before).all()), (before, after)


def test_denoise_debiases_the_blended_output_keyed_on_the_estimate():
    """SSBSN.denoise(blend=True, debias=True) is the blend of the estimate (its error variance
    keyed on the training stride's estimate), corrected by the estimate's levels with the noise
    read at the training stride (the order docs/model.md gives: steps 7, then 9)."""
    from ssbsn import SSBSN
    from ssbsn.restore import Pipeline
    from ssbsn.restore.blend import noisy_pixel_blend
    from ssbsn.restore.estimate import network_estimate
    from ssbsn.restore.lowpass import restore_low_frequencies
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_test=2).eval()
    with torch.no_grad():  # outputs around mid-grey
        model.bsn.tail[-1].bias.fill_(128.0)
    _, _, noisy = ramp_scene(n=48)
    x = noisy.float()
    kw = dict(r3=False, shifts=True, lowpass=4.0)
    est = model.denoise(x, blend=False, debias=False, **kw)
    # the blend's reference: the estimate at the training stride over its Latin square of
    # shifts (tests/test_restore.py checks that square against the model's forward)
    cfg = Pipeline(model).settings(blend=False, debias=False, pd=model.pd_train, **kw)
    with torch.no_grad():
        ref = restore_low_frequencies(x, network_estimate(model, x, model.pd_train, cfg,
                                                          latin=True), kw["lowpass"])
    want = tone_curve_debias(x, est, noisy_pixel_blend(x, est, ref), lag=model.pd_train)
    got = model.denoise(x, blend=True, debias=True, **kw)
    torch.testing.assert_close(got, want)
    assert (got - model.denoise(x, blend=True, debias=False, **kw)).abs().max() > 0.5


CORE = (..., slice(8, -8), slice(8, -8))  # the demosaic's mirrored border aside


def _rgb(v):
    """(H, W, 3) in 0..1 → (1, 3, H, W) in 0..255."""
    return torch.from_numpy(255 * v.transpose(2, 0, 1).copy())[None]


def _dark_ramps(count=3):
    """Dark colour ramps through random cameras of the project's pipeline at shot 1e-2:
    (clean rendering, one noisy rendering, the mean and the variance of 48 renderings, and an
    estimate that carries 30 % of the noisy pixel's own noise, as an estimate at PD 2 does
    where demosaicking spread the noise), all (1, 3, 64, 64) in 0..255."""
    rng = np.random.default_rng(7)
    for _ in range(count):
        cam = random_camera(rng)
        xx = np.linspace(0.0, 1.0, 64)[None, :, None]
        photo = np.broadcast_to(0.02 + 0.2 * xx * rng.uniform(0.5, 1.0, 3), (64, 64, 3))
        clean, _ = camera_noise(photo, rng, shot=0.0, read=0.0, cam=cam)
        draws = np.stack([camera_noise(photo, rng, shot=1e-2, cam=cam)[0] for _ in range(48)])
        mean, noisy = _rgb(draws.mean(0)), _rgb(draws[0])
        var = 255 * _rgb(draws.var(0, ddof=1))  # in 0..255 units, as _rgb scales by 255
        yield _rgb(clean), noisy, mean, var, mean + 0.3 * (noisy - mean)


def test_the_lag_curve_and_a_known_variance_take_the_place_of_the_residual_curve():
    """Dark ramps through random cameras and an estimate that carries a share of each pixel's
    own noise: the residual then understates the noise, and the curve fitted on it
    (``lag=None``), so the raw-clip term is too weak. The noisy image's own second differences
    at lag 3, beyond the bilinear demosaic's reach (the default), and the true variance of the
    renderings (Monte Carlo) given as ``noise_var``, both read the noise nearer its true level
    and bring the debiased red and blue back towards the clean rendering."""
    from ssbsn.restore.lowpass import gaussian_lowpass
    from ssbsn.restore.stats import lag_noise_curves, noise_curves, variance_curves
    err = {"residual": [], "lag": [], "known": []}
    for clean, noisy, mean, var, leaky in _dark_ramps():
        key = gaussian_lowpass(leaky.double(), 2.0)
        known = variance_curves(key, var)[0]
        for c in range(3):
            residual = noise_curves(noisy, leaky, key=key)[0][c][1].mean()
            lag = lag_noise_curves(noisy, leaky, 3, key=key)[0][c][1].mean()
            assert residual < 0.5 * known[c][1].mean(), (c, residual, known[c][1].mean())
            assert 1.5 * residual < lag < 1.25 * known[c][1].mean(), (c, residual, lag, known[c])
        for kind, kw in (("residual", dict(lag=None)), ("lag", {}), ("known", dict(noise_var=var))):
            out = tone_curve_debias(noisy, leaky, mean, **kw)
            err[kind].append((out - clean)[CORE].mean(dim=(-2, -1))[0, [0, 2]].abs().numpy())
    residual, lag, known = (np.mean(err[k]) for k in ("residual", "lag", "known"))
    assert known < 0.6 * residual and lag < 0.8 * residual, (residual, lag, known)
    with pytest.raises(ValueError, match="noise variance has shape"):
        tone_curve_debias(noisy, leaky, mean, noise_var=var[..., :-1])


def test_the_correction_is_keyed_on_the_local_brightness(monkeypatch):
    """The same dark ramps, told the true variance: keyed on the estimate smoothed over a few
    pixels (the default), the debiased mean lands closer to the clean rendering, on average and
    pixel by pixel, than keyed on the estimate itself, whose leftover noise then sorts the
    pixels into the intensity bins (a σ of 1e-3 pixels leaves the estimate as it is)."""
    import ssbsn.restore.debias as debias
    shift, rmse = {}, {}
    for clean, noisy, mean, var, leaky in _dark_ramps():
        for blur in (debias.KEY_BLUR, 1e-3):
            monkeypatch.setattr(debias, "KEY_BLUR", blur)
            err = (tone_curve_debias(noisy, leaky, mean, noise_var=var) - clean)[CORE]
            shift.setdefault(blur, []).append(err.mean(dim=(-2, -1)).abs().mean().item())
            rmse.setdefault(blur, []).append(err.pow(2).mean().sqrt().item())
    smooth, raw = sorted(shift, reverse=True)
    assert np.mean(shift[smooth]) < 0.7 * np.mean(shift[raw]), shift
    assert np.mean(rmse[smooth]) < 0.8 * np.mean(rmse[raw]), rmse


def test_lag_noise_curves_read_white_noise_and_fall_back_on_tiny_images():
    """On white Gaussian noise of known σ over a ramp, the second differences read σ² at every
    level (any lag: white noise is independent at every distance); an image with no pixel
    farther than the lag from the border takes the residual curve; a bad lag or key is one
    ValueError."""
    from ssbsn.restore.stats import lag_noise_curves, noise_curves
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(40.0, 200.0, 96, dtype=torch.float64).expand(1, 2, 96, 96)
    sigma = torch.tensor([4.0, 9.0], dtype=torch.float64).view(1, 2, 1, 1)
    noisy = ramp + sigma * torch.randn(ramp.shape, generator=g, dtype=torch.float64)
    for lag in (1, 3):
        for c, (level, var) in enumerate(lag_noise_curves(noisy, ramp, lag)[0]):
            assert len(level) == 16  # about 250 pixels a bin: each within 30 %, all within 6 %
            np.testing.assert_allclose(var.numpy(), sigma.flatten()[c].item() ** 2, rtol=0.3)
            np.testing.assert_allclose(var.mean().item(), sigma.flatten()[c].item() ** 2,
                                       rtol=0.06)
    tiny, est = noisy[..., :6, :6], ramp[..., :6, :6]
    for got, want in zip(lag_noise_curves(tiny, est, 3)[0], noise_curves(tiny, est)[0]):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="lag must be at least 1"):
        lag_noise_curves(noisy, ramp, 0)
    with pytest.raises(ValueError, match="intensity key has shape"):
        lag_noise_curves(noisy, ramp, 3, key=ramp[..., :-1])
