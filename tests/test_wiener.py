"""The collaborative Wiener refinement (ssbsn.wiener), judged against Monte Carlo noise, an
analytic power spectrum, the bm3d package told the true noise spectrum, and clean images."""
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

from ssbsn.errors import UserError
from ssbsn.metrics import psnr
from ssbsn.wiener import Stabiliser, _numpy_trapz, bm3d_wiener, noise_psd

bm3d = pytest.importorskip("bm3d")


def test_stabiliser_gives_unit_noise_and_its_inverse_keeps_the_mean():
    """Monte Carlo draws of a Poisson-Gaussian-like noise: the transform's noise has variance 1
    at every level, and the exact unbiased inverse of the transformed draws' mean gives back
    the level, where the transform's plain inverse would be darker (it is concave)."""
    rng = np.random.default_rng(0)
    levels = np.linspace(5, 250, 16)
    var = 0.4 * levels + 9.0
    s = Stabiliser(levels, var, -60.0, 320.0)
    for v in (4.0, 10.0, 60.0, 128.0, 230.0):
        y = v + np.sqrt(0.4 * max(v, 5.0) + 9.0) * rng.standard_normal(400_000)
        z = s(y)
        assert abs(np.std(z) - 1.0) < 0.03, v
        assert abs(s.inverse(z.mean()) - v) < 0.03, v
        if v >= levels[0]:  # where σ grows with the level, f is concave
            assert np.interp(z.mean(), s._f, s._grid) < v - 0.05  # the plain inverse: low
    v = np.linspace(-50, 310, 101)
    np.testing.assert_allclose(s.inverse(s.mean(v)), v, atol=1e-6)


def _correlated_noise(rng, shape, kernel, sd):
    n = ndimage.convolve(rng.standard_normal(shape), kernel, mode="wrap")
    return sd * n / np.sqrt((kernel ** 2).sum())


KERNEL = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])


def test_noise_psd_matches_the_analytic_spectrum_through_a_mask():
    rng = np.random.default_rng(1)
    H, W = 128, 96
    noise = _correlated_noise(rng, (H, W), KERNEL, 3.0)
    mask = (rng.uniform(size=(H, W)) < 0.5).astype(float)  # half the pixels, scattered
    got = noise_psd(noise, mask)
    k = np.zeros((H, W))
    k[np.ix_(np.arange(-1, 2) % H, np.arange(-1, 2) % W)] = KERNEL
    want = np.abs(np.fft.fft2(k)) ** 2 / (KERNEL ** 2).sum() * 9.0 * H * W
    assert abs(got.mean() / (H * W) - 9.0) < 0.5  # Parseval: the mean is the variance
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.97
    white = noise_psd(3.0 * rng.standard_normal((H, W)), np.ones((H, W)))
    assert white.std() / white.mean() < 0.1  # flat


def _grey_scene(seed=2, sd=12.0):
    rng = np.random.default_rng(seed)
    clean = data.camera()[160:256, 200:296].astype(np.float64)
    noisy = clean + _correlated_noise(rng, clean.shape, KERNEL, sd)
    pilot = ndimage.gaussian_filter(clean, 0.7) + 3.0 * rng.standard_normal(clean.shape)
    t = lambda v: torch.from_numpy(v)[None, None]  # noqa: E731
    return clean, t(noisy), t(pilot)


def test_grey_refinement_matches_bm3d_told_the_true_spectrum():
    """Constant noise: the stabiliser is linear and the measured spectrum close to the true
    one, so the result is close to the bm3d package's own Wiener stage given the true
    spectrum, and well above the pilot."""
    clean, noisy, pilot = _grey_scene()
    ours = bm3d_wiener(noisy, pilot, pilot)[0, 0].numpy()
    H, W = clean.shape
    k = np.zeros((H, W))
    k[np.ix_(np.arange(-1, 2) % H, np.arange(-1, 2) % W)] = KERNEL
    psd = np.abs(np.fft.fft2(k)) ** 2 / (KERNEL ** 2).sum() * 144.0 * H * W
    with _numpy_trapz():  # bm4d 4.2 on numpy 2.4
        oracle = bm3d.bm3d(noisy[0, 0].numpy(), psd, stage_arg=pilot[0, 0].numpy())
    p = lambda v: psnr(np.clip(v, 0, 255), clean)  # noqa: E731
    # measured: pilot 29.86, ours 31.28, the oracle 31.85 dB (the residual that the noise is
    # measured on also holds the pilot's own error, so ours filters a little harder)
    assert p(ours) > p(pilot[0, 0].numpy()) + 1.0, (p(ours), p(pilot[0, 0].numpy()))
    assert p(ours) > p(oracle) - 0.8, (p(ours), p(oracle))


