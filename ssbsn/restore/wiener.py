"""Collaborative Wiener refinement: BM3D's second stage with the blind-spot estimate as its pilot.

The blend (:func:`ssbsn.restore.blend.noisy_pixel_blend`) weighs each pixel on its own. BM3D's
Wiener stage (Dabov et al. 2007) works on groups of similar 8×8 blocks gathered from across the
image, the nonlocal self-similarity that SS-Attention also feeds on: it takes the 3-D transform
of each group of noisy blocks and scales every coefficient by the empirical Wiener factor
|P|² / (|P|² + noise power), where P is the same coefficient of the pilot's blocks. The better
the pilot, the better the filter; here the pilot is the network's (blended) output.

BM3D wants additive noise of a known power spectrum, and camera noise in sRGB is neither: its
variance depends on the intensity, it is correlated across neighbouring pixels (demosaicking)
and across channels (the colour matrix). So, per image:

1. each channel is variance-stabilised, z = f(y) with f(v) = ∫ dv / σ(v) along the noise curve
   σ²(intensity) of :func:`ssbsn.restore.stats.noise_curves`: the noise of z has variance 1 at
   every level (:class:`Stabiliser`; the pilot goes in, and the result comes back, through
   the exact unbiased inverse, so that the brightness is kept);
2. for RGB, an orthonormal opponent-colour transform (luminance, red − blue, green against
   both) separates most of the structure from the chroma;
3. the noise's power spectrum in each transformed channel is measured on the image: the
   autocorrelation of the residual f(noisy) − m(estimate), lags up to ±4 pixels, over the
   flattest fifth of the estimate's texture (where the residual is mostly noise); a channel
   without noise (the chroma of a grey image) keeps the pilot;
4. the collaborative Wiener filter of :mod:`ssbsn.restore.collaborative` runs on the transformed
   channels: groups of 32 similar 8×8 blocks matched on the pilot's luminance and shared by
   the chroma, a 2-D DCT and a Haar transform across each group, the Wiener factor of every
   coefficient with the noise variance that the measured spectrum gives it (for the group
   mean, with the noise that nearby blocks share), and Kaiser-windowed aggregation;
5. back through the colour transform and the stabiliser's inverse.

Steps 1–3 and 5 run on the CPU (numpy, and torch for the large sums); step 4 in torch on the
pilot's device (float32; on the CPU in bands of the image on as many single-threaded workers
as torch has threads, the output the same to the bit for any thread count). No part needs the
``bm3d`` package. See docs/model.md, step 8.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

from .collaborative import (DEFAULT, Params, coefficient_covariances, collaborative_wiener,
                            cosines)
from .stats import BLEND_FLAT, fit_inputs, noise_curve

PSD_LAGS = 4     # the noise autocorrelation is measured up to ±4 pixels (demosaicking: ~2)
MIN_SIZE = 16    # smaller images are returned as the pilot (the blocks are 8×8)
_GRID = 4097     # nodes of the variance-stabilising transform
_NODES = np.linspace(-5.0, 5.0, 41)  # ε ~ N(0, 1) for the transform's mean
_WEIGHTS = np.exp(-0.5 * _NODES ** 2) / np.exp(-0.5 * _NODES ** 2).sum()

# orthonormal opponent colours: luminance, red − blue, (red + blue) − 2·green
_OPPONENT = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, -1.0], [1.0, -2.0, 1.0]])
_OPPONENT /= np.linalg.norm(_OPPONENT, axis=1, keepdims=True)

# step 4: (noisy channels (C', H, W), their pilot, their noise spectra [(H, W)] in BM3D's
# convention, the pilot's luminance (H, W) where it is not the first of them, else None) → the
# filtered channels (C', H, W); float64 numpy
Step4 = Callable[[np.ndarray, np.ndarray, list, np.ndarray], np.ndarray]


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
        return _interp_on_grid(y, self._grid, self._f)

    def mean(self, v: np.ndarray) -> np.ndarray:
        """m(v) = E[f(v + σ(v)·ε)]: where a pixel of mean v lands on average."""
        return _interp_on_grid(v, self._grid, self._m)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        """m⁻¹(z): the mean level of the pixels whose transforms average to z."""
        return np.interp(z, self._m, self._grid)


def _interp_on_grid(x: np.ndarray, grid: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """``np.interp(x, grid, fp)`` for an evenly spaced ``grid`` (np.linspace): the interval of
    each x found by division rather than by search."""
    n = grid.size
    if not np.all(np.diff(grid) > 0):  # a grid of no width (a constant image)
        return np.interp(x, grid, fp)
    t = np.subtract(x, grid[0])
    t *= (n - 1) / (grid[-1] - grid[0])
    np.floor(t, out=t)
    np.clip(t, 0, n - 2, out=t)
    j = t.astype(np.intp)
    j -= x < grid[j]                      # rounding: one interval back, or on
    j += x >= grid[np.minimum(j + 1, n - 1)]
    np.clip(j, 0, n - 2, out=j)
    slope = np.diff(fp) / np.diff(grid)
    np.clip(x, grid[0], grid[-1], out=t)
    t -= grid[j]
    t *= slope[j]
    t += fp[j]
    return t


def _lag_sums(a: np.ndarray, lags: int) -> np.ndarray:
    """S[dy + lags, dx + lags] = Σ a[y, x]·a[y + dy, x + dx] over the pairs inside the image,
    |dy|, |dx| ≤ lags: each as one dot product of the flattened image with itself shifted,
    less the pairs that wrapped from one row into the next."""
    H, W = a.shape
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    f = t.view(-1)
    N = f.numel()
    out = np.zeros((2 * lags + 1, 2 * lags + 1))
    for dy in range(lags + 1):
        for dx in range(-lags, lags + 1):
            if (dy == 0 and dx < 0) or dy >= H or abs(dx) >= W:
                continue
            off = dy * W + dx
            v = float(torch.dot(f[:N - off], f[off:]))
            if dx > 0:    # (y, W − dx + k) met (y + dy + 1, k)
                v -= float((t[:H - dy - 1, W - dx:] * t[dy + 1:, :dx]).sum())
            elif dx < 0:  # (y, k) met (y + dy − 1, W + dx + k)
                v -= float((t[:H - dy + 1, :-dx] * t[dy - 1:, W + dx:]).sum())
            out[lags + dy, lags + dx] = out[lags - dy, lags - dx] = v
    return out


def noise_psd(residual: np.ndarray, mask: np.ndarray, lags: int = PSD_LAGS) -> np.ndarray:
    """Power spectrum (H, W) of the noise in ``residual`` in BM3D's convention (white noise of
    variance v: v·H·W everywhere), from its autocorrelation over the pixels of ``mask`` at lags
    up to ±``lags``; clipped at a thousandth of the variance where the truncation dips below 0.

    The autocorrelation is Σ r·m·r'·m' / Σ m·m' over the pairs of pixels at each lag (direct
    sums); the spectrum, its cosine transform (the DFT of the symmetric lag window)."""
    H, W = residual.shape
    r = np.ascontiguousarray(residual * mask, dtype=np.float64)
    ac = _lag_sums(r, lags) / np.maximum(_lag_sums(np.ascontiguousarray(mask, np.float64),
                                                   lags), 1.0)
    if min(H, W) > 2 * lags:
        (cy, sy), (cx, sx) = cosines(H, lags), cosines(W, lags)
        psd = (cy @ ac) @ cx.T - (sy @ ac) @ sx.T  # Re Σ_δ ac(δ)·exp(−2πi·k·δ / (H, W))
    else:  # lags that wrap around the image: the last one written wins, as it always did
        idx = np.arange(-lags, lags + 1)
        kernel = np.zeros((H, W))
        kernel[np.ix_(idx % H, idx % W)] = ac
        psd = np.real(np.fft.fft2(kernel))
    return np.maximum(psd, 1e-3 * ac[lags, lags]) * H * W


def _per_channel(f, C: int) -> None:
    """f(0), …, f(C − 1), on as many threads as torch has (numpy lets go of the GIL)."""
    workers = min(C, torch.get_num_threads())
    if workers <= 1:
        for c in range(C):
            f(c)
        return
    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(f, range(C)))


def _refine_one(y: np.ndarray, est: np.ndarray, pilot: np.ndarray, curves, tex: np.ndarray,
                step4: Step4) -> np.ndarray:
    """Steps 1–5 of the module's docstring for one image (C, H, W), float64."""
    C = y.shape[0]
    lo = min(y.min(), est.min(), pilot.min())
    hi = max(y.max(), est.max(), pilot.max())
    lo, hi = lo - 0.1 * (hi - lo + 1e-12), hi + 0.1 * (hi - lo + 1e-12)
    fs = [Stabiliser(*(t.cpu().numpy() for t in curves[c]), lo, hi) for c in range(C)]
    T = torch.from_numpy(_OPPONENT if C == 3 else np.eye(C))

    def through(f, a):
        """f(a[c]) of every channel, then the colour rotation T."""
        out = np.empty_like(a)

        def one(c):
            out[c] = f(c, a[c])
        _per_channel(one, C)
        return (T @ torch.from_numpy(out).view(C, -1)).view(a.shape).numpy()
    z = through(lambda c, a: fs[c](a), y)
    p, e = (through(lambda c, a: fs[c].mean(a), a) for a in (pilot, est))
    texture = tex.mean(0)
    flat = (texture <= np.quantile(texture, BLEND_FLAT)).astype(np.float64)
    noisy, psds = [], []
    for c in range(C):
        r = (torch.from_numpy(z[c]) - torch.from_numpy(e[c])).numpy()
        if float(np.vdot(r * r, flat)) <= 1e-6 * flat.sum():  # no noise here (e.g. the
            continue                                         # chroma of a grey image): the pilot
        noisy.append(c)
        psds.append(noise_psd(r, flat))
    del e
    out = p
    if noisy:
        out[noisy] = step4(z[noisy], p[noisy], psds, None if noisy[0] == 0 else p[0])
    out = (T.T @ torch.from_numpy(out).view(C, -1)).view(out.shape).numpy()  # T: orthonormal

    def back(c):
        out[c] = fs[c].inverse(out[c])
    _per_channel(back, C)
    return out


