"""SS-Attention through ``torch.nn.functional.scaled_dot_product_attention``: the memory-efficient
CPU path (and the loud fallback of the fused backend), with the reference's numerics.

The grouped view (pad, pixel-unshuffle by phase, tokens) and q̂ come from ``common.py``, with the
groups of a sample as the heads of a (B, g², N, ·) batch. Differences from the reference are only the ones
that leave the result unchanged: the softmax's "+1" is dropped (shift invariance) and the logits
are scaled by ``scale=1/√E`` inside SDPA. Padded tokens have y = 0, hence q = 0 and q̂ = 0/(0+ε) = 0:
as keys they get logit 0 (the reference's 1/√E minus the dropped 1/√E) and value 0, exactly as
in the reference. No N×N matrix is materialised by this code; on CPU, SDPA's flash kernel tiles
it forward and backward (it needs E = C, otherwise SDPA picks its math kernel, which does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (check_inputs, check_window, from_groups, from_window_groups, is_windowed,
                     normalized_queries, softmax_scale, to_groups, to_window_groups,
                     window_queries)


def ss_attention_sdpa(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool = False,
                      window: int | None = None) -> torch.Tensor:
    """Return ``x + attention(x)`` (docs/ss_attention.md, steps 1-6), differentiable in x and w.
    ``window``: the bounded scope in pixels (None: whole-map groups); each block of equally
    sized windows is one SDPA call with the windows as its heads."""
    check_inputs(x, w)
    check_window(window)
    B, C, H, W = x.shape
    E = w.shape[1]
    if is_windowed(H, W, grid, window):
        outs = []
        for qb, vb in zip(window_queries(x, w, grid, window, group_stats),
                          to_window_groups(x, grid, window)):
            ob = F.scaled_dot_product_attention(qb[None], qb[None], vb[None],
                                                scale=softmax_scale(E))
            outs.append(ob[0])
        return x + from_window_groups(outs, B, H, W, grid, window)
    g2 = grid * grid
    q = normalized_queries(x, w, grid, group_stats)
    v = to_groups(x, grid)
    N = q.shape[1]
    q = q.view(B, g2, N, E)
    out = F.scaled_dot_product_attention(q, q, v.view(B, g2, N, C), scale=softmax_scale(E))
    return x + from_groups(out.reshape(B * g2, N, C), B, H, W, grid)
