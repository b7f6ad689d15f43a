"""SS-Attention in plain PyTorch (docs/ss_attention.md, steps 1-6): the oracle.

Every fast backend is tested against this function. It follows the authors' numerics exactly:
image-wide LayerNorm (no affine, eps 1e-5), zero padding to a multiple of the grid *after*
normalisation (padded tokens are keys with q̂ = 0 and value 0), one shared Q=K projection,
cosine logits (1 + cos) / sqrt(E), softmax per grid group, A·V with V the raw input. It
materialises the N×N matrix of every group, as the authors' code does.

The pieces (LayerNorm, grouping, q̂) are the ones every path shares, from ``common.py``, so the
math is said once. The independent check of them is the loop-by-loop fp64 reading of the
definition in tests/test_attention_reference.py, which shares no code with this package.
"""
from __future__ import annotations

import math

import torch

from .common import (check_grid, check_inputs, check_window, from_groups, from_window_groups,
                     is_windowed, layer_norm, normalize, to_groups, to_window_groups,
                     window_layer_norm)


def ss_attention_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    grid: int,
    *,
    group_stats: bool = False,
    window: int | None = None,
) -> torch.Tensor:
    """Return ``x + attention(x)`` for x of shape (B, C, H, W) and the shared Q/K matrix w (C, E).

    ``window``: the bounded scope (pixels; docs/ss_attention.md): groups are one grid phase
    inside one window; None: the whole map."""
    check_inputs(x, w)
    check_grid(grid)
    check_window(window)
    B, C, H, W = x.shape
    if is_windowed(H, W, grid, window):
        outs = []
        for yb, vb in zip(window_layer_norm(x, grid, window, group_stats),
                          to_window_groups(x, grid, window)):
            q = normalize(yb @ w.to(yb.dtype))
            attn = torch.softmax((1.0 + q @ q.transpose(1, 2)) / math.sqrt(w.shape[1]), dim=-1)
            outs.append(attn @ vb)
        return x + from_window_groups(outs, B, H, W, grid, window)
    y = layer_norm(x, grid, group_stats)
    # q̂ in at least fp32, as autocast would: in fp16 the eps rounds to 0 and the padded tokens
    # (q = 0) would become 0/0
    q = normalize(to_groups(y, grid) @ w.to(y.dtype))
    logits = (1.0 + q @ q.transpose(1, 2)) / math.sqrt(w.shape[1])  # as the authors divide
    attn = torch.softmax(logits, dim=-1)
    out = attn @ to_groups(x, grid)
    return x + from_groups(out, B, H, W, grid)
