"""SS-Attention through ``torch.nn.functional.scaled_dot_product_attention``: the memory-efficient
CPU path (and the loud fallback of the fused backend), with the reference's numerics.

The grouped view is the reference's (pad, pixel-unshuffle by phase, tokens), with the groups of
a sample as the heads of a (B, g², N, ·) batch. Differences from the reference are only the ones
that leave the result unchanged: the softmax's "+1" is dropped (shift invariance) and the logits
are scaled by ``scale=1/√E`` inside SDPA. Padded tokens have y = 0, hence q = 0 and q̂ = 0/(0+ε) = 0:
as keys they get logit 0 (the reference's 1/√E minus the dropped 1/√E) and value 0, exactly as
in the reference. No N×N matrix is materialised by this code; on CPU, SDPA's flash kernel tiles
it forward and backward (it needs E = C, otherwise SDPA picks its math kernel, which does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .reference import NORM_EPS, check_inputs, from_groups, layer_norm, to_groups


def _normalized_queries(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool
                        ) -> torch.Tensor:
    """q̂ = q/(‖q‖ + 1e-8), q = LN(x)·W, grouped (B·g², N, E); padded tokens are exactly 0.

    Two guards that change nothing in exact arithmetic: the normalisation runs in fp32 for
    fp16/bf16 inputs (in fp16, 1e-8 rounds to 0 and padded tokens would get 0/0 = NaN), and q̂
    is multiplied by the real-token mask, so that padded tokens (constants) receive no gradient
    (dq = dq̂/(0 + 1e-8) would overflow fp16 and turn into 0·inf = NaN in dW)."""
    B, C, H, W = x.shape
    y = layer_norm(x, grid, group_stats)
    q = to_groups(y, grid) @ w.to(y.dtype)
    qf = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
    qh = (qf / (torch.linalg.vector_norm(qf, dim=-1, keepdim=True) + NORM_EPS)).to(q.dtype)
    if H % grid or W % grid:
        mask = to_groups(torch.ones(1, 1, H, W, device=x.device, dtype=qh.dtype), grid)
        qh = (qh.view(B, grid * grid, -1, qh.shape[-1]) * mask).view_as(qh)
    return qh


def ss_attention_sdpa(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool = False
                      ) -> torch.Tensor:
    """Return ``x + attention(x)`` (SPEC.md steps 1-6), differentiable in x and w."""
    check_inputs(x, w)
    B, C, H, W = x.shape
    E = w.shape[1]
    g2 = grid * grid
    q = _normalized_queries(x, w, grid, group_stats)
    v = to_groups(x, grid)
    N = q.shape[1]
    q = q.view(B, g2, N, E)
    out = F.scaled_dot_product_attention(q, q, v.view(B, g2, N, C), scale=1.0 / math.sqrt(E))
    return x + from_groups(out.reshape(B * g2, N, C), B, H, W, grid)
