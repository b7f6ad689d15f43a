"""Collaborative Wiener refinement: BM3D's second stage with the blind-spot estimate as its pilot.

The blend (:func:`ssbsn.inference.noisy_pixel_blend`) weighs each pixel on its own. BM3D's
Wiener stage (Dabov et al. 2007) works on groups of similar 8×8 blocks gathered from across the
image, the nonlocal self-similarity that SS-Attention also feeds on: it takes the 3-D transform
of each group of noisy blocks and scales every coefficient by the empirical Wiener factor
|P|² / (|P|² + noise power), where P is the same coefficient of the pilot's blocks. The better
the pilot, the better the filter; here the pilot is the network's (blended) output.

BM3D wants additive noise of a known power spectrum, and camera noise in sRGB is neither: its
variance depends on the intensity, it is correlated across neighbouring pixels (demosaicking)
and across channels (the colour matrix). So, per image:

1. each channel is variance-stabilised, z = f(y) with f(v) = ∫ dv / σ(v) along the noise curve
   σ²(intensity) of :func:`ssbsn.inference.noise_curves`: the noise of z has variance 1 at
   every level (:class:`Stabiliser`; the pilot goes in, and the result comes back, through
   the exact unbiased inverse, so that the brightness is kept);
2. for RGB, an orthonormal opponent-colour transform (luminance, red − blue, green against
   both) separates most of the structure from the chroma;
3. the noise's power spectrum in each transformed channel is measured on the image: the
   autocorrelation of the residual f(noisy) − m(estimate), lags up to ±4 pixels, over the
   flattest fifth of the estimate's texture (where the residual is mostly noise); a channel
   without noise (the chroma of a grey image) keeps the pilot;
4. BM3D's Wiener stage runs on each transformed channel (the ``bm3d`` package, whose
   correlated-noise version takes the spectrum and chooses its own parameters from it; Mäkinen
   et al., IEEE TIP 2020); the block matches found on the luminance are reused for the chroma;
5. back through the colour transform and the stabiliser's inverse.

It runs on the CPU (numpy, one thread so that the output is repeatable to the bit), about 5 s
for a 256×256 RGB image, in proportion to the pixel count. See docs/model.md, step 8.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .errors import UserError
from .inference import BLEND_FLAT, _fit_inputs, noise_curves

PSD_LAGS = 4     # the noise autocorrelation is measured up to ±4 pixels (demosaicking: ~2)
MIN_SIZE = 16    # smaller images are returned as the pilot (BM3D's blocks are 8×8)
_GRID = 4097     # nodes of the variance-stabilising transform
_NODES = np.linspace(-5.0, 5.0, 41)  # ε ~ N(0, 1) for the transform's mean
_WEIGHTS = np.exp(-0.5 * _NODES ** 2) / np.exp(-0.5 * _NODES ** 2).sum()

# orthonormal opponent colours: luminance, red − blue, (red + blue) − 2·green
_OPPONENT = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])
_OPPONENT /= np.linalg.norm(_OPPONENT, axis=1, keepdims=True)


def _bm3d():
    try:
        import bm3d
    except ImportError as e:  # a core dependency; a hand-made environment may lack it
        raise UserError("the Wiener refinement needs the bm3d package (pip install bm3d), "
                        "or turn it off (--no-wiener, wiener=False)") from e
    return bm3d


@contextmanager
def _numpy_trapz():
    """bm4d 4.2 (under bm3d) calls ``numpy.trapz``, which numpy 2.4 removed in favour of
    ``numpy.trapezoid``: lend it the new name for the duration of the call."""
    if hasattr(np, "trapz"):
        yield
        return
    np.trapz = np.trapezoid
    try:
        yield
    finally:
        del np.trapz


class Stabiliser:
    """The variance-stabilising transform of one channel: f(v) = ∫ dv / σ(v), with σ² linear
    between the noise curve's levels and constant beyond them, so that f(y) has noise of
    variance 1 at every level. The Wiener stage estimates the mean of f(y), which f maps
    from a slightly different level than the pixel's mean (f is not linear), so the way back
    is the exact unbiased inverse: the inverse of m(v) = E[f(v + σ(v)·ε)], ε ~ N(0, 1), and the
    pilot goes in through m as well. All three are piecewise linear on a fine grid over
    [lo, hi] and six noise deviations beyond."""

    def __init__(self, levels: np.ndarray, variances: np.ndarray, lo: float, hi: float):
        floor = 1e-12 * max(hi - lo, 1e-12) ** 2
        sd_at = lambda v: np.sqrt(np.maximum(np.interp(v, levels, variances), floor))  # noqa: E731
        reach = 6.0 * sd_at(np.array([lo, hi])).max()
        grid = np.linspace(lo - reach, hi + reach, _GRID)
        sd = sd_at(grid)
        f = np.concatenate([[0.0], np.cumsum(0.5 * (1 / sd[1:] + 1 / sd[:-1]) * np.diff(grid))])
        self._grid, self._f = grid, f
        m = np.interp(grid[:, None] + sd[:, None] * _NODES, grid, f) @ _WEIGHTS
        self._m = np.maximum.accumulate(m)  # increasing (it is, up to rounding)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        """f(y): the transform of noisy data."""
        return np.interp(y, self._grid, self._f)

    def mean(self, v: np.ndarray) -> np.ndarray:
        """m(v) = E[f(v + σ(v)·ε)]: where a pixel of mean v lands on average."""
        return np.interp(v, self._grid, self._m)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """m⁻¹(z): the mean level of the pixels whose transforms average to z."""
        return np.interp(z, self._m, self._grid)


def noise_psd(residual: np.ndarray, mask: np.ndarray, lags: int = PSD_LAGS) -> np.ndarray:
    """Power spectrum (H, W) of the noise in ``residual`` in BM3D's convention (white noise of
    variance v: v·H·W everywhere), from its autocorrelation over the pixels of ``mask`` at lags
    up to ±``lags``; clipped at a thousandth of the variance where the truncation dips below 0."""
    H, W = residual.shape
    size = (2 * H, 2 * W)  # zero padding: no wrap-around
    rm, m = np.fft.rfft2(residual * mask, size), np.fft.rfft2(mask, size)
    num = np.fft.irfft2(rm * np.conj(rm), size)
    den = np.fft.irfft2(m * np.conj(m), size)
    idx = np.arange(-lags, lags + 1)
    ac = num[np.ix_(idx % size[0], idx % size[1])] / np.maximum(
        den[np.ix_(idx % size[0], idx % size[1])], 1.0)
    kernel = np.zeros((H, W))
    kernel[np.ix_(idx % H, idx % W)] = ac
    psd = np.real(np.fft.fft2(kernel))
    return np.maximum(psd, 1e-3 * ac[lags, lags]) * H * W


def _refine_one(y: np.ndarray, est: np.ndarray, pilot: np.ndarray, curves, tex: np.ndarray,
                bm3d) -> np.ndarray:
    """Steps 1–5 of the module's docstring for one image (C, H, W), float64."""
    C = y.shape[0]
    lo = min(y.min(), est.min(), pilot.min())
    hi = max(y.max(), est.max(), pilot.max())
    lo, hi = lo - 0.1 * (hi - lo + 1e-12), hi + 0.1 * (hi - lo + 1e-12)
    fs = [Stabiliser(*(t.cpu().numpy() for t in curves[c]), lo, hi) for c in range(C)]
    T = _OPPONENT if C == 3 else np.eye(C)
    mix = lambda a: np.einsum("ij,jhw->ihw", T, a)  # noqa: E731
    z = mix(np.stack([fs[c](y[c]) for c in range(C)]))
    p, e = (mix(np.stack([fs[c].mean(a[c]) for c in range(C)])) for a in (pilot, est))
    texture = tex.mean(0)
    flat = (texture <= np.quantile(texture, BLEND_FLAT)).astype(np.float64)
    profile = bm3d.BM3DProfile()
    profile.num_threads = 1  # the package's threads add up overlapping blocks in any order:
    #                          one thread makes the output repeatable to the bit
    out, matches = [], None
    with _numpy_trapz():
        for c in range(C):
            r = z[c] - e[c]
            if np.sum(r * r * flat) <= 1e-6 * flat.sum():  # no noise here (e.g. the chroma
                out.append(p[c])                           # of a grey image): the pilot
                continue
            psd = noise_psd(r, flat)
            if matches is None:  # the first channel filtered (the luminance) finds the groups
                w, matches = bm3d.bm3d(z[c], psd, profile, stage_arg=p[c],
                                       blockmatches=(False, True))
            else:
                w = bm3d.bm3d(z[c], psd, profile, stage_arg=p[c], blockmatches=matches)
            out.append(w)
    out = np.einsum("ij,jhw->ihw", T.T, np.stack(out))  # T is orthonormal
    return np.stack([fs[c].inverse(out[c]) for c in range(C)])


def bm3d_wiener(noisy: torch.Tensor, estimate: torch.Tensor, pilot: torch.Tensor
                ) -> torch.Tensor:
    """BM3D's Wiener stage on ``noisy`` (B, C, H, W) with ``pilot`` as the pilot, in the
    variance-stabilised, colour-decorrelated domain that the noise curve fitted between
    ``noisy`` and ``estimate`` (the network's estimate) gives; see the module's docstring.
    Images smaller than 16 pixels on a side come back as the pilot. Scale-free."""
    if min(noisy.shape[-2:]) < MIN_SIZE:
        return pilot
    bm3d = _bm3d()
    curves = noise_curves(noisy, estimate)
    tex = _fit_inputs(noisy, estimate)[2].cpu().numpy()  # the texture the noise curve read
    y, e, p = (t.detach().double().cpu().numpy() for t in (noisy, estimate, pilot))
    out = np.stack([_refine_one(y[b], e[b], p[b], curves[b], tex[b], bm3d)
                    for b in range(y.shape[0])])
    return torch.from_numpy(out).to(device=pilot.device, dtype=pilot.dtype)
