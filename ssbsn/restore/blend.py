"""The blend step: the blind-spot estimate combined with the noisy pixel it never saw
(:func:`noisy_pixel_blend`)."""
from __future__ import annotations

import torch

from .stats import (BLEND_BINS, BLEND_FLAT, box_mean, curve, fit_inputs, interp,
                    noise_curve, quantile, quantile_bins, texture)

BLEND_LOCAL_RADIUS = 2  # local error: the mean squared residual over (2r+1)² pixels beyond
BLEND_LOCAL_MARGIN = 3.0  # 3× the level the noise alone reaches at the 90th percentile
BLEND_LOCAL_Q = 0.9     # of the flattest fifth of the pixels (in units of the noise variance)


def blend_variances(noisy: torch.Tensor, estimate: torch.Tensor,
                    reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise variance, the estimate's error variance) at each pixel of (B, C, H, W), fitted
    per image and channel as :func:`noisy_pixel_blend` says; float64. ``reference``: the
    estimate whose texture keys the error variance (None: ``estimate`` itself)."""
    n = BLEND_BINS
    if reference is not None and reference.shape != estimate.shape:
        raise ValueError(f"the blend's reference has shape {tuple(reference.shape)}, the "
                         f"estimate {tuple(estimate.shape)}")
    x, e, tex = fit_inputs(noisy, estimate)
    ref_tex = tex if reference is None else texture(reference)
    e_local = box_mean(e, BLEND_LOCAL_RADIUS)
    noise_var, prior_var = torch.zeros_like(x), torch.zeros_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            xi, ei, ti = x[b, c].flatten(), e[b, c].flatten(), tex[b, c].flatten()
            if xi.numel() < 2:
                continue
            # noise variance against intensity, from the flattest pixels of each intensity bin
            level, noise = noise_curve(xi, ei, ti)
            nv = interp(xi, level, noise)
            # error variance of the estimate against the reference's texture: what the residual
            # holds beyond the noise, zero over the flattest fifth of the pixels (the share the
            # noise was measured on), never decreasing with texture
            ri = ref_tex[b, c].flatten()
            tb = quantile_bins(ri, n)
            t_level, excess = curve(ri, ei - nv, tb, n)
            flattest = excess[:max(1, round(BLEND_FLAT * n))]  # 3 of 16 bins
            prior = torch.cummax((excess - flattest.max()).clamp_min(0), 0).values
            prior = interp(ri, t_level, prior)
            # the local error: what the residual around the pixel holds beyond the noise, counted
            # from 3× the level the noise alone reaches at 90 % of the flattest pixels
            mi = e_local[b, c].flatten()
            ratio = mi / nv.clamp_min(torch.finfo(nv.dtype).tiny)
            flat = ri <= quantile(ri, BLEND_FLAT)
            k = BLEND_LOCAL_MARGIN * quantile(ratio[flat], BLEND_LOCAL_Q)
            if torch.isfinite(k):
                prior = torch.maximum(prior, (mi - k * nv).clamp_min(0))
            noise_var[b, c] = nv.view(x.shape[-2:])
            prior_var[b, c] = prior.view(x.shape[-2:])
    return noise_var, prior_var


def noisy_pixel_blend(noisy: torch.Tensor, estimate: torch.Tensor,
                      reference: torch.Tensor | None = None) -> torch.Tensor:
    """``estimate + w·(noisy − estimate)``: the blind-spot estimate combined with the noisy pixel
    it never saw, each weighted by the inverse of its error variance (a Gaussian posterior
    mean, after Laine et al. 2019, with both variances fitted on the image itself).

    The residual r = noisy − estimate holds the noise plus the estimate's own error, which the
    fit takes as independent (the blind spot never sees the pixel itself; docs/model.md says
    where noise correlated across pixels breaks this). Per image and channel:

    * noise variance σ²(intensity): the mean r² over the flattest fifth (lowest local variance
      of the estimate) of each of 16 equal-count intensity bins, where the estimate's error is
      least; linear between bins;
    * the estimate's error variance τ²(texture), texture being the local variance over 5×5
      pixels of ``reference`` (None: of the estimate itself): the mean of r² − σ² in 16
      equal-count texture bins, zero over the flattest fifth (3 bins), never decreasing;
    * the local error: the mean r² over the 5×5 pixels around, less σ² times 3× the 90th
      percentile of that ratio (mean r² over σ²) over the flattest fifth of the reference's
      texture, where the noise alone sets it; τ² is the larger of the two. It catches what no
      texture shows: detail of one or two pixels that both estimates missed (a star) leaves a
      residual far above the noise;
    * w = τ² / (τ² + σ²).

    The reference is a second blind-spot estimate whose blind spot also covers the pixels
    whose noise is correlated with the pixel's own (the :class:`Blend` step passes the
    estimate at the training PD stride). The estimate's own texture around a pixel is made of
    neighbours that saw that pixel's noise, so binning by it selects pixels by the size of their
    own noise: on a smooth photo the pixels of its highest texture bins carry about twice the
    noise variance of its lowest, and τ² would take that excess for lost detail.

    Where the noise is weak against the detail the blind spot lost (fine texture, low noise),
    the noisy pixel comes back; in flat regions the estimate stays. Scale-free: blending
    a·noisy and a·estimate gives a times the blend.
    """
    noise_var, prior_var = blend_variances(noisy, estimate, reference)
    total = noise_var + prior_var
    w = torch.where(total > 0, prior_var / total.clamp_min(1e-300), torch.zeros_like(total))
    return estimate + w.to(estimate.dtype) * (noisy.to(estimate.dtype) - estimate)


class Blend:
    """Step of the ``blend`` setting: :func:`noisy_pixel_blend` of the result so far, the
    error variance keyed on the texture of the estimate at the training PD stride (one more
    network pass where it differs from the inference stride; with the shifted-PD ensemble,
    the stride's Latin square of shifts rather than all stride², which measured the same:
    benchmarks/results/blend_reference/)."""
    stage = "output"

    def __call__(self, ctx, image: torch.Tensor, value) -> torch.Tensor:
        return noisy_pixel_blend(ctx.noisy, image,
                                 ctx.estimate_at(ctx.model.pd_train, latin=True))
