"""The noise statistics the restoration steps share: texture, intensity bins and the noise
variance against intensity (noise curves), measured on the image itself.

The blend (:mod:`ssbsn.restore.blend`), the Wiener refinement (:mod:`ssbsn.restore.wiener`)
and the debias (:mod:`ssbsn.restore.debias`) all read the noise the same way: the squared
residual between the noisy image and the network's estimate over the flattest pixels (lowest
local variance of the estimate) of equal-count intensity bins. Everything here is float64 and
runs on the tensors' device.
"""
from __future__ import annotations

import torch

from .lowpass import gaussian_lowpass

BLEND_BINS = 16        # equal-count bins of intensity (noise curve) and of texture (prior error)
BLEND_RADIUS = 2       # texture: local variance of the estimate over (2r+1)² pixels
BLEND_FLAT = 0.2       # the noise is measured on the flattest fifth of each intensity bin
LAG_FLAT = 0.5         # lag_noise_curves: the flattest half of each intensity bin,
LAG_FLAT_BLUR = 0.5    # flatness read on the estimate blurred by this σ
MAX_SAMPLES = 1 << 16  # bin edges and quantiles from at most this many pixels (a regular subsample)


def box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean of x (B, C, H, W) over the (2r+1)² window around each pixel (reflected borders;
    replicated where the image is too small to reflect)."""
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(x, (r, r, r, r), mode=mode), 2 * r + 1, stride=1)


def local_variance(x: torch.Tensor, r: int) -> torch.Tensor:
    """Variance of x (B, C, H, W) over the (2r+1)² window around each pixel."""
    m = box_mean(x, r)
    return (box_mean(x * x, r) - m * m).clamp_min(0)


def quantile(v: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """The q-quantile(s) of the flat tensor v, from a regular subsample of at most MAX_SAMPLES."""
    return torch.quantile(v[:: max(1, v.numel() // MAX_SAMPLES)], q)


def quantile_bins(v: torch.Tensor, n: int) -> torch.Tensor:
    """Index 0..n−1 of each value of the flat tensor v in n equal-count bins."""
    edges = quantile(v, torch.linspace(0, 1, n + 1, dtype=v.dtype, device=v.device))
    return torch.bucketize(v, edges[1:-1].contiguous())


def bin_means(idx: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of v per bin, count per bin) for bin indices idx."""
    total = v.new_zeros(n).index_add_(0, idx, v)
    count = v.new_zeros(n).index_add_(0, idx, torch.ones_like(v))
    return total / count.clamp_min(1), count


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, constant outside (numpy.interp);
    xp increasing."""
    i = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((x - x0) / (x1 - x0).clamp_min(torch.finfo(x.dtype).tiny)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def lowest_in_bins(v: torch.Tensor, idx: torch.Tensor, n: int, fraction: float) -> torch.Tensor:
    """Mask of the ``fraction`` of pixels with the lowest v within each of the n bins idx
    (at least one per non-empty bin): the first ⌈fraction·count⌉ of each bin in the order of
    v, ties in the order of the pixels (that of a stable sort by v, then by bin). Linear time:
    each bin's threshold is a selection (top-k), not a sort."""
    count = torch.bincount(idx, minlength=n)
    want = torch.minimum((count * fraction).ceil(), count).double()  # how many each bin keeps
    t = v.new_full((n,), float("-inf"))  # the largest value each bin keeps
    full = torch.zeros(n, dtype=torch.bool, device=v.device)  # bins kept whole
    for b in range(n):
        k, c = int(want[b]), int(count[b])
        if k == c:
            full[b] = c > 0
        elif k > 0:
            t[b] = torch.topk(v[idx == b], k, largest=False, sorted=False).values.max()
    tb = t[idx]
    mask = (v < tb) | full[idx]
    # the values equal to a bin's threshold fill what the smaller ones leave, first come first
    need = want - torch.bincount(idx, weights=mask.to(want.dtype), minlength=n)
    tie = torch.nonzero((v == tb) & ~mask).squeeze(1)
    if tie.numel():
        bins = idx[tie]
        order = torch.argsort(bins, stable=True)
        per_bin = torch.bincount(bins, minlength=n)
        start = torch.cumsum(per_bin, 0) - per_bin
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=v.device) - start[bins[order]]
        mask[tie[rank < need[bins]]] = True
    return mask


def curve(key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, n: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean key, mean value) of the non-empty bins, sorted by key."""
    k, count = bin_means(idx, key, n)
    v, _ = bin_means(idx, value, n)
    keep = count > 0
    k, v = k[keep], v[keep]
    order = torch.argsort(k)
    return k[order], v[order]


def texture(t: torch.Tensor) -> torch.Tensor:
    """The texture the fits key on: t's local variance over (2·BLEND_RADIUS + 1)² pixels,
    in float64."""
    return local_variance(t.double(), BLEND_RADIUS)


def fit_inputs(noisy: torch.Tensor, estimate: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(estimate, squared residual, texture) in float64, what both fits read: texture is the
    estimate's :func:`texture`."""
    x = estimate.double()
    return x, (noisy.double() - x) ** 2, texture(x)


