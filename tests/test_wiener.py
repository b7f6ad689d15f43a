"""The collaborative Wiener refinement (ssbsn.restore.wiener, ssbsn.restore.collaborative),
judged against a
plain-loop implementation of the same filter, Monte Carlo noise, an analytic power spectrum and
clean images; the bm3d package, where it is installed, as an optional cross-check."""
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import data

from ssbsn.metrics import psnr
from ssbsn.restore.collaborative import (MIN_BAND, Params, band_cuts, coefficient_covariances,
                                         coefficient_variances, collaborative_wiener,
                                         dct_matrix, default_bands, group_size, haar_matrix,
                                         kaiser_window, reference_positions)
from ssbsn.restore.wiener import Stabiliser, collaborative_refinement, noise_psd

from memcheck import nan_filled_allocations

pytestmark = pytest.mark.usefixtures("one_thread")  # small images: one thread is fastest


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
    # the transform on its evenly spaced grid is numpy's interpolation, out of range included
    y = np.concatenate([rng.uniform(-200, 500, 10_000), s._grid, [-1e9, 1e9]])
    np.testing.assert_allclose(s(y), np.interp(y, s._grid, s._f), rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.mean(y), np.interp(y, s._grid, s._m), rtol=0, atol=1e-12)


def _correlated_noise(rng, shape, kernel, sd):
    n = ndimage.convolve(rng.standard_normal(shape), kernel, mode="wrap")
    return sd * n / np.sqrt((kernel ** 2).sum())


KERNEL = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]])


def _kernel_psd(H, W, kernel, var):
    """The power spectrum (BM3D's convention) of white noise of unit variance convolved
    circularly with ``kernel``, scaled to variance ``var``."""
    r = kernel.shape[0] // 2
    k = np.zeros((H, W))
    k[np.ix_(np.arange(-r, r + 1) % H, np.arange(-r, r + 1) % W)] = kernel
    return np.abs(np.fft.fft2(k)) ** 2 / (kernel ** 2).sum() * var * H * W


def test_noise_psd_matches_the_analytic_spectrum_through_a_mask():
    rng = np.random.default_rng(1)
    H, W = 128, 96
    noise = _correlated_noise(rng, (H, W), KERNEL, 3.0)
    mask = (rng.uniform(size=(H, W)) < 0.5).astype(float)  # half the pixels, scattered
    got = noise_psd(noise, mask)
    want = _kernel_psd(H, W, KERNEL, 9.0)
    assert abs(got.mean() / (H * W) - 9.0) < 0.5  # Parseval: the mean is the variance
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.97
    white = noise_psd(3.0 * rng.standard_normal((H, W)), np.ones((H, W)))
    assert white.std() / white.mean() < 0.1  # flat
    # the direct lag sums and cosine sums are the zero-padded FFT's autocorrelation and the
    # FFT of its lag window
    size = (2 * H, 2 * W)
    rm, m = np.fft.rfft2(noise * mask, size), np.fft.rfft2(mask, size)
    num, den = np.fft.irfft2(rm * np.conj(rm), size), np.fft.irfft2(m * np.conj(m), size)
    idx = np.arange(-4, 5)
    ac = num[np.ix_(idx % size[0], idx % size[1])] / np.maximum(
        den[np.ix_(idx % size[0], idx % size[1])], 1.0)
    kernel = np.zeros((H, W))
    kernel[np.ix_(idx % H, idx % W)] = ac
    fft = np.maximum(np.real(np.fft.fft2(kernel)), 1e-3 * ac[4, 4]) * H * W
    np.testing.assert_allclose(got, fft, rtol=1e-9, atol=1e-9 * np.abs(fft).max())


def _block_coefficients(img, positions, n=8):
    """The 2-D DCT (D·block·Dᵀ, index [b, a]) of the n×n blocks of img at ``positions``."""
    D = dct_matrix(n)
    return np.stack([D @ img[..., y:y + n, x:x + n] @ D.T for y, x in positions], -3)


