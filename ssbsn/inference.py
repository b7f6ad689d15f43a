"""Inference helpers: geometric self-ensemble, tiling, position-hashed R3 randomness, and the
blend of the blind-spot estimate with the noisy pixel (:func:`noisy_pixel_blend`).

R3 replaces each pixel by the noisy one with probability p. Its random field here is a hash of
(seed, round, batch, channel, global row, global column) rather than a stream from a generator,
so a tile draws exactly the numbers the whole image would at those pixels: tiled inference of a
model with a finite receptive field equals untiled inference, R3 included.
"""
from __future__ import annotations

from typing import Callable

import torch

_M32 = 0xFFFFFFFF

# What SSBSN.denoise does when not told otherwise (the paper's inference); a trained model
# carries its own values in its checkpoint (metadata key "ssbsn_inference").
INFERENCE_DEFAULTS = dict(r3=True, shifts=False, self_ensemble=False, tile=0, overlap=64,
                          lowpass=0.0, blend=False, wiener=False, debias=False)


def check_inference_settings(s: dict) -> dict:
    """The settings with their types checked; one clear error for a bad value."""
    unknown = sorted(set(s) - set(INFERENCE_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown inference settings: {', '.join(unknown)}")
    out = dict(s)
    for k in ("r3", "shifts", "self_ensemble", "blend", "wiener", "debias"):
        if not isinstance(out[k], bool):
            raise ValueError(f"inference setting {k} must be true or false, got {out[k]!r}")
    lp = out["lowpass"]
    if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not lp >= 0:
        raise ValueError(f"inference setting lowpass must be a number ≥ 0, got {lp!r}")
    out["lowpass"] = float(lp)
    for k in ("tile", "overlap"):
        v = out[k]
        if v is None and k == "tile":
            out[k] = v = 0
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"inference setting {k} must be a non-negative integer, got {v!r}")
    return out


def gaussian_lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with standard deviation ``sigma`` pixels
    (radius 3σ, reflected borders; replicated where the image is smaller than the radius)."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, device=x.device, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    B, C, H, W = x.shape
    y = x.reshape(B * C, 1, H, W)
    for dim in (-1, -2):
        n = y.shape[dim]
        pad = (r, r, 0, 0) if dim == -1 else (0, 0, r, r)
        y = torch.nn.functional.pad(y, pad, mode="reflect" if n > r else "replicate")
        w = k.view(1, 1, 1, -1) if dim == -1 else k.view(1, 1, -1, 1)
        y = torch.nn.functional.conv2d(y, w)
    return y.reshape(B, C, H, W)


def restore_low_frequencies(noisy: torch.Tensor, denoised: torch.Tensor, sigma: float
                            ) -> torch.Tensor:
    """``denoised + lowpass_σ(noisy − denoised)``: the output keeps the noisy image's low
    frequencies (its local brightness and colour, where the camera noise has almost no energy:
    it is correlated over two pixels only) and the network's high frequencies. A short-trained
    blind-spot network's output drifts in brightness by several grey levels; this removes the
    drift without touching detail."""
    if sigma <= 0:
        return denoised
    return denoised + gaussian_lowpass(noisy.to(denoised.dtype) - denoised, sigma)


# --- the blend with the noisy pixel ------------------------------------------------------

BLEND_BINS = 16        # equal-count bins of intensity (noise curve) and of texture (prior error)
BLEND_RADIUS = 2       # texture: local variance of the estimate over (2r+1)² pixels
BLEND_FLAT = 0.2       # the noise is measured on the flattest fifth of each intensity bin
BLEND_LOCAL_RADIUS = 2  # local error: the mean squared residual over (2r+1)² pixels beyond
BLEND_LOCAL_MARGIN = 3.0  # 3× the level the noise alone reaches at the 90th percentile
BLEND_LOCAL_Q = 0.9     # of the flattest fifth of the pixels (in units of the noise variance)
LAG_FLAT = 0.5         # lag_noise_curves: the flattest half of each intensity bin,
LAG_FLAT_BLUR = 0.5    # flatness read on the estimate blurred by this σ
_MAX_SAMPLES = 1 << 16  # bin edges and quantiles from at most this many pixels (a regular subsample)


def _box_mean(x: torch.Tensor, r: int) -> torch.Tensor:
    """Mean of x (B, C, H, W) over the (2r+1)² window around each pixel (reflected borders;
    replicated where the image is too small to reflect)."""
    mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
    return torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(x, (r, r, r, r), mode=mode), 2 * r + 1, stride=1)


