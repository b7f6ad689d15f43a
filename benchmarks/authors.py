"""The authors' SS-Attention formulation, re-implemented for benchmarking.

This is *our own* code following the sequence of operations of the official SS-BSN
implementation (``SSBlock._get_attention``), so that its speed and memory are what users of
that code pay: image-wide ``layer_norm``; zero pad bottom/right to a multiple of the grid;
a ``pixel_unshuffle``-based regrouping (channels folded into rows so the shuffle acts per
channel); ``torch.mm`` with the shared Q/K matrix over all tokens at once; L2 normalisation;
``bmm`` to the full N×N matrix; in-place ``+1`` and ``/√E``; softmax; ``bmm`` with the raw
input; ``pixel_shuffle`` back; crop; residual. No einops: the rearranges are views/reshapes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(t: torch.Tensor, f: int) -> torch.Tensor:
    h, w = t.shape[-2:]
    ph, pw = (-h) % f, (-w) % f
    if ph or pw:
        t = F.pad(t, (0, pw, 0, ph), mode="constant", value=0.0)
    return t


def _unshuffle_to_groups(t: torch.Tensor, f: int) -> torch.Tensor:
    """(b, c, h, w) → (b·f², c, h/f, w/f): channels folded into rows, pixel_unshuffle,
    unfolded again (group index k = row phase · f + column phase)."""
    b, c, h, w = t.shape
    t = t.reshape(b, 1, c * h, w)                       # 'b c h w -> b 1 (c h) w'
    t = F.pixel_unshuffle(t, f)                         # (b, f², c·h/f, w/f)
    t = t.reshape(b, f * f, c, h // f, w // f)          # 'b k (c h) w -> b (k c) h w'
    return t.reshape(b * f * f, c, h // f, w // f)      # 'b (f c) h w -> (b f) c h w'


def _shuffle_from_groups(t: torch.Tensor, b: int, c: int, f: int) -> torch.Tensor:
    """Inverse of :func:`_unshuffle_to_groups`: (b·f², c, sh, sw) → (b, c, sh·f, sw·f)."""
    sh, sw = t.shape[-2:]
    t = t.reshape(b, f * f, c * sh, sw)                 # 'b (f c) h w -> b f (c h) w'
    t = F.pixel_shuffle(t, f)                           # (b, 1, c·sh·f, sw·f)
    return t.reshape(b, c, sh * f, sw * f)              # 'b 1 (c h) w -> b c h w'


def authors_ss_attention(x: torch.Tensor, wqk: torch.Tensor, grid: int) -> torch.Tensor:
    """x + attention(x), the authors' sequence of operations (N×N materialised per group)."""
    b, c, h, w = x.shape
    e = wqk.shape[1]
    f = grid
    xx = F.layer_norm(x, x.shape[-3:])                  # eps 1e-5, no affine
    xx = _unshuffle_to_groups(_pad(xx, f), f)
    v = _unshuffle_to_groups(_pad(x, f), f)
    bf, _, sh, sw = xx.shape
    qk = xx.permute(0, 2, 3, 1).reshape(-1, c)          # 'b c h w -> (b h w) c'
    v = v.permute(0, 2, 3, 1).reshape(-1, c)
    qk = torch.mm(qk, wqk)
    qk = qk.reshape(bf, sh * sw, e)                     # '(b h w) k -> b (h w) k'
    v = v.reshape(bf, sh * sw, c)
    qk_norm = torch.linalg.norm(qk, dim=-1).unsqueeze(-1) + 1e-8
    qk = qk / qk_norm
    attn = torch.bmm(qk, qk.transpose(1, 2))
    attn += 1.0
    attn /= e ** 0.5
    attn = F.softmax(attn, dim=-1)
    out = torch.bmm(attn, v)
    out = out.reshape(bf, sh, sw, c).permute(0, 3, 1, 2)  # 'b (h w) e -> b e h w'
    out = _shuffle_from_groups(out, b, c, f)
    return x + out[:, :, :h, :w]