def torch_step4(device: torch.device | str = "cpu", params: Params = DEFAULT) -> Step4:
    """Step 4 by :func:`ssbsn.restore.collaborative.collaborative_wiener` on ``device`` in
    float32."""
    def step4(z, p, psds, guide):
        f32 = lambda a: torch.from_numpy(  # noqa: E731
            np.ascontiguousarray(a, dtype=np.float32)).to(device)
        cov = np.stack([coefficient_covariances(psd, params.block) for psd in psds])
        out = collaborative_wiener(f32(z), f32(p), f32(cov), params,
                                   guide=None if guide is None else f32(guide))
        return out.double().cpu().numpy()
    return step4


def refine(noisy: torch.Tensor, estimate: torch.Tensor, pilot: torch.Tensor, step4: Step4
           ) -> torch.Tensor:
    """Steps 1–5 of the module's docstring with ``step4`` as step 4 (:func:`collaborative_refinement` with
    another filter: a benchmark's or a test's)."""
    if min(noisy.shape[-2:]) < MIN_SIZE:
        return pilot
    # the noise curves of ssbsn.restore.stats.noise_curves, and the texture they were read on
    x, e2, tex = fit_inputs(noisy, estimate)
    curves = [[noise_curve(x[b, c].flatten(), e2[b, c].flatten(), tex[b, c].flatten())
               for c in range(x.shape[1])] for b in range(x.shape[0])]
    del x, e2
    tex = tex.cpu().numpy()
    y, e, p = (t.detach().double().cpu().numpy() for t in (noisy, estimate, pilot))
    out = np.stack([_refine_one(y[b], e[b], p[b], curves[b], tex[b], step4)
                    for b in range(y.shape[0])])
    return torch.from_numpy(out).to(device=pilot.device, dtype=pilot.dtype)


def collaborative_refinement(noisy: torch.Tensor, estimate: torch.Tensor, pilot: torch.Tensor,
                             params: Params = DEFAULT) -> torch.Tensor:
    """BM3D's Wiener stage on ``noisy`` (B, C, H, W) with ``pilot`` as the pilot, in the
    variance-stabilised, colour-decorrelated domain that the noise curve fitted between
    ``noisy`` and ``estimate`` (the network's estimate) gives; see the module's docstring.
    Step 4 runs on ``pilot``'s device. Images smaller than 16 pixels on a side come back as
    the pilot. Scale-free."""
    return refine(noisy, estimate, pilot, torch_step4(pilot.device, params))


class Wiener:
    """Step of the ``wiener`` setting: :func:`collaborative_refinement` with the result so far
    as the pilot and the noise curve fitted against the network's estimate."""
    stage = "output"

    def __call__(self, ctx, image: torch.Tensor, value) -> torch.Tensor:
        return collaborative_refinement(ctx.noisy, ctx.estimate, image)
