"""Synthetic noise: statistics against closed forms and against AWGN."""
import numpy as np
import pytest
from scipy import ndimage

from ssbsn import noise


def _flat(level, shape=(64, 64, 3)):
    return np.full(shape, level, dtype=np.float64)


def _neighbour_corr(r):
    """Correlation of horizontally adjacent noise samples (per channel, averaged)."""
    r = r - r.mean(axis=(0, 1))
    return float(np.mean(r[:, :-1] * r[:, 1:]) / np.mean(r * r))


def test_awgn_sigma_and_whiteness():
    img = _flat(0.5, (256, 256, 3))
    n = noise.awgn(img, 0.1, rng=1) - img
    assert abs(n.std() - 0.1) < 0.002
    assert abs(_neighbour_corr(n)) < 0.02


def test_poisson_gaussian_variance_matches_shot_read_model():
    shot, read = 0.01, 1e-4
    for level in (0.05, 0.3, 0.8):
        img = _flat(level, (200, 200, 3))
        var = (noise.poisson_gaussian(img, shot, read, rng=2) - img).var()
        expected = shot * level + read
        assert abs(var / expected - 1) < 0.03, (level, var, expected)


def test_random_noise_levels_follow_the_log_linear_fit():
    rng = np.random.default_rng(3)
    draws = np.array([noise.random_noise_levels(rng) for _ in range(2000)])
    shot, read = np.log(draws[:, 0]), np.log(draws[:, 1])
    assert shot.min() >= np.log(1e-4) and shot.max() <= np.log(1.2e-2)
    slope, intercept = np.polyfit(shot, read, 1)
    assert abs(slope - 2.18) < 0.05 and abs(intercept - 1.20) < 0.3
    assert abs(np.std(read - (2.18 * shot + 1.20)) - 0.26) < 0.03


def test_tone_and_gamma_inverses():
    x = np.linspace(0, 1, 1001)
    np.testing.assert_allclose(noise.smoothstep(noise.inverse_smoothstep(x)), x, atol=1e-12)
    np.testing.assert_allclose(noise.gamma_compression(noise.gamma_expansion(x[1:])), x[1:],
                               rtol=1e-12)


def test_bilinear_demosaic_reproduces_constant_and_linear_colours():
    h, w = 16, 20
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # a linear ramp per channel: bilinear interpolation is exact away from the border
    img = np.stack([0.1 + 0.01 * yy, 0.2 + 0.02 * xx, 0.3 + 0.005 * (xx + yy)], axis=-1)
    out = noise.demosaic_bilinear(noise.mosaic(img))
    np.testing.assert_allclose(out[2:-2, 2:-2], img[2:-2, 2:-2], atol=1e-12)
    flat = _flat(0.37, (9, 11, 3)) * np.array([1.0, 0.5, 0.25])
    np.testing.assert_allclose(noise.demosaic_bilinear(noise.mosaic(flat)), flat, atol=1e-12)


def test_mosaic_is_rggb():
    img = np.stack([np.full((4, 4), v) for v in (1.0, 2.0, 3.0)], axis=-1)
    np.testing.assert_array_equal(noise.mosaic(img)[:2, :2], [[1, 2], [2, 3]])


def test_pipeline_without_noise_is_nearly_identity_on_smooth_images():
    from skimage import data
    img = ndimage.gaussian_filter(data.astronaut()[:128, :128] / 255.0, sigma=(3, 3, 0))
    img = np.clip(img, 0.02, 0.85)  # away from the highlight roll-off
    cam = noise.random_camera(4)
    out, params = noise.camera_noise(img, rng=5, shot=0.0, read=0.0, cam=cam)
    assert params["shot"] == 0.0
    err = np.abs(out - img)[2:-2, 2:-2]
    assert err.mean() < 0.002 and err.max() < 0.03, (err.mean(), err.max())
    # a constant colour goes through every stage exactly (demosaicking included)
    flat = _flat(0.4, (16, 16, 3)) * np.array([1.0, 0.8, 0.6])
    out, _ = noise.camera_noise(flat, rng=5, shot=0.0, read=0.0, cam=cam)
    np.testing.assert_allclose(out, flat, atol=1e-9)


def test_camera_noise_is_signal_dependent_and_spatially_correlated():
    cam = noise.random_camera(6)
    stds, corrs = [], []
    for level in (0.08, 0.5):
        img = _flat(level, (128, 128, 3))
        clean, _ = noise.camera_noise(img, rng=7, shot=0.0, read=0.0, cam=cam)
        noisy, _ = noise.camera_noise(img, rng=7, shot=0.004, cam=cam)
        r = (noisy - clean)[4:-4, 4:-4]
        stds.append(r.std())
        corrs.append(_neighbour_corr(r))
    # signal dependence: the same raw noise model gives clearly different sRGB noise levels
    assert max(stds) / min(stds) > 1.3, stds
    # demosaicking correlates neighbours; AWGN does not (≈ 0, tested above)
    assert min(corrs) > 0.3, corrs
    # in raw, the variance grows with the signal as shot·x + read
    raw_var = [(noise.poisson_gaussian(_flat(v, (128, 128)), 0.004, 1e-5, rng=8) - v).var()
               for v in (0.05, 0.5)]
    assert raw_var[1] > 5 * raw_var[0]


def test_camera_noise_reproducible_with_seed():
    img = np.random.default_rng(0).random((24, 30, 3))
    a, pa = noise.camera_noise(img, rng=11)
    b, pb = noise.camera_noise(img, rng=np.random.default_rng(11))
    c, _ = noise.camera_noise(img, rng=12)
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert not np.array_equal(a, c)
    assert a.shape == img.shape and a.min() >= 0 and a.max() <= 1


def test_add_camera_noise_uint8_and_grey():
    img = (np.random.default_rng(1).random((20, 20)) * 255).astype(np.uint8)
    out = noise.add_camera_noise(img, rng=2, shot=0.002)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert not np.array_equal(out, img)


def test_camera_noise_rejects_bad_shape():
    with pytest.raises(ValueError):
        noise.camera_noise(np.zeros((4, 4, 2)), rng=0)
