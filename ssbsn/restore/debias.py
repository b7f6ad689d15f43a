"""Tone-curve debias: the brightness a camera's tone curve and clipping put into the mean of a
noisy photo, taken back out of an estimate of that mean.

A camera records z = u + ε in its linear space (ε zero-mean, standard deviation s), clips z to
0..1 and writes y = T(clip(z)) with a concave tone curve T. A network trained on noisy targets
estimates the mean m(u, s) = E[T(clip(u + ε))], not the clean T(u): the concave curve pulls
the mean of mid-tones and highlights down, and the clip at black pushes the darkest tones up.
Given an estimate μ of that mean and the noise variance σ² of y at that level (both measured on
the image: :func:`ssbsn.restore.stats.lag_noise_curves`), the pair (u, s) with m(u, s) = μ and
Var[T(clip(u + ε))] = σ² is solved for, and T(u) − μ is added to the output.

T is the standard sRGB tone curve of Brooks et al. 2019 (gamma 2.2, then a smoothstep), the one
:mod:`ssbsn.noise` uses; ε is taken as Gaussian. Raw samples clipped at black before
demosaicking add a further brightening b in red and blue (:data:`RAW_CLIP_RGB`, the one part
fitted to simulated cameras). A camera with its own curve, or noise that was not added before a
tone curve at all (synthetic AWGN, linear data), is outside the model; see docs/model.md,
step 9.
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.special import ndtr

from ..noise import gamma_compression, gamma_expansion, inverse_smoothstep, smoothstep
from .lowpass import gaussian_lowpass
from .stats import interp, lag_noise_curves, noise_curves, variance_curves

# ε on a uniform grid of ±6 standard deviations (the clip makes the integrand kinked, which
# a uniform grid handles better than Gauss–Hermite nodes)
_NODES = np.linspace(-6.0, 6.0, 481)
_WEIGHTS = np.exp(-0.5 * _NODES ** 2) / np.exp(-0.5 * _NODES ** 2).sum()
_ITERATIONS = 60

# σ in pixels of the Gaussian that turns the estimate into the local brightness the correction
# is keyed on (tone_curve_debias)
KEY_BLUR = 2.0

# κ per channel of an RGB image: the noise of a raw sample, clipped at black before
# demosaicking, over the noise seen in that sRGB channel. Red and blue are sampled at one pixel
# in four and carry the larger white-balance gains, so their raw samples clip more; in green
# the colour matrix's negative terms cancel what its own clip adds. Fitted on flat patches of
# simulated cameras (ssbsn.noise: random colour matrices, white balances and noise levels):
# the darkest tones' remaining shift falls from 3.5 / 0.8 / 2.4 to 1.6 / 0.8 / 1.1 grey levels
# (RMS). Other channel counts take no raw clip.
RAW_CLIP_RGB = (0.8, 0.0, 0.95)


def tone(u):
    """Linear 0..1 → sRGB 0..1 (gamma 2.2, then the smoothstep tone curve)."""
    return smoothstep(gamma_compression(u))


def inverse_tone(c):
    return gamma_expansion(inverse_smoothstep(c))


def raw_clip_bias(u: np.ndarray, s: np.ndarray) -> np.ndarray:
    """E[max(u + s·ε, 0)] − u for ε ~ N(0, 1): what clipping at black adds to the mean."""
    s = np.maximum(s, 1e-30)
    a = u / s
    return s * np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi) - u * ndtr(-a)


def noisy_moments(u: np.ndarray, s: np.ndarray, kappa: float = 0.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of T(clip(u + b + s·ε, 0, 1)) for ε ~ N(0, 1), elementwise, where
    b = :func:`raw_clip_bias` (u, κ·s) is the brightening of raw samples clipped at black before
    demosaicking (κ = 0: none)."""
    if kappa:
        u = u + raw_clip_bias(u, kappa * s)
    y = tone(np.clip(u[:, None] + s[:, None] * _NODES, 0.0, 1.0))
    mean = y @ _WEIGHTS
    return mean, ((y - mean[:, None]) ** 2) @ _WEIGHTS


