"""The blend of the blind-spot estimate with the noisy pixel
(ssbsn.restore.blend.noisy_pixel_blend), judged on synthetic images whose noise and estimation
error are known (the oracle)."""
import numpy as np
import pytest
import torch

from ssbsn.restore.blend import blend_variances, noisy_pixel_blend

A, B = 4e-3, 1e-4  # noise variance a·x + b on a 0..1 image


def scene(seed=0, H=128, W=128, texture=0.15, lost=0.8):
    """(clean, estimate, noisy, true noise variance, true error variance of the estimate).

    clean: a brightness ramp (0.2 → 0.8 left to right); its lower half carries a fine texture
    of amplitude ``texture``. The estimate is the clean image with ``lost`` of the texture
    missing (what a blind spot loses); the noise is Gaussian with variance a·clean + b."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0.2, 0.8, W, dtype=torch.float64).expand(H, W)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    tex = texture * torch.sin(2.1 * xx + 0.7 * yy) * torch.cos(1.3 * yy) * (yy >= H // 2)
    clean = (ramp + tex)[None, None].repeat(1, 3, 1, 1)
    estimate = clean - lost * tex[None, None]
    noise_var = A * clean + B
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=torch.float64) * noise_var.sqrt()
    err_var = (lost * tex[None, None]).expand_as(clean) ** 2
    return clean, estimate, noisy, noise_var, err_var


def mse(a, b):
    return float(((a - b) ** 2).mean())


def test_fitted_noise_variance_matches_the_true_one():
    clean, est, noisy, noise_var, _ = scene()
    got, _ = blend_variances(noisy, est)
    flat = slice(0, 64)  # the untextured half: the fit must find a·x + b there
    rel = (got[..., flat, :] - noise_var[..., flat, :]).abs() / noise_var[..., flat, :]
    assert float(rel.mean()) < 0.12, float(rel.mean())


def test_blend_beats_the_estimate_and_the_noisy_image_and_nears_the_oracle():
    for seed in range(3):
        clean, est, noisy, noise_var, err_var = scene(seed)
        out = noisy_pixel_blend(noisy, est)
        # the oracle: the posterior mean given the true noise variance of each pixel and the
        # true error variance of each region (zero in the flat half, its mean in the textured)
        region = err_var.clone()
        region[..., 64:, :] = err_var[..., 64:, :].mean()
        w = region / (region + noise_var)
        oracle = est + w * (noisy - est)
        e_out, e_est, e_noisy, e_oracle = (mse(v, clean) for v in (out, est, noisy, oracle))
        assert e_out < 0.4 * min(e_est, e_noisy), (e_out, e_est, e_noisy)
        assert e_out < 1.05 * e_oracle, (e_out, e_oracle)


def test_flat_regions_keep_the_estimate():
    """No texture, a perfect estimate: the noisy pixel must not come back (w ≈ 0)."""
    clean, est, noisy, _, _ = scene(texture=0.0)
    out = noisy_pixel_blend(noisy, est)
    assert mse(out, clean) < 0.05 * mse(noisy, clean)


def test_blend_is_scale_free_and_per_image():
    # a smooth random field over the scene, as in a photo (exact ties in texture, as in a
    # perfect ramp, may fall either side of a bin edge after rounding)
    field = torch.nn.functional.avg_pool2d(
        torch.rand(1, 3, 132, 132, generator=torch.Generator().manual_seed(5),
                   dtype=torch.float64), 5, 1) * 0.2
    clean, est, noisy, _, _ = scene(1)
    est, noisy = est + field, noisy + field
    out = noisy_pixel_blend(noisy, est)
    torch.testing.assert_close(noisy_pixel_blend(255 * noisy, 255 * est), 255 * out)
    # a batch is blended image by image: the second image does not change the first's result
    other = scene(2, texture=0.0)
    both = noisy_pixel_blend(torch.cat([noisy, other[2]]), torch.cat([est, other[1]]))
    torch.testing.assert_close(both[:1], out)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 2, 5), (2, 3, 9, 7)])
def test_tiny_and_constant_images(shape):
    x = torch.full(shape, 0.5)
    assert torch.equal(noisy_pixel_blend(x, x), x)  # nothing to blend: unchanged, no NaN
    y = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = noisy_pixel_blend(y, x)
    assert torch.isfinite(out).all()
    # a convex combination of the two, pixel by pixel
    lo, hi = torch.minimum(x, y), torch.maximum(x, y)
    assert bool(((out >= lo - 1e-6) & (out <= hi + 1e-6)).all())


def _box(t, r):
    return torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(t, (r, r, r, r), mode="reflect"), 2 * r + 1, stride=1)


def leaky_scene(seed):
    """(clean, estimate, reference, noisy) of a smooth photo with demosaicking-like noise: each
    pixel's noise spreads to its 8 neighbours, and the estimate, which sees those neighbours,
    carries part of the pixel's own noise (the leak). The reference's error is independent
    of the noise (a blind spot wide enough to cover the spread)."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.linspace(60, 190, 128, dtype=torch.float64).expand(128, 128)[None, None]
    clean = clean.repeat(1, 3, 1, 1)
    w = torch.randn(clean.shape, generator=g, dtype=torch.float64)
    noise = 10 * (w + 0.5 * (9 * _box(w, 1) - w))
    neighbours = (9 * _box(noise, 1) - noise) / 8
    est = clean + 0.3 * neighbours + torch.randn(clean.shape, generator=g, dtype=torch.float64)
    ref = clean + 1.5 * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return clean, est, ref, clean + noise


