"""The lowpass step: the output keeps the noisy image's low frequencies
(:func:`restore_low_frequencies`). It transforms every network estimate (stage "estimate"),
the blend's second estimate included."""
from __future__ import annotations

import torch


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


class Lowpass:
    """Step of the ``lowpass`` setting (σ in pixels): :func:`restore_low_frequencies`."""
    stage = "estimate"

    def __call__(self, ctx, image: torch.Tensor, sigma: float) -> torch.Tensor:
        return restore_low_frequencies(ctx.noisy, image, sigma)