def test_coefficient_variances_are_those_of_monte_carlo_noise_and_the_fft_formula():
    """Correlated noise: the variance of each 2-D DCT coefficient is what many draws of the
    noise give, and v = Σ_k psd(k)·|FFT(φ)(k)|² / (H·W)² computed here by FFT."""
    rng = np.random.default_rng(2)
    H, W, n = 48, 40, 8
    kernel = np.array([[0.1, 0.4, 0.2], [0.5, 1.0, -0.3], [0.2, 0.6, 0.1]])
    psd = _kernel_psd(H, W, kernel, 4.0)
    v = coefficient_variances(psd).reshape(n, n).T  # [b, a]
    D = dct_matrix(n)
    for b, a in ((0, 0), (1, 0), (0, 3), (5, 6), (7, 7)):
        phi = np.zeros((H, W))
        phi[:n, :n] = np.outer(D[b], D[a])
        want = (psd * np.abs(np.fft.fft2(phi)) ** 2).sum() / (H * W) ** 2
        assert v[b, a] == pytest.approx(want, rel=1e-10)
    noise = 2.0 * np.stack([ndimage.convolve(rng.standard_normal((H, W)), kernel, mode="wrap")
                            for _ in range(300)]) / np.sqrt((kernel ** 2).sum())
    c = _block_coefficients(noise, [(y, x) for y in range(0, 40, 8) for x in range(0, 32, 8)])
    mc = (c ** 2).mean(axis=(0, 1))
    np.testing.assert_allclose(mc, v, rtol=0.06)
    assert v.max() / v.min() > 10  # far from white: the test means something


def test_coefficient_covariances_between_nearby_blocks_are_those_of_monte_carlo_noise():
    """The covariance of the same coefficient of two blocks offset by δ (they overlap, or lie
    within the noise's correlation) is what the draws give; zero beyond reach; the variance
    of the mean of a group of overlapping blocks is the mean of the covariances over its pairs
    of blocks, far above v / K."""
    rng = np.random.default_rng(3)
    H, W, n = 40, 40, 8
    psd = _kernel_psd(H, W, KERNEL, 1.0)
    cov = coefficient_covariances(psd)
    L = (cov.shape[0] - 1) // 2
    assert L == n + 3
    noise = np.stack([_correlated_noise(rng, (H, W), KERNEL, 1.0) for _ in range(4000)])
    v = cov[L, L].reshape(n, n).T
    tol = 4 * v * np.sqrt(2 / noise.shape[0])  # four standard errors of a mean of products
    base = (10, 12)
    c0 = _block_coefficients(noise, [base])[:, 0]
    for dy, dx in ((0, 1), (2, -3), (-5, 4), (7, 7), (9, 0), (0, -10)):
        c1 = _block_coefficients(noise, [(base[0] + dy, base[1] + dx)])[:, 0]
        mc = (c0 * c1).mean(0)
        want = cov[dy + L, dx + L].reshape(n, n).T
        assert (np.abs(mc - want) <= tol).all(), (dy, dx)
        if max(abs(dy), abs(dx)) > L - 2:  # about out of the noise's reach
            assert np.abs(want).max() < 0.02 * v.max()
    # the pairs of a group of overlapping blocks: the variance of their mean
    group = [(10, 12), (11, 12), (10, 14), (13, 11), (9, 9), (12, 16), (10, 13), (14, 14)]
    cg = _block_coefficients(noise, group)
    mean = cg.mean(1)
    want = sum(cov[yb - ya + L, xb - xa + L] for ya, xa in group for yb, xb in group)
    want = want.reshape(n, n).T / len(group) ** 2
    np.testing.assert_allclose(mean.var(0), want, rtol=0.1)
    assert want[0, 0] > 3 * v[0, 0] / len(group)


# ------------------------------------------------------------------ the filter, by plain loops