def noise_curve(x: torch.Tensor, e: torch.Tensor, tex: torch.Tensor, share: float = BLEND_FLAT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(intensity levels, noise variance at each level) of one channel: the mean squared
    residual e over the flattest ``share`` (lowest texture tex) of each intensity bin of x."""
    n = BLEND_BINS
    ib = quantile_bins(x, n)
    flat = lowest_in_bins(tex, ib, n, share)
    return curve(x[flat], e[flat], ib[flat], n)


def _check_key(key: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    if key.shape != estimate.shape:
        raise ValueError(f"the intensity key has shape {tuple(key.shape)}, the estimate "
                         f"{tuple(estimate.shape)}")
    return key


def noise_curves(noisy: torch.Tensor, estimate: torch.Tensor, key: torch.Tensor | None = None
                 ) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """The noise variance against intensity of each image and channel of (B, C, H, W), as
    :func:`ssbsn.restore.blend.noisy_pixel_blend` fits it: ``curves[b][c] = (levels,
    variances)``, float64, levels increasing (None for a channel of fewer than 2 pixels). ``key``: what the intensity bins
    and levels are read on (None: the estimate)."""
    x, e, tex = fit_inputs(noisy, estimate)
    if key is not None:
        x = _check_key(key, estimate).double()
    return [[noise_curve(x[b, c].flatten(), e[b, c].flatten(), tex[b, c].flatten())
             if x[b, c].numel() >= 2 else None for c in range(x.shape[1])]
            for b in range(x.shape[0])]


def lag_noise_curves(noisy: torch.Tensor, estimate: torch.Tensor, lag: int,
                     key: torch.Tensor | None = None
                     ) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """The noise variance against intensity of each image and channel of (B, C, H, W), in the
    form of :func:`noise_curves`, measured on the noisy image's own second differences rather
    than on the residual against the estimate.

    Noise ``lag`` pixels apart is independent (``lag``: the PD stride the network was trained
    with, which rests on that assumption), so where the image is flat the second difference
    n(p) − (n(p − lag) + n(p + lag))/2 along a row or a column has variance 1.5 σ²(p). The
    curve is its mean, both directions together and divided by 1.5, over the flattest
    :data:`LAG_FLAT` of each of the 16 equal-count intensity bins of ``key`` (None: the
    estimate). Flatness is the local variance over 5×5 pixels of the estimate smoothed by a
    Gaussian of σ = :data:`LAG_FLAT_BLUR`: the estimate's own texture holds some of the noise of
    the pixels around (PD 2 at test beside demosaicked noise), so the flattest pixels by it are
    also those of the smallest noise. The residual against a blind-spot estimate reads the
    noise low for the same reason (about 0.6 of the truth in the darkest red of a dark photo).
    Pixels within ``lag`` of the border are left out; an image with fewer than two pixels
    inside that margin takes :func:`noise_curves` instead."""
    if lag < 1:
        raise ValueError(f"the lag must be at least 1 pixel, got {lag}")
    key = estimate if key is None else _check_key(key, estimate)
    h, w = noisy.shape[-2] - 2 * lag, noisy.shape[-1] - 2 * lag
    if h < 1 or w < 1 or h * w < 2:
        return noise_curves(noisy, estimate, key)
    n, L = noisy.double(), lag
    centre = n[..., L:-L, L:-L]
    rows = centre - 0.5 * (n[..., L:-L, :-2 * L] + n[..., L:-L, 2 * L:])
    cols = centre - 0.5 * (n[..., :-2 * L, L:-L] + n[..., 2 * L:, L:-L])
    var = (rows ** 2 + cols ** 2) / 3.0  # each has variance 1.5 σ² on flat noise
    k = key.double()[..., L:-L, L:-L]
    tex = texture(gaussian_lowpass(estimate.double(), LAG_FLAT_BLUR))[..., L:-L, L:-L]
    return [[noise_curve(k[b, c].flatten(), var[b, c].flatten(), tex[b, c].flatten(), LAG_FLAT)
             for c in range(k.shape[1])] for b in range(k.shape[0])]


def variance_curves(estimate: torch.Tensor, variance: torch.Tensor
                    ) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """A known noise variance of each pixel (B, C, H, W), e.g. a calibrated camera's, as curves
    against intensity in the form of :func:`noise_curves`: its mean over each of the same 16
    equal-count intensity bins of the estimate (all pixels of a bin, not only the flattest)."""
    if variance.shape != estimate.shape:
        raise ValueError(f"the noise variance has shape {tuple(variance.shape)}, the estimate "
                         f"{tuple(estimate.shape)}")
    x, v = estimate.double(), variance.double().to(estimate.device)
    out = []
    for b in range(x.shape[0]):
        row = []
        for c in range(x.shape[1]):
            xi, vi = x[b, c].flatten(), v[b, c].flatten()
            row.append(curve(xi, vi, quantile_bins(xi, BLEND_BINS), BLEND_BINS)
                       if xi.numel() >= 2 else None)
        out.append(row)
    return out