def clean_levels(mean: np.ndarray, var: np.ndarray, kappa: float = 0.0) -> np.ndarray:
    """The clean sRGB levels T(u) whose noisy versions have these means and variances (all
    0..1 scale) under :func:`noisy_moments` with this κ, by fixed-point iteration on (T(u), s);
    a mean below what noise at level 0 gives maps to 0."""
    mean = np.clip(np.asarray(mean, dtype=np.float64), 0.0, 1.0)
    var = np.maximum(np.asarray(var, dtype=np.float64), 0.0)
    c = mean.copy()
    u, h = inverse_tone(c), 1e-4
    slope = (tone(np.clip(u + h, 0, 1)) - tone(np.clip(u - h, 0, 1))) / (2 * h)  # dT/du
    s = np.clip(np.sqrt(var) / np.maximum(slope, 1e-3), 1e-6, 1.0)  # the linear noise, first guess
    for _ in range(_ITERATIONS):  # damped: the mean moves about 1:1 with T(u), the variance as s²
        m, v = noisy_moments(inverse_tone(c), s, kappa)
        c = np.clip(c + 0.7 * (mean - m), 0.0, 1.0)
        s = np.clip(s * np.clip(var / np.maximum(v, 1e-12), 0.25, 4.0) ** 0.35, 1e-6, 2.0)
    return c


def debias_curves(noisy: torch.Tensor, estimate: torch.Tensor,
                  noise_var: torch.Tensor | None = None, lag: int | None = 3):
    """(local brightness, noise curves): what :func:`tone_curve_debias` keys its correction on
    and the noise variance against that brightness it is given, with the same arguments."""
    key = gaussian_lowpass(estimate.double(), KEY_BLUR)
    if noise_var is not None:
        return key, variance_curves(key, noise_var)
    if lag is not None:
        return key, lag_noise_curves(noisy, estimate, lag, key=key)
    return key, noise_curves(noisy, estimate, key=key)


def tone_curve_debias(noisy: torch.Tensor, estimate: torch.Tensor, output: torch.Tensor,
                      white: float = 255.0, raw_clip=None,
                      noise_var: torch.Tensor | None = None, lag: int | None = 3
                      ) -> torch.Tensor:
    """``output + δ``: the correction δ = T(u) − μ of each image and channel of (B, C, H, W),
    fitted at the noise curve's levels μ (:func:`clean_levels`) and linear in the local
    brightness between them. The local brightness is the estimate smoothed by a Gaussian of
    σ = :data:`KEY_BLUR` pixels: it keys the noise curve's intensity bins and the correction,
    so that both follow the neighbourhood's brightness rather than what is left of the noise in
    the estimate. ``white`` is the value of full scale (255 for 0..255 images); ``raw_clip``
    the κ of each channel (None: :data:`RAW_CLIP_RGB` for three channels, else 0).
    ``noise_var``: the noise variance of each pixel of ``noisy`` where it is known (a calibrated
    camera, or Monte Carlo draws of a simulated one), averaged in the intensity bins
    (:func:`ssbsn.restore.stats.variance_curves`); None measures it on the image. ``lag``: how it is
    measured, the distance in pixels beyond which the noise is independent (the PD stride the
    network was trained with; the pipeline's :class:`Debias` passes it): the noisy image's
    second differences at that lag (:func:`ssbsn.restore.stats.lag_noise_curves`). None: the
    residual against the estimate, as the blend fits it (:func:`ssbsn.restore.stats.noise_curves`),
    which reads the noise low where the estimate saw neighbours that share the pixel's noise
    (docs/model.md, step 9)."""
    out = output.double().clone()
    key, curves = debias_curves(noisy, estimate, noise_var, lag)
    if raw_clip is None:
        raw_clip = RAW_CLIP_RGB if key.shape[1] == 3 else (0.0,) * key.shape[1]
    for b, row in enumerate(curves):
        for c, curve in enumerate(row):
            if curve is None:
                continue
            level, var = curve
            mean = level.cpu().numpy() / white
            clean = clean_levels(mean, var.cpu().numpy() / white ** 2, raw_clip[c])
            delta = clean - np.clip(mean, 0, 1)
            delta = torch.from_numpy(white * delta).to(key.device)
            out[b, c] += interp(key[b, c].flatten(), level, delta).view(key.shape[-2:])
    return out.to(output.dtype)


class Debias:
    """Step of the ``debias`` setting: :func:`tone_curve_debias` of the result so far, the
    noise measured at the lag of the training PD stride."""
    stage = "output"

    def __call__(self, ctx, image: torch.Tensor, value) -> torch.Tensor:
        return tone_curve_debias(ctx.noisy, ctx.estimate, image, lag=ctx.model.pd_train)