def loop_wiener(z, p, cov, params, guide=None):
    """The collaborative Wiener filter by plain loops over reference blocks, candidates, blocks
    and channels, with matrices for the transforms (float64 numpy): the definition that
    ssbsn.restore.collaborative vectorises."""
    C, H, W = z.shape
    n, S, R = params.block, params.step, params.radius
    L = (cov.shape[1] - 1) // 2
    hp, wp = H - n + 1, W - n + 1
    K = group_size(params.group, hp, wp, R)
    D, Hk = dct_matrix(n), haar_matrix(K)
    g = p[0] if guide is None else guide
    win = np.outer(kaiser_window(n, params.beta), kaiser_window(n, params.beta))
    num, den = np.zeros((C, H, W)), np.zeros((C, H, W))
    for y in reference_positions(hp, S):
        for x in reference_positions(wp, S):
            ref = g[y:y + n, x:x + n]
            cands = []
            for yy in range(max(0, y - R), min(hp - 1, y + R) + 1):
                for xx in range(max(0, x - R), min(wp - 1, x + R) + 1):
                    d = ((g[yy:yy + n, xx:xx + n] - ref) ** 2).sum()
                    cands.append((-1.0 if (yy, xx) == (y, x) else d, yy, xx))
            grp = [(yy, xx) for _, yy, xx in sorted(cands)[:K]]
            for c in range(C):
                v = np.broadcast_to(cov[c, L, L].reshape(n, n).T, (K, n, n)).copy()
                v[0] = sum(cov[c, yb - ya + L, xb - xa + L].reshape(n, n).T
                           if abs(yb - ya) <= L and abs(xb - xa) <= L else 0.0
                           for ya, xa in grp for yb, xb in grp) / K
                z3 = np.tensordot(Hk, _block_coefficients(z[c], grp), 1)
                p3 = np.tensordot(Hk, _block_coefficients(p[c], grp), 1)
                w3 = p3 ** 2 / (p3 ** 2 + params.mu2 * v)
                weight = 1.0 / (w3 ** 2 * v).sum()
                est = np.tensordot(Hk.T, w3 * z3, 1)
                for j, (yy, xx) in enumerate(grp):
                    num[c, yy:yy + n, xx:xx + n] += weight * win * (D.T @ est[j] @ D)
                    den[c, yy:yy + n, xx:xx + n] += weight * win
    return num / den


def _problem(rng, C, H, W):
    clean = np.cumsum(rng.standard_normal((C, H, W)), 1)
    z = clean + rng.standard_normal((C, H, W))
    p = clean + 0.3 * rng.standard_normal((C, H, W))
    kernel = rng.uniform(size=(5, 5))
    cov = np.stack([coefficient_covariances(_kernel_psd(H, W, kernel, s)) for s in
                    np.linspace(1.0, 0.5, C)])
    return z, p, cov


@pytest.mark.parametrize("H, W, params, piece, more", [
    (24, 21, Params(group=16, radius=16, step=3), 16, True),          # exhaustive search
    (24, 21, Params(), 16, False),                                     # the defaults
    (24, 21, Params(group=8, radius=5, step=4, tile=(2, 3), mu2=0.7, beta=1.0), 16, False),
    (45, 17, Params(group=8, radius=4, step=3, tile=(2, 3)), 5, False),  # the ring wraps around
    (19, 30, Params(group=4, radius=3, step=2, tile=(1, 5)), 3, False),
])
def test_vectorised_filter_equals_plain_loops(H, W, params, piece, more):
    rng = np.random.default_rng(H * W)
    z, p, cov = _problem(rng, 2, H, W)
    want = loop_wiener(z, p, cov, params)
    t = torch.from_numpy
    with nan_filled_allocations():  # a pixel or band left unwritten comes out NaN
        got = collaborative_wiener(t(z), t(p), t(cov), params, piece=piece).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
        for bands in (2, 3, 7):  # bands of the image, each from the rows it needs: the same bits
            banded = collaborative_wiener(t(z), t(p), t(cov), params, piece=piece, bands=bands)
            assert np.array_equal(banded.numpy(), got), bands
    if not more:
        return
    guide = rng.standard_normal((H, W))  # the groups from another image
    want = loop_wiener(z, p, cov, params, guide)
    got = collaborative_wiener(t(z), t(p), t(cov), params, guide=t(guide), piece=piece).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    # variances alone: blocks taken as uncorrelated (the covariance table reduced to δ = 0)
    L = (cov.shape[1] - 1) // 2
    only = np.zeros_like(cov)
    only[:, L, L] = cov[:, L, L]
    want = loop_wiener(z, p, only, params)
    got = collaborative_wiener(t(z), t(p), t(cov[:, L, L].copy()), params, piece=piece).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_bands_and_threads_give_the_same_bits():
    """The filter in bands (band boundaries inside the image, on one worker or on two
    single-threaded ones) and on one or two torch threads: the same output to the bit, float32
    as the refinement runs it, with the groups from the pilot or from a guide; torch's thread
    count is back as it was after the workers, for this thread and for new ones."""
    import threading

    from helpers import torch_threads
    rng = np.random.default_rng(11)
    z, p, cov = _problem(rng, 3, 150, 64)
    guide = rng.standard_normal((150, 64))
    f = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    for g in (None, f(guide)):
        want = collaborative_wiener(f(z), f(p), f(cov), guide=g, bands=1)
        with nan_filled_allocations():  # the bands fill every row of the output
            got = [collaborative_wiener(f(z), f(p), f(cov), guide=g, bands=b, workers=1)
                   for b in (2, 5)]
        with torch_threads(2):
            got += [collaborative_wiener(f(z), f(p), f(cov), guide=g, bands=1),
                    collaborative_wiener(f(z), f(p), f(cov), guide=g, bands=4, workers=2)]
            assert torch.get_num_threads() == 2
            seen = []
            t = threading.Thread(target=lambda: (torch.ones(2).sum(),
                                                 seen.append(torch.get_num_threads())))
            t.start()
            t.join()
            assert seen == [2]
        for k, out in enumerate(got):
            assert torch.equal(out, want), k


