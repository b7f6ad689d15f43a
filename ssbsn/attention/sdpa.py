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

from .common import (check_grid, check_inputs, check_window, from_groups, from_window_groups,
                     is_windowed, layer_norm_stats, normalize, normalized_queries,
                     scatter_window_groups, softmax_scale, to_groups, to_window_groups,
                     window_queries, window_tokens)

#: Pixels of the map taken at a time by the windowed CPU inference path (one row of windows,
#: as many windows across as fit): its gathered copies stay in the cache.
CHUNK_PIXELS = 16384


def ss_attention_sdpa(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool = False,
                      window: int | None = None) -> torch.Tensor:
    """Return ``x + attention(x)`` (docs/ss_attention.md, steps 1-6), differentiable in x and w.
    ``window``: the bounded scope in pixels (None: whole-map groups); each block of equally
    sized windows is one SDPA call with the windows as its heads."""
    check_inputs(x, w)
    check_grid(grid)
    check_window(window)
    B, C, H, W = x.shape
    E = w.shape[1]
    if is_windowed(H, W, grid, window):
        if x.device.type == "cpu" and not (torch.is_grad_enabled()
                                           and (x.requires_grad or w.requires_grad)):
            return _windowed_in_chunks(x, w, grid, window, group_stats)
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


def _windowed_in_chunks(x: torch.Tensor, w: torch.Tensor, grid: int, window: int,
                        group_stats: bool) -> torch.Tensor:
    """``x + attention(x)`` without autograd, a window-aligned chunk at a time
    (:func:`windowed_rows` over the whole map), the image-wide LayerNorm statistics from one
    pass over the map first."""
    out = torch.empty_like(x)
    stats = None if group_stats else layer_norm_stats(x)
    windowed_rows(x, w, grid, window, group_stats, stats, 0, x.shape[-2], out)
    return out


def windowed_rows(x: torch.Tensor, w: torch.Tensor, grid: int, window: int, group_stats: bool,
                  stats: tuple[torch.Tensor, torch.Tensor] | None, r0: int, r1: int,
                  out: torch.Tensor) -> None:
    """Rows [r0, r1) of ``x + attention(x)`` (r0 a multiple of the window's side in pixels,
    r1 one too or the map's height) into ``out`` (B, C, r1 − r0, W), without autograd, a
    chunk at a time: one row of windows, :data:`CHUNK_PIXELS` pixels, so that the gathered
    copies stay in the cache. The windows never cross a chunk's edge and ``stats`` are the
    whole map's LayerNorm statistics (:func:`layer_norm_stats`; None with ``group_stats``): the
    groups and their values are the whole map's. The LayerNorm is applied to the gathered
    values (the padded tokens' q̂ are then masked to 0, as they are 0 after LayerNorm-then-pad)."""
    B, C, H, W = x.shape
    side = window_tokens(window, grid) * grid
    cols = side * max(1, CHUNK_PIXELS // (side * side))
    scale = softmax_scale(w.shape[1])
    cl = x.is_contiguous(memory_format=torch.channels_last)
    for r in range(r0, r1, side):
        for c in range(0, W, cols):
            xc = x[:, :, r:r + side, c:c + cols]
            h, wd = xc.shape[-2:]
            vbs = to_window_groups(xc, grid, window)
            if group_stats:
                qbs = window_queries(xc, w, grid, window, True)
            else:
                mean, rstd = stats
                padded = h % grid or wd % grid
                masks = (to_window_groups(torch.ones(1, 1, h, wd, dtype=x.dtype), grid, window)
                         if padded else [None] * len(vbs))
                qbs = []
                for vb, mb in zip(vbs, masks):
                    yb = ((vb.view(B, -1, *vb.shape[1:]) - mean) * rstd).to(x.dtype)
                    qh = normalize(yb @ w.to(yb.dtype))
                    if padded:
                        qh = qh * mb.to(qh.dtype)
                    qbs.append(qh.view_as(vb[..., :qh.shape[-1]]))
            obs = [F.scaled_dot_product_attention(qb[None], qb[None], vb[None], scale=scale)[0]
                   for qb, vb in zip(qbs, vbs)]
            oc = out[:, :, r - r0:r - r0 + side, c:c + cols]
            if oc.stride(1) == 1 and oc.stride(3) == C and not (h % grid or wd % grid):
                # tokens laid out channel-innermost: straight into the output, then + x
                scatter_window_groups(obs, oc.permute(0, 2, 3, 1), h, wd, grid, window)
                oc.add_(xc)
            else:
                torch.add(xc, from_window_groups(obs, B, h, wd, grid, window, channels_last=cl),
                          out=oc)
