"""Pixel-shuffle downsampling (PD) and its inverse, as in AP-BSN.

PD with stride f splits an image into f² sub-images (pixels sharing row and column phase mod f),
zero-pads each by ``pad`` on every side, and tiles them into one (H + 2fp) × (W + 2fp) map.
Spatially correlated real noise becomes nearly independent across neighbouring pixels of a
sub-image, which is what a blind-spot network needs.

The tiled map has a flaw: the same position in two neighbouring sub-images is one pixel apart in
the image (sub-image (i, j + 1) holds the right-hand neighbours of sub-image (i, j)), so a
network whose receptive field spans a sub-image's period in the map — any SS-Attention, whose
groups span the whole map, and the convolutions once the sub-images are small — reads pixels
whose noise is correlated with the blind spot's. :func:`pd_down_batch` puts the sub-images into
the batch instead, where nothing reaches across them (``pd_layout="batch"``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_sides(H: int, W: int, f: int) -> None:
    if H % f or W % f:
        raise ValueError(f"PD stride {f} needs H and W multiples of {f}, got {H}×{W}")


def pd_down(x: torch.Tensor, f: int, pad: int = 0, value: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) → (B, C, H + 2·f·pad, W + 2·f·pad); H and W must be multiples of f."""
    B, C, H, W = x.shape
    _check_sides(H, W, f)
    h, w = H // f, W // f
    sub = F.pixel_unshuffle(x, f)  # (B, C·f·f, h, w), channel index c·f² + i·f + j
    if pad:
        sub = F.pad(sub, (pad, pad, pad, pad), value=value)
    sub = sub.view(B, C, f, f, h + 2 * pad, w + 2 * pad).permute(0, 1, 2, 4, 3, 5)
    return sub.reshape(B, C, f * (h + 2 * pad), f * (w + 2 * pad))


def pd_up(x: torch.Tensor, f: int, pad: int = 0) -> torch.Tensor:
    """Inverse of :func:`pd_down`: drops each sub-image's padding and re-interleaves."""
    B, C, Hf, Wf = x.shape
    if Hf % f or Wf % f:
        raise ValueError(f"inverse PD stride {f} needs a map whose sides are multiples of {f}")
    h, w = Hf // f, Wf // f
    sub = x.view(B, C, f, h, f, w).permute(0, 1, 2, 4, 3, 5).reshape(B, C * f * f, h, w)
    if pad:
        sub = sub[..., pad:h - pad, pad:w - pad]
    return F.pixel_shuffle(sub, f)


def pd_down_batch(x: torch.Tensor, f: int, pad: int = 0, value: float = 0.0) -> torch.Tensor:
    """(B, C, H, W) → (B·f², C, H/f + 2·pad, W/f + 2·pad): sub-image (i, j) of sample b is
    batch item b·f² + i·f + j. H and W must be multiples of f."""
    B, C, H, W = x.shape
    _check_sides(H, W, f)
    h, w = H // f, W // f
    sub = F.pixel_unshuffle(x, f).view(B, C, f * f, h, w).transpose(1, 2)
    sub = sub.reshape(B * f * f, C, h, w)
    return F.pad(sub, (pad, pad, pad, pad), value=value) if pad else sub


def pd_up_batch(x: torch.Tensor, f: int, pad: int = 0) -> torch.Tensor:
    """Inverse of :func:`pd_down_batch`."""
    Bf, C, hp, wp = x.shape
    if Bf % (f * f):
        raise ValueError(f"inverse PD stride {f} needs a batch that is a multiple of {f * f}")
    if pad:
        x = x[..., pad:hp - pad, pad:wp - pad]
    h, w = x.shape[-2:]
    sub = x.reshape(Bf // (f * f), f * f, C, h, w).transpose(1, 2).reshape(-1, C * f * f, h, w)
    return F.pixel_shuffle(sub, f)