def test_camera_noise_refinement_beats_its_pilot_and_a_white_noise_wiener():
    """RGB through the project's camera pipeline at shot 1e-2 (noise that depends on intensity
    and is correlated across pixels and channels), with a crude blind-spot pilot: the mean of
    the 24 neighbours of each pixel, which never sees the pixel itself. The refinement is
    closer to the clean rendering than the pilot, and than the same Wiener stage run on the
    sRGB channels as they are, told the true σ of the noise as if it were white."""
    from ssbsn.noise import camera_pair
    photo = data.astronaut()[100:196, 100:196]
    noisy8, clean8 = camera_pair(photo, np.random.default_rng(3), 1e-2)
    noisy, clean = noisy8.astype(np.float64), clean8.astype(np.float64)
    ring = np.ones((5, 5))
    ring[2, 2] = 0
    pilot = np.stack([ndimage.convolve(noisy[..., c], ring / ring.sum(), mode="mirror")
                      for c in range(3)], -1)
    t = lambda v: torch.from_numpy(v.transpose(2, 0, 1).copy())[None]  # noqa: E731
    ours = bm3d_wiener(t(noisy), t(pilot), t(pilot))[0].numpy().transpose(1, 2, 0)
    sd = float(np.std(noisy - clean))
    white = np.stack([bm3d.bm3d(noisy[..., c], sd, stage_arg=pilot[..., c]) for c in range(3)],
                     -1)
    p = lambda v: psnr(np.clip(v, 0, 255), clean)  # noqa: E731
    assert p(ours) > p(pilot) + 0.5, (p(ours), p(pilot))  # measured: +0.73 dB
    assert p(ours) > p(white) + 0.4, (p(ours), p(white))  # measured: +0.69 dB


def test_repeatable_scale_free_per_image_and_small_images_pass_through():
    clean, noisy, pilot = _grey_scene()
    out = bm3d_wiener(noisy, pilot, pilot)
    assert torch.equal(bm3d_wiener(noisy, pilot, pilot), out)  # repeatable to the bit
    torch.testing.assert_close(bm3d_wiener(noisy / 255, pilot / 255, pilot / 255), out / 255)
    _, noisy2, pilot2 = _grey_scene(seed=5, sd=20.0)
    both = bm3d_wiener(torch.cat([noisy, noisy2]), torch.cat([pilot, pilot2]),
                       torch.cat([pilot, pilot2]))
    torch.testing.assert_close(both[:1], out)
    small = noisy[..., :12, :40]
    assert bm3d_wiener(small, small, small) is small


def test_noiseless_channels_keep_the_pilot():
    """A constant image, and a grey image in three identical channels (its chroma holds no
    noise to measure): finite results, the constant unchanged, the grey channels equal."""
    c = torch.full((1, 3, 40, 40), 100.0, dtype=torch.float64)
    torch.testing.assert_close(bm3d_wiener(c, c, c), c)
    clean, noisy, pilot = _grey_scene()
    rgb = lambda t: t.expand(1, 3, *t.shape[-2:]).contiguous()  # noqa: E731
    out = bm3d_wiener(rgb(noisy), rgb(pilot), rgb(pilot))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], out[:, 0])
    torch.testing.assert_close(out[:, 2], out[:, 0])
    assert psnr(np.clip(out[0, 0].numpy(), 0, 255), clean) > psnr(pilot[0, 0].numpy(), clean) + 1


def test_missing_bm3d_is_one_clear_error(monkeypatch):
    clean, noisy, pilot = _grey_scene()
    monkeypatch.setitem(sys.modules, "bm3d", None)
    with pytest.raises(UserError, match="needs the bm3d package"):
        bm3d_wiener(noisy, pilot, pilot)


def test_denoise_refines_the_blend_then_debiases():
    """SSBSN.denoise(blend, wiener, debias): the blend is the Wiener stage's pilot, and the
    debias is keyed on the network's estimate, its noise read at the training stride
    (docs/model.md, steps 7 to 9)."""
    from ssbsn import SSBSN
    from ssbsn.debias import tone_curve_debias
    from ssbsn.inference import noisy_pixel_blend
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_test=2).eval()
    with torch.no_grad():  # outputs around mid-grey
        model.bsn.tail[-1].bias.fill_(128.0)
    from ssbsn.noise import camera_pair
    noisy8, _ = camera_pair(data.astronaut()[40:104, 180:244], np.random.default_rng(4), 4e-3)
    x = torch.from_numpy(noisy8.astype(np.float32).transpose(2, 0, 1).copy())[None]
    kw = dict(r3=False, shifts=True, lowpass=4.0)
    est = model.denoise(x, blend=False, wiener=False, debias=False, **kw)
    ref = model.denoise(x, blend=False, wiener=False, debias=False, pd=model.pd_train, **kw)
    want = tone_curve_debias(x, est, bm3d_wiener(x, est, noisy_pixel_blend(x, est, ref)),
                             lag=model.pd_train)
    got = model.denoise(x, blend=True, wiener=True, debias=True, **kw)
    torch.testing.assert_close(got, want)
    assert (got - model.denoise(x, blend=True, wiener=False, debias=True, **kw)).abs().max() > 1
