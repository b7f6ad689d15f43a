"""The network's estimate: one call of the blind-spot network (PD and R3) and the wrappers
around it — self-ensemble, shifted-PD ensemble and tiling — each a function that takes a call
and returns a call of the same form, ``f(x, view) -> y`` (:data:`Call`), so that they compose:

    >>> f = pd_r3(model, stride=2, r3=True, seed=0)     # the one network call
    >>> f = self_ensembled(f)                          # 8 flips/rotations
    >>> f = shift_ensembled(f, 2)                      # the stride² pixel shifts
    >>> y = tiled_call(f, tile=256, overlap=64, multiple=2)(x, View())

:func:`network_estimate` composes them as an :class:`ssbsn.config.InferenceConfig` says.
A :class:`View` tells the call where its window lies in the whole image and in which
orientation: R3's random field is a hash of (seed, round, batch, channel, global row, global
column) rather than a stream from a generator, so a tile draws exactly the numbers the whole
image would at those pixels: tiled inference of a model with a finite receptive field equals
untiled inference, R3 included.

The model is used through its parts (``forward``, ``bsn``, ``r3_T``, ``r3_p``, ``pd_pad``);
this module does not import :mod:`ssbsn.model`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

_M32 = 0xFFFFFFFF


class View(NamedTuple):
    """Where a call's input lies: the global position of its top-left pixel (in the frame of
    the untransformed image) and its orientation k in 0..7 (:func:`transform`)."""
    origin: tuple[int, int] = (0, 0)
    k: int = 0


Call = Callable[[torch.Tensor, View], torch.Tensor]


def shift_offsets(s: int, latin: bool = False) -> list[tuple[int, int]]:
    """The pixel shifts (dy, dx) of the shifted-PD ensemble at stride s: all s² of them, or with
    ``latin`` the s shifts (i, (s − i) mod s) of a Latin square — every PD row phase and
    every column phase once, at a third (s = 3) of the cost."""
    if latin:
        return [(i, (s - i) % s) for i in range(s)]
    return [(dy, dx) for dy in range(s) for dx in range(s)]


def shift_ensemble(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, s: int,
                   latin: bool = False) -> torch.Tensor:
    """Average of ``fn`` over the pixel shifts (dy, dx) of :func:`shift_offsets` (x reflect-padded
    at the top/left, cropped back): with all s² shifts every pixel takes each of the s² PD
    phases once, which removes the PD checkerboard and averages s² different blind-spot
    estimates; ``latin`` takes s of them."""
    if s <= 1:
        return fn(x)
    H, W = x.shape[-2:]
    mode = "reflect" if min(H, W) > s else "replicate"
    offsets = shift_offsets(s, latin)
    acc = None
    for dy, dx in offsets:
        xs = torch.nn.functional.pad(x, (dx, 0, dy, 0), mode=mode) if dy or dx else x
        y = fn(xs)[..., dy:dy + H, dx:dx + W]
        acc = y if acc is None else acc + y
    return acc / len(offsets)


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


# --- the composable calls ------------------------------------------------------------------

def pd_r3(model, stride: int, r3: bool, seed: int) -> Call:
    """The one network call: PD with ``stride`` → BSN → inverse PD, then R3's ``model.r3_T``
    rounds (each replaces a ``model.r3_p`` share of the pixels by the noisy ones and runs the
    BSN without PD) when ``r3``. Orientation k draws R3's field with seed ``seed + 7919·k``."""
    def call(x: torch.Tensor, view: View) -> torch.Tensor:
        return _pd_r3_once(model, x, r3, seed + 7919 * view.k, view.origin, view.k, stride)
    return call


def _pd_r3_once(model, x: torch.Tensor, r3: bool, seed: int, origin, k: int, b: int
                ) -> torch.Tensor:
    """PD-b denoising and R3 of one image in orientation k (x is already transformed)."""
    p = model.pd_pad
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, (-W) % b, 0, (-H) % b))
    first = model.forward(xp, pd=b)
    if not r3:
        return first[..., :H, :W]
    # the uniform field lives in the untransformed frame at global coordinates
    H0, W0 = (W, H) if k % 2 else (H, W)
    mode = "reflect" if min(xp.shape[-2:]) > p else "replicate"
    acc = torch.zeros_like(first)
    for t in range(model.r3_T):
        u = transform(r3_uniform(seed, t, (x.shape[0], x.shape[1], H0, W0), origin,
                                 x.device), k)
        u = F.pad(u, (0, (-W) % b, 0, (-H) % b), value=1.0)
        mixed = torch.where(u < model.r3_p, xp, first)
        y = model.bsn(F.pad(mixed, (p, p, p, p), mode=mode) if p else mixed)
        acc += y[..., p:y.shape[-2] - p, p:y.shape[-1] - p] if p else y
    return (acc / model.r3_T)[..., :H, :W]


def self_ensembled(f: Call) -> Call:
    """``f`` averaged over the 8 flips/rotations (:func:`self_ensemble`); orientation k is
    passed on in the view."""
    def call(x: torch.Tensor, view: View) -> torch.Tensor:
        return self_ensemble(lambda img, k: f(img, View(view.origin, k)), x)
    return call


def shift_ensembled(f: Call, stride: int, latin: bool = False) -> Call:
    """``f`` averaged over the pixel shifts of :func:`shift_ensemble` (all stride² of them, or
    the stride of a Latin square)."""
    def call(x: torch.Tensor, view: View) -> torch.Tensor:
        return shift_ensemble(lambda img: f(img, view), x, stride, latin)
    return call


def tiled_call(f: Call, tile: int, overlap: int, multiple: int = 1) -> Call:
    """``f`` on overlapping windows, the cores stitched (:func:`tiled`); each window's view
    carries its global origin."""
    def call(x: torch.Tensor, view: View) -> torch.Tensor:
        y0, x0 = view.origin
        return tiled(lambda w, o: f(w, View((y0 + o[0], x0 + o[1]), view.k)), x, tile,
                     overlap, multiple)
    return call


def estimate_call(model, stride: int, config, latin: bool = False) -> Call:
    """The network's estimate at PD ``stride`` as ``config`` (an
    :class:`ssbsn.config.InferenceConfig`) composes it: the PD/R3 call, inside the
    self-ensemble, inside the shifted-PD ensemble (``latin``: its Latin-square subset),
    inside the tiles."""
    f = pd_r3(model, stride, config.r3, config.seed)
    if config.self_ensemble:
        f = self_ensembled(f)
    if config.shifts:
        f = shift_ensembled(f, stride, latin)
    if config.tile:
        f = tiled_call(f, config.tile, config.overlap, multiple=stride)
    return f


def network_estimate(model, x: torch.Tensor, stride: int, config, latin: bool = False
                     ) -> torch.Tensor:
    """The network's estimate of x (B, C, H, W) at PD ``stride``: :func:`estimate_call`."""
    return estimate_call(model, stride, config, latin)(x, View())