def test_default_bands():
    """Bands on the CPU with more than one thread, two per thread of at least MIN_BAND rows
    each, on at most as many workers as threads; one band on one thread or on a GPU."""
    assert default_bands(3000, "cpu", threads=1) == (1, 1)
    assert default_bands(3000, "cpu", threads=2) == (4, 2)
    assert default_bands(2 * MIN_BAND + 5, "cpu", threads=4) == (2, 2)
    assert default_bands(MIN_BAND - 1, "cpu", threads=2) == (1, 1)
    assert default_bands(3000, "cuda", threads=8) == (1, 1)
    assert band_cuts(10, 3) == [0, 3, 6, 10]
    assert band_cuts(2, 5) == [0, 1, 2]


def test_clean_images_come_back():
    """A clean image as its own pilot with almost no noise comes back as it was; with white
    noise of known variance and the clean image as the pilot, the output stays within a
    fraction of the noise of the clean image."""
    rng = np.random.default_rng(5)
    clean = data.camera()[200:264, 220:292].astype(np.float64)[None]
    t = torch.from_numpy
    out = collaborative_wiener(t(clean), t(clean), t(np.full((1, 64), 1e-8)), Params()).numpy()
    np.testing.assert_allclose(out, clean, rtol=0, atol=1e-3)
    sd = 5.0
    var = t(np.full((1, 64), sd * sd))
    out = collaborative_wiener(t(clean), t(clean), var, Params()).numpy()  # no noise after all
    assert np.sqrt(((out - clean) ** 2).mean()) < 0.3 * sd      # measured: 0.23σ
    assert np.abs(out - clean).max() < 2 * sd                     # 1.6σ
    noisy = clean + sd * rng.standard_normal(clean.shape)
    out = collaborative_wiener(t(noisy), t(clean), var, Params()).numpy()
    assert np.sqrt(((out - clean) ** 2).mean()) < 0.5 * sd      # 0.45σ
    assert psnr(out[0], clean[0]) > psnr(noisy[0], clean[0]) + 6  # +6.9 dB


def _grey_scene(seed=2, sd=12.0):
    rng = np.random.default_rng(seed)
    clean = data.camera()[160:256, 200:296].astype(np.float64)
    noisy = clean + _correlated_noise(rng, clean.shape, KERNEL, sd)
    pilot = ndimage.gaussian_filter(clean, 0.7) + 3.0 * rng.standard_normal(clean.shape)
    t = lambda v: torch.from_numpy(v)[None, None]  # noqa: E731
    return clean, t(noisy), t(pilot)


def test_grey_refinement_improves_on_its_pilot():
    """Constant correlated noise: the refinement is well above the pilot (measured: pilot
    29.86, refinement 31.49 dB; the bm3d package's Wiener stage told the true spectrum 31.85),
    and above the same filter told the noise is white (30.52)."""
    clean, noisy, pilot = _grey_scene()
    ours = collaborative_refinement(noisy, pilot, pilot)[0, 0].numpy()
    p = lambda v: psnr(np.clip(v, 0, 255), clean)  # noqa: E731
    assert p(ours) > p(pilot[0, 0].numpy()) + 1.5, (p(ours), p(pilot[0, 0].numpy()))
    white = collaborative_wiener(noisy[0], pilot[0], torch.full((1, 64), 144.0, dtype=noisy.dtype))
    assert p(ours) > p(white[0].numpy()) + 0.2, (p(ours), p(white[0].numpy()))