def test_reference_texture_keeps_noise_out_of_a_smooth_photo():
    """Keyed on its own texture, the blend of a leaky estimate brings the noise back (its
    texture is highest where the pixel's own noise is largest); keyed on an independent
    reference's texture, it keeps the estimate."""
    for seed in range(3):
        clean, est, ref, noisy = leaky_scene(seed)
        e_est = mse(est, clean)
        e_own = mse(noisy_pixel_blend(noisy, est), clean)
        e_ref = mse(noisy_pixel_blend(noisy, est, ref), clean)
        assert e_own > 3 * e_est, (e_own, e_est)
        assert e_ref < 1.25 * e_est, (e_ref, e_est)
    # the estimate as its own reference is the default; a reference of another shape is refused
    torch.testing.assert_close(noisy_pixel_blend(noisy, est, est), noisy_pixel_blend(noisy, est))
    with pytest.raises(ValueError, match="reference has shape"):
        noisy_pixel_blend(noisy, est, ref[..., :64])


def star_scene(seed=0, H=128, W=128, stars=8, amplitude=0.5):
    """A dark, flat sky with small bright stars (2×2 pixels) that the estimate misses and its
    reference, blind to them too, finds flat: only the residual says where they are."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.full((1, 3, H, W), 0.1, dtype=torch.float64)
    ys = torch.randint(2, H - 4, (stars,), generator=g)
    xs = torch.randint(2, W - 4, (stars,), generator=g)
    for y, x in zip(ys.tolist(), xs.tolist()):
        clean[..., y:y + 2, x:x + 2] += amplitude
    estimate = torch.full_like(clean, 0.1)
    noise_var = A * clean + B
    noisy = clean + torch.randn(clean.shape, generator=g, dtype=torch.float64) * noise_var.sqrt()
    return clean, estimate, noisy, noise_var, (clean - estimate) ** 2


def test_stars_the_estimate_missed_come_back_and_the_sky_stays():
    for seed in range(3):
        clean, est, noisy, noise_var, err_var = star_scene(seed)
        out = noisy_pixel_blend(noisy, est, est)
        star = err_var > 0
        oracle = est + err_var / (err_var + noise_var) * (noisy - est)
        # the stars: nearly the noisy pixel's error (the oracle's), not the estimate's
        e_star = mse(out[star], clean[star])
        assert e_star < 2 * mse(oracle[star], clean[star]), e_star
        assert e_star < 0.02 * mse(est[star], clean[star]), e_star
        # the sky: almost all of it keeps the estimate; overall far better than either input
        _, prior = blend_variances(noisy, est, est)
        assert float((prior[~star] > 0).double().mean()) < 0.05
        assert mse(out, clean) < 0.1 * min(mse(est, clean), mse(noisy, clean))