def _local_variance(x: torch.Tensor, r: int) -> torch.Tensor:
    """Variance of x (B, C, H, W) over the (2r+1)² window around each pixel."""
    m = _box_mean(x, r)
    return (_box_mean(x * x, r) - m * m).clamp_min(0)


def _quantile(v: torch.Tensor, q: float | torch.Tensor) -> torch.Tensor:
    """The q-quantile(s) of the flat tensor v, from a regular subsample of at most _MAX_SAMPLES."""
    return torch.quantile(v[:: max(1, v.numel() // _MAX_SAMPLES)], q)


def _quantile_bins(v: torch.Tensor, n: int) -> torch.Tensor:
    """Index 0..n−1 of each value of the flat tensor v in n equal-count bins."""
    edges = _quantile(v, torch.linspace(0, 1, n + 1, dtype=v.dtype, device=v.device))
    return torch.bucketize(v, edges[1:-1].contiguous())


def _bin_means(idx: torch.Tensor, v: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of v per bin, count per bin) for bin indices idx."""
    total = v.new_zeros(n).index_add_(0, idx, v)
    count = v.new_zeros(n).index_add_(0, idx, torch.ones_like(v))
    return total / count.clamp_min(1), count


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, constant outside (numpy.interp);
    xp increasing."""
    i = torch.searchsorted(xp.contiguous(), x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    t = ((x - x0) / (x1 - x0).clamp_min(torch.finfo(x.dtype).tiny)).clamp(0, 1)
    return f0 + t * (f1 - f0)


def _lowest_in_bins(v: torch.Tensor, idx: torch.Tensor, n: int, fraction: float) -> torch.Tensor:
    """Mask of the ``fraction`` of pixels with the lowest v within each of the n bins idx
    (at least one per non-empty bin)."""
    order = torch.argsort(v, stable=True)
    order = order[torch.argsort(idx[order], stable=True)]  # by bin, then by v within a bin
    count = torch.bincount(idx, minlength=n)
    start = torch.cumsum(count, 0) - count
    sorted_bins = idx[order]
    rank = torch.arange(v.numel(), device=v.device) - start[sorted_bins]
    keep = rank < (count[sorted_bins] * fraction).ceil()
    mask = torch.zeros_like(keep)
    mask[order] = keep
    return mask


def _curve(key: torch.Tensor, value: torch.Tensor, idx: torch.Tensor, n: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean key, mean value) of the non-empty bins, sorted by key."""
    k, count = _bin_means(idx, key, n)
    v, _ = _bin_means(idx, value, n)
    keep = count > 0
    k, v = k[keep], v[keep]
    order = torch.argsort(k)
    return k[order], v[order]


def _texture(t: torch.Tensor) -> torch.Tensor:
    """The texture the fits key on: t's local variance over (2·BLEND_RADIUS + 1)² pixels,
    in float64."""
    return _local_variance(t.double(), BLEND_RADIUS)


def _fit_inputs(noisy: torch.Tensor, estimate: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(estimate, squared residual, texture) in float64, what both fits read: texture is the
    estimate's :func:`_texture`."""
    x = estimate.double()
    return x, (noisy.double() - x) ** 2, _texture(x)


def _noise_curve(x: torch.Tensor, e: torch.Tensor, tex: torch.Tensor, share: float = BLEND_FLAT
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(intensity levels, noise variance at each level) of one channel: the mean squared
    residual e over the flattest ``share`` (lowest texture tex) of each intensity bin of x."""
    n = BLEND_BINS
    ib = _quantile_bins(x, n)
    flat = _lowest_in_bins(tex, ib, n, share)
    return _curve(x[flat], e[flat], ib[flat], n)


def _check_key(key: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    if key.shape != estimate.shape:
        raise ValueError(f"the intensity key has shape {tuple(key.shape)}, the estimate "
                         f"{tuple(estimate.shape)}")
    return key


def noise_curves(noisy: torch.Tensor, estimate: torch.Tensor, key: torch.Tensor | None = None
                 ) -> list[list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """The noise variance against intensity of each image and channel of (B, C, H, W), as
    :func:`noisy_pixel_blend` fits it: ``curves[b][c] = (levels, variances)``, float64, levels
    increasing (None for a channel of fewer than 2 pixels). ``key``: what the intensity bins
    and levels are read on (None: the estimate)."""
    x, e, tex = _fit_inputs(noisy, estimate)
    if key is not None:
        x = _check_key(key, estimate).double()
    return [[_noise_curve(x[b, c].flatten(), e[b, c].flatten(), tex[b, c].flatten())
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
    tex = _texture(gaussian_lowpass(estimate.double(), LAG_FLAT_BLUR))[..., L:-L, L:-L]
    return [[_noise_curve(k[b, c].flatten(), var[b, c].flatten(), tex[b, c].flatten(), LAG_FLAT)
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
            row.append(_curve(xi, vi, _quantile_bins(xi, BLEND_BINS), BLEND_BINS)
                       if xi.numel() >= 2 else None)
        out.append(row)
    return out


def blend_variances(noisy: torch.Tensor, estimate: torch.Tensor,
                    reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise variance, the estimate's error variance) at each pixel of (B, C, H, W), fitted
    per image and channel as :func:`noisy_pixel_blend` says; float64. ``reference``: the
    estimate whose texture keys the error variance (None: ``estimate`` itself)."""
    n = BLEND_BINS
    if reference is not None and reference.shape != estimate.shape:
        raise ValueError(f"the blend's reference has shape {tuple(reference.shape)}, the "
                         f"estimate {tuple(estimate.shape)}")
    x, e, tex = _fit_inputs(noisy, estimate)
    ref_tex = tex if reference is None else _texture(reference)
    e_local = _box_mean(e, BLEND_LOCAL_RADIUS)
    noise_var, prior_var = torch.zeros_like(x), torch.zeros_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            xi, ei, ti = x[b, c].flatten(), e[b, c].flatten(), tex[b, c].flatten()
            if xi.numel() < 2:
                continue
            # noise variance against intensity, from the flattest pixels of each intensity bin
            level, noise = _noise_curve(xi, ei, ti)
            nv = _interp(xi, level, noise)
            # error variance of the estimate against the reference's texture: what the residual
            # holds beyond the noise, zero over the flattest fifth of the pixels (the share the
            # noise was measured on), never decreasing with texture
            ri = ref_tex[b, c].flatten()
            tb = _quantile_bins(ri, n)
            t_level, excess = _curve(ri, ei - nv, tb, n)
            flattest = excess[:max(1, round(BLEND_FLAT * n))]  # 3 of 16 bins
            prior = torch.cummax((excess - flattest.max()).clamp_min(0), 0).values
            prior = _interp(ri, t_level, prior)
            # the local error: what the residual around the pixel holds beyond the noise, counted
            # from 3× the level the noise alone reaches at 90 % of the flattest pixels
            mi = e_local[b, c].flatten()
            ratio = mi / nv.clamp_min(torch.finfo(nv.dtype).tiny)
            flat = ri <= _quantile(ri, BLEND_FLAT)
            k = BLEND_LOCAL_MARGIN * _quantile(ratio[flat], BLEND_LOCAL_Q)
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
    whose noise is correlated with the pixel's own (:meth:`ssbsn.SSBSN.denoise` passes the
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


def shift_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, s: int
                   ) -> torch.Tensor:
    """Average of ``fn`` over the s² pixel shifts (dy, dx) in 0..s−1 of x (reflect-padded at the
    top/left, cropped back): every pixel takes each of the s² PD phases once, which removes the
    PD checkerboard and averages s² different blind-spot estimates."""
    if s <= 1:
        return fn(x)
    H, W = x.shape[-2:]
    mode = "reflect" if min(H, W) > s else "replicate"
    acc = None
    for dy in range(s):
        for dx in range(s):
            xs = torch.nn.functional.pad(x, (dx, 0, dy, 0), mode=mode) if dy or dx else x
            y = fn(xs)[..., dy:dy + H, dx:dx + W]
            acc = y if acc is None else acc + y
    return acc / (s * s)


def _hash32(v: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values."""
    v = v & _M32
    v = v ^ (v >> 16)
    v = (v * 0x7FEB352D) & _M32
    v = v ^ (v >> 15)
    v = (v * 0x846CA68B) & _M32
    return v ^ (v >> 16)


def r3_uniform(seed: int, round_: int, shape, origin=(0, 0), device=None) -> torch.Tensor:
    """Uniform [0, 1) numbers for R3 round ``round_`` over a (B, C, h, w) window whose top-left
    pixel sits at ``origin`` in the whole image. A pure function of position."""
    B, C, h, w = shape
    y0, x0 = origin
    kw = dict(device=device, dtype=torch.int64)
    b = torch.arange(B, **kw).view(B, 1, 1, 1)
    c = torch.arange(C, **kw).view(1, C, 1, 1)
    y = torch.arange(y0, y0 + h, **kw).view(1, 1, h, 1)
    x = torch.arange(x0, x0 + w, **kw).view(1, 1, 1, w)
    key = _hash32(torch.tensor(seed * 1_000_003 + round_, **kw))
    v = _hash32(_hash32(_hash32(b * 8191 + c + key) + y) ^ x)
    return v.to(torch.float64).div_(2.0 ** 32).to(torch.float32)


# --- the 8 flips/rotations (dihedral group), each with its inverse ---------------------------

def transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """k in 0..7: rotate by 90°·(k mod 4), then flip left-right if k ≥ 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def inverse_transform(x: torch.Tensor, k: int) -> torch.Tensor:
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, -(k % 4), dims=(-2, -1))


def self_ensemble(fn: Callable[[torch.Tensor, int], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Average of ``inverse_k(fn(transform_k(x), k))`` over the 8 flips/rotations."""
    acc = None
    for k in range(8):
        y = inverse_transform(fn(transform(x, k), k), k)
        acc = y if acc is None else acc + y
    return acc / 8


# --- tiling --------------------------------------------------------------------------------

def tile_starts(size: int, tile: int) -> list[int]:
    return list(range(0, size, tile))


def tiled(fn: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor], x: torch.Tensor, tile: int,
          overlap: int, multiple: int = 1) -> torch.Tensor:
    """Apply ``fn(window, origin)`` on overlapping windows of x and stitch the cores.

    The image is cut into cores of ``tile``×``tile``; each is processed with ``overlap`` extra
    pixels of context on every side (clipped at the image border) and only its core is kept.
    ``tile`` and ``overlap`` are rounded up to multiples of ``multiple`` so every window starts on
    the same phase (PD needs this). Where ``overlap`` covers the receptive field of ``fn``, the
    result equals ``fn(x, (0, 0))``.
    """
    if tile <= 0 or overlap < 0:
        raise ValueError(f"tile must be positive and overlap non-negative, got {tile}, {overlap}")
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    tile, overlap = up(tile), up(overlap)
    H, W = x.shape[-2:]
    out = None
    for y0 in tile_starts(H, tile):
        for x0 in tile_starts(W, tile):
            y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
            ey0, ex0 = max(y0 - overlap, 0), max(x0 - overlap, 0)
            ey1, ex1 = min(y1 + overlap, H), min(x1 + overlap, W)
            res = fn(x[..., ey0:ey1, ex0:ex1], (ey0, ex0))
            if out is None:
                out = x.new_zeros(*res.shape[:-2], H, W, dtype=res.dtype)
            out[..., y0:y1, x0:x1] = res[..., y0 - ey0:y1 - ey0, x0 - ex0:x1 - ex0]
    return out