def test_grey_refinement_is_close_to_bm3d_told_the_true_spectrum():
    """Optional cross-check against the bm3d package (not a dependency) given the true noise
    spectrum: the result is close to its Wiener stage."""
    bm3d = pytest.importorskip("bm3d")
    clean, noisy, pilot = _grey_scene()
    ours = collaborative_refinement(noisy, pilot, pilot)[0, 0].numpy()
    H, W = clean.shape
    psd = _kernel_psd(H, W, KERNEL, 144.0)
    if not hasattr(np, "trapz"):  # bm4d 4.2 calls numpy.trapz, gone from numpy 2.4
        np.trapz = np.trapezoid
    oracle = bm3d.bm3d(noisy[0, 0].numpy(), psd, stage_arg=pilot[0, 0].numpy())
    p = lambda v: psnr(np.clip(v, 0, 255), clean)  # noqa: E731
    assert p(ours) > p(oracle) - 0.5, (p(ours), p(oracle))


def test_camera_noise_refinement_beats_its_pilot_and_a_white_noise_wiener():
    """RGB through the project's camera pipeline at shot 1e-2 (noise that depends on intensity
    and is correlated across pixels and channels), with a crude blind-spot pilot: the mean of
    the 24 neighbours of each pixel, which never sees the pixel itself. The refinement is
    closer to the clean rendering than the pilot, and than the same collaborative filter run on
    the sRGB channels as they are, told the true σ of the noise as if it were white."""
    from ssbsn.noise import camera_pair
    photo = data.astronaut()[100:196, 100:196]
    noisy8, clean8 = camera_pair(photo, np.random.default_rng(3), 1e-2)
    noisy, clean = noisy8.astype(np.float64), clean8.astype(np.float64)
    ring = np.ones((5, 5))
    ring[2, 2] = 0
    pilot = np.stack([ndimage.convolve(noisy[..., c], ring / ring.sum(), mode="mirror")
                      for c in range(3)], -1)
    t = lambda v: torch.from_numpy(v.transpose(2, 0, 1).copy())  # noqa: E731
    ours = collaborative_refinement(t(noisy)[None], t(pilot)[None], t(pilot)[None])[0].numpy()
    ours = ours.transpose(1, 2, 0)
    sd = float(np.std(noisy - clean))
    white = collaborative_wiener(t(noisy), t(pilot), torch.full((3, 64), sd * sd,
                                                                dtype=torch.float64))
    white = white.numpy().transpose(1, 2, 0)
    p = lambda v: psnr(np.clip(v, 0, 255), clean)  # noqa: E731
    assert p(ours) > p(pilot) + 0.5, (p(ours), p(pilot))  # measured: +0.92 dB
    assert p(ours) > p(white) + 0.4, (p(ours), p(white))  # measured: +0.50 dB


def test_repeatable_scale_free_per_image_and_small_images_pass_through():
    from helpers import torch_threads
    clean, noisy, pilot = _grey_scene()
    out = collaborative_refinement(noisy, pilot, pilot)
    assert torch.equal(collaborative_refinement(noisy, pilot, pilot), out)  # repeatable to the bit
    with torch_threads(2):                                      # … on two threads as well
        two = collaborative_refinement(noisy, pilot, pilot)
        assert torch.equal(collaborative_refinement(noisy, pilot, pilot), two)
    # float32 inside: equal up to rounding across scales
    torch.testing.assert_close(collaborative_refinement(noisy / 255, pilot / 255, pilot / 255), out / 255,
                               rtol=0, atol=2e-3 / 255)
    _, noisy2, pilot2 = _grey_scene(seed=5, sd=20.0)
    both = collaborative_refinement(torch.cat([noisy, noisy2]), torch.cat([pilot, pilot2]),
                       torch.cat([pilot, pilot2]))
    torch.testing.assert_close(both[:1], out)
    small = noisy[..., :12, :40]
    assert collaborative_refinement(small, small, small) is small


