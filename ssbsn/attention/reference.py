"""SS-Attention, said once in plain PyTorch (docs/ss_attention.md, steps 1-6).

This is the oracle every fast backend is tested against. It follows the authors' numerics
exactly: image-wide LayerNorm (no affine, eps 1e-5), zero padding to a multiple of the grid
*after* normalisation (padded tokens are keys with q̂ = 0 and value 0), one shared Q=K
projection, cosine logits (1 + cos) / sqrt(E), softmax per grid group, A·V with V the raw input.
It materialises the N×N matrix of every group, as the authors' code does.

The oracle is self-contained on purpose: it takes only the two constants (LN_EPS, NORM_EPS)
from ``common.py``; the grouping, the LayerNorm and q̂ are stated here again, independently of
the helpers the other backends share (``common.py``), so that a mistake there shows up as a
disagreement with this file.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .common import LN_EPS, NORM_EPS


def padded_size(n: int, grid: int) -> int:
    return -(-n // grid) * grid


def group_layer_norm(x: torch.Tensor, grid: int, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm with one mean/variance per attention group (sample, row phase, column phase),
    taken over the group's real pixels and all channels. With these statistics the output at a
    pixel cannot depend on the input at that pixel (exact blind spot)."""
    B, C, H, W = x.shape
    dt = x.dtype
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    Hp, Wp = padded_size(H, grid), padded_size(W, grid)
    xp = F.pad(xf, (0, Wp - W, 0, Hp - H))
    ones = F.pad(torch.ones(1, 1, H, W, device=x.device, dtype=xf.dtype), (0, Wp - W, 0, Hp - H))
    # (B, C, Hp/g, g, Wp/g, g): phases are dims 3 and 5
    xg = xp.view(B, C, Hp // grid, grid, Wp // grid, grid)
    mg = ones.view(1, 1, Hp // grid, grid, Wp // grid, grid)
    count = (mg.sum(dim=(1, 2, 4)) * C).clamp_min(1)  # (1, g, g)
    mean = xg.sum(dim=(1, 2, 4)) / count  # (B, g, g)
    m = mean[:, None, None, :, None, :]
    var = (((xg - m) * mg) ** 2).sum(dim=(1, 2, 4)) / count
    y = (xg - m) * torch.rsqrt(var[:, None, None, :, None, :] + eps)
    return y.reshape(B, C, Hp, Wp)[:, :, :H, :W].to(dt)


def layer_norm(x: torch.Tensor, grid: int, group_stats: bool = False, eps: float = LN_EPS):
    """Step 1: image-wide LayerNorm over (C, H, W), or per-group statistics."""
    if group_stats:
        return group_layer_norm(x, grid, eps)
    return F.layer_norm(x, x.shape[-3:], eps=eps)


def to_groups(t: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, C, H, W) → (B·g², N, C), zero-padded bottom/right; group (a, b) holds (a+g·i, b+g·j)."""
    B, C, H, W = t.shape
    Hp, Wp = padded_size(H, grid), padded_size(W, grid)
    t = F.pad(t, (0, Wp - W, 0, Hp - H))
    t = t.view(B, C, Hp // grid, grid, Wp // grid, grid).permute(0, 3, 5, 2, 4, 1)
    return t.reshape(B * grid * grid, (Hp // grid) * (Wp // grid), C)


def from_groups(t: torch.Tensor, batch: int, height: int, width: int, grid: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`, cropping the padding."""
    C = t.shape[-1]
    Hp, Wp = padded_size(height, grid), padded_size(width, grid)
    t = t.view(batch, grid, grid, Hp // grid, Wp // grid, C).permute(0, 5, 3, 1, 4, 2)
    return t.reshape(batch, C, Hp, Wp)[:, :, :height, :width]


def check_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    """One clear error for inputs SS-Attention cannot take."""
    if x.dim() != 4:
        raise ValueError(f"SS-Attention expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"Q/K matrix of shape {tuple(w.shape)} does not fit {x.shape[1]} channels")


def ss_attention_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    grid: int,
    *,
    group_stats: bool = False,
) -> torch.Tensor:
    """Return ``x + attention(x)`` for x of shape (B, C, H, W) and the shared Q/K matrix w (C, E)."""
    check_inputs(x, w)
    B, C, H, W = x.shape
    y = layer_norm(x, grid, group_stats)
    q = to_groups(y, grid) @ w.to(y.dtype)
    # normalise in at least fp32, as autocast would: in fp16 the 1e-8 rounds to 0 and the
    # padded tokens (q = 0) would become 0/0
    qf = q.to(torch.promote_types(q.dtype, torch.float32))
    q = (qf / (torch.linalg.vector_norm(qf, dim=-1, keepdim=True) + NORM_EPS)).to(q.dtype)
    logits = (1.0 + q @ q.transpose(1, 2)) / math.sqrt(w.shape[1])
    attn = torch.softmax(logits, dim=-1)
    out = attn @ to_groups(x, grid)
    return x + from_groups(out, B, H, W, grid)