def test_noiseless_channels_keep_the_pilot():
    """A constant image, and a grey image in three identical channels (its chroma holds no
    noise to measure): finite results, the constant unchanged, the grey channels equal."""
    c = torch.full((1, 3, 40, 40), 100.0, dtype=torch.float64)
    torch.testing.assert_close(collaborative_refinement(c, c, c), c)
    clean, noisy, pilot = _grey_scene()
    rgb = lambda t: t.expand(1, 3, *t.shape[-2:]).contiguous()  # noqa: E731
    out = collaborative_refinement(rgb(noisy), rgb(pilot), rgb(pilot))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], out[:, 0])
    torch.testing.assert_close(out[:, 2], out[:, 0])
    assert psnr(np.clip(out[0, 0].numpy(), 0, 255), clean) > psnr(pilot[0, 0].numpy(), clean) + 1


def test_needs_no_bm3d_package(monkeypatch):
    """The refinement is the project's own: it runs with the bm3d package unimportable."""
    clean, noisy, pilot = _grey_scene()
    want = collaborative_refinement(noisy, pilot, pilot)
    monkeypatch.setitem(sys.modules, "bm3d", None)
    monkeypatch.setitem(sys.modules, "bm4d", None)
    assert torch.equal(collaborative_refinement(noisy, pilot, pilot), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    """The same filter on a CUDA device: the same groups (float64) and the same output up to
    rounding, and the refinement of CUDA tensors stays on the device."""
    rng = np.random.default_rng(7)
    z, p, cov = _problem(rng, 3, 70, 90)
    t = torch.from_numpy
    params = Params()
    cpu = collaborative_wiener(t(z), t(p), t(cov), params)
    gpu = collaborative_wiener(t(z).cuda(), t(p).cuda(), t(cov).cuda(), params)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-8)
    clean, noisy, pilot = _grey_scene()
    out = collaborative_refinement(noisy.cuda(), pilot.cuda(), pilot.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), collaborative_refinement(noisy, pilot, pilot), rtol=0, atol=1e-3)


def test_denoise_refines_the_blend_then_debiases():
    """SSBSN.denoise(blend, wiener, debias): the blend is the Wiener stage's pilot, and the
    debias is keyed on the network's estimate, its noise read at the training stride
    (docs/model.md, steps 7 to 9)."""
    from ssbsn import SSBSN
    from ssbsn.restore.debias import tone_curve_debias
    from ssbsn.restore import Pipeline
    from ssbsn.restore.blend import noisy_pixel_blend
    from ssbsn.restore.estimate import network_estimate
    from ssbsn.restore.lowpass import restore_low_frequencies
    torch.manual_seed(0)
    model = SSBSN(base_channels=8, num_modules=2, ss_blocks=1, pd_test=2).eval()
    with torch.no_grad():  # outputs around mid-grey
        model.bsn.tail[-1].bias.fill_(128.0)
    from ssbsn.noise import camera_pair
    noisy8, _ = camera_pair(data.astronaut()[40:104, 180:244], np.random.default_rng(4), 4e-3)
    x = torch.from_numpy(noisy8.astype(np.float32).transpose(2, 0, 1).copy())[None]
    kw = dict(r3=False, shifts=True, lowpass=4.0)
    est = model.denoise(x, blend=False, wiener=False, debias=False, **kw)
    # the blend's reference: the estimate at the training stride over its Latin square of
    # shifts (tests/test_restore.py checks that square against the model's forward)
    cfg = Pipeline(model).settings(blend=False, wiener=False, debias=False, pd=model.pd_train, **kw)
    with torch.no_grad():
        ref = restore_low_frequencies(x, network_estimate(model, x, model.pd_train, cfg,
                                                          latin=True), kw["lowpass"])
    want = tone_curve_debias(x, est, collaborative_refinement(x, est, noisy_pixel_blend(x, est, ref)),
                             lag=model.pd_train)
    got = model.denoise(x, blend=True, wiener=True, debias=True, **kw)
    torch.testing.assert_close(got, want)
    assert (got - model.denoise(x, blend=True, wiener=False, debias=True, **kw)).abs().max() > 1
