"""SS-Attention's shared pieces: the constants and the grouped view, said once.

Everything that computes SS-Attention uses this module: the oracle (``reference.py``), the
SDPA backend (``sdpa.py``), the fused kernels (``ssbsn.kernels``: the eps values reach the
kernels as ``tl.constexpr`` arguments from here), the attention maps
(``ssbsn/attention_map.py``), the benchmarks and the tests' yardsticks. The independent check
is the loop-by-loop fp64 reading of the definition in tests/test_attention_reference.py, which
shares no code with this module.

Math (per sample, per grid group of tokens sharing row and column phase mod g):
    y = LayerNorm(x)          no affine, eps LN_EPS, over (C, H, W) or over the group
    q = y·W,  q̂ = q/(‖q‖ + NORM_EPS)
    out = x + softmax((1 + q̂ q̂ᵀ)/√E) · x
Padding: the map is zero-padded bottom/right to multiples of g *after* the LayerNorm; padded
tokens are keys with q̂ = 0 (logit 1/√E) and value 0.

Bounded scope (``window``): a group is the tokens of one grid phase inside one window of the
padded map. Windows are T = ceil(window/g) tokens (T·g pixels) on a side, laid from the top-left
corner; the last window of a row or column holds what is left (so only the bottom/right windows
hold padded tokens). ``window=None`` is one window over the whole map: today's groups, by the
unchanged code paths. The windowed grouping returns *blocks*, at most four, each a batch of
equally sized windows (interior, right column, bottom row, corner), so every backend computes
without masks: group (b, window row, window column, a, c) of a block at index
((b·nr + r)·nc + k)·g² + a·g + c.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: LayerNorm's variance epsilon (the authors' ``nn.LayerNorm`` default).
LN_EPS = 1e-5
#: Added to ‖q‖ in q̂ = q/(‖q‖ + NORM_EPS); keeps padded tokens (q = 0) at q̂ = 0.
NORM_EPS = 1e-8


def padded_size(n: int, grid: int) -> int:
    """n rounded up to a multiple of the grid."""
    return -(-n // grid) * grid


def tokens_per_group(height: int, width: int, grid: int) -> int:
    """N: tokens of one grid group, padded ones included."""
    return (padded_size(height, grid) // grid) * (padded_size(width, grid) // grid)


def window_tokens(window: int | None, grid: int) -> int | None:
    """T, the tokens on a side of a window of ``window`` pixels (rounded up to whole grid cells);
    None for whole-map groups."""
    return None if window is None else -(-window // grid)


def check_positive(name: str, value) -> None:
    """One clear error for a size SS-Attention cannot take (a positive int): its grid factor,
    channels or embed width."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"SS-Attention's {name} must be a positive int, got {value!r}")


def check_grid(grid) -> None:
    check_positive("grid", grid)


def check_window(window) -> None:
    """One clear error for a window SS-Attention cannot take (None or a positive int)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"SS-Attention's window must be None or a positive number of pixels, "
                         f"got {window!r}")


def is_windowed(height: int, width: int, grid: int, window: int | None) -> bool:
    """Whether ``window`` splits the padded map into more than one window (otherwise the
    groups are the whole map's and every path takes its whole-map code)."""
    T = window_tokens(window, grid)
    return T is not None and (T < padded_size(height, grid) // grid
                              or T < padded_size(width, grid) // grid)


def window_spans(n: int, t: int) -> list[tuple[int, int, int]]:
    """The windows along one side of ``n`` tokens with ``t`` tokens each, as runs of
    (first token, number of windows, tokens per window): the full windows, then the rest."""
    full = n // t
    spans = [(0, full, t)] if full else []
    if n - full * t:
        spans.append((full * t, 1, n - full * t))
    return spans


def window_blocks(height: int, width: int, grid: int, window: int | None
                  ) -> list[tuple[int, int, int, int, int, int]]:
    """The blocks of the windowed grouping: (row0, nr, th, col0, nc, tw) in tokens of one
    phase: ``nr × nc`` windows of ``th × tw`` tokens starting at token (row0, col0)."""
    Ht, Wt = padded_size(height, grid) // grid, padded_size(width, grid) // grid
    T = window_tokens(window, grid)
    rows = window_spans(Ht, T or Ht)
    cols = window_spans(Wt, T or Wt)
    return [(r0, nr, th, c0, nc, tw) for r0, nr, th in rows for c0, nc, tw in cols]


def to_window_groups(t: torch.Tensor, grid: int, window: int | None) -> list[torch.Tensor]:
    """(B, C, H, W) → one (B·nr·nc·g², th·tw, C) tensor per block of :func:`window_blocks`,
    zero-padded bottom/right as :func:`to_groups`."""
    B, C, H, W = t.shape
    Hp, Wp = padded_size(H, grid), padded_size(W, grid)
    if (Hp, Wp) != (H, W):
        t = F.pad(t, (0, Wp - W, 0, Hp - H))
    v = t.view(B, C, Hp // grid, grid, Wp // grid, grid)
    out = []
    for r0, nr, th, c0, nc, tw in window_blocks(H, W, grid, window):
        blk = v[:, :, r0:r0 + nr * th, :, c0:c0 + nc * tw, :]
        blk = blk.reshape(B, C, nr, th, grid, nc, tw, grid).permute(0, 2, 5, 4, 7, 3, 6, 1)
        out.append(blk.reshape(B * nr * nc * grid * grid, th * tw, C))
    return out


def scatter_window_groups(blocks: list[torch.Tensor], dest: torch.Tensor, height: int,
                          width: int, grid: int, window: int | None) -> None:
    """Write the windowed grouping ``blocks`` of a (B, C, height, width) map into ``dest``, a
    (B, Hp, Wp, C) tensor (e.g. a channels_last map's permuted view; Hp, Wp: the padded size)."""
    C, g = dest.shape[-1], grid
    B, Hp, Wp = dest.shape[:3]
    d6 = dest.view(B, Hp // g, g, Wp // g, g, C)
    for blk, (r0, nr, th, c0, nc, tw) in zip(blocks, window_blocks(height, width, grid, window)):
        blk = blk.view(B, nr, nc, g, g, th, tw, C).permute(0, 1, 5, 3, 2, 6, 4, 7)
        d6[:, r0:r0 + nr * th, :, c0:c0 + nc * tw] = blk.reshape(B, nr * th, g, nc * tw, g, C)


def from_window_groups(blocks: list[torch.Tensor], batch: int, height: int, width: int,
                       grid: int, window: int | None, channels_last: bool = False
                       ) -> torch.Tensor:
    """Inverse of :func:`to_window_groups`, cropping the padding; ``channels_last``: the map
    in that memory format (the copy then moves whole tokens)."""
    C = blocks[0].shape[-1]
    Hp, Wp = padded_size(height, grid), padded_size(width, grid)
    g = grid
    if channels_last:
        out = blocks[0].new_empty(batch, Hp, Wp, C)
        scatter_window_groups(blocks, out, height, width, grid, window)
        return out.permute(0, 3, 1, 2)[:, :, :height, :width]
    out = blocks[0].new_empty(batch, C, Hp // g, g, Wp // g, g)
    for blk, (r0, nr, th, c0, nc, tw) in zip(blocks, window_blocks(height, width, grid, window)):
        blk = blk.view(batch, nr, nc, g, g, th, tw, C).permute(0, 7, 1, 5, 3, 2, 6, 4)
        out[:, :, r0:r0 + nr * th, :, c0:c0 + nc * tw, :] = blk.reshape(
            batch, C, nr * th, g, nc * tw, g)
    return out.view(batch, C, Hp, Wp)[:, :, :height, :width]


def layer_norm_stats(x: torch.Tensor, eps: float = LN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The image-wide LayerNorm's mean and 1/σ of each sample over (C, H, W), shaped
    (B, 1, 1, 1): LayerNorm(x) = (x − mean)·rstd, for a map taken a window-aligned part at
    a time (:func:`ssbsn.attention.sdpa.windowed_rows`)."""
    # one contiguous run per sample in either memory format, read in cache-sized pieces: the
    # mean first, then the squared deviations from it (each piece summed in at least fp32,
    # the pieces in fp64)
    flat = (x.permute(0, 2, 3, 1) if x.is_contiguous(memory_format=torch.channels_last)
            else x).reshape(x.shape[0], -1)
    acc = torch.promote_types(x.dtype, torch.float32)
    n, step = flat.shape[1], 1 << 16
    total = torch.zeros(flat.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, n, step):
        total += flat[:, i:i + step].to(acc).sum(1).double()
    mean = (total / n).to(acc)
    total.zero_()
    for i in range(0, n, step):
        d = flat[:, i:i + step].to(acc) - mean[:, None]
        total += torch.linalg.vecdot(d, d).double()
    rstd = torch.rsqrt(total / n + eps).to(acc)
    return mean.view(-1, 1, 1, 1), rstd.view(-1, 1, 1, 1)


def window_layer_norm(x: torch.Tensor, grid: int, window: int | None, group_stats: bool,
                      eps: float = LN_EPS) -> list[torch.Tensor]:
    """y = LayerNorm(x) in the windowed grouping (one tensor per block, padded tokens 0): the
    image-wide statistics, or with ``group_stats`` one mean/variance per windowed group over its
    real tokens and all channels (the blind spot stays exact)."""
    if not group_stats:
        return to_window_groups(F.layer_norm(x, x.shape[-3:], eps=eps), grid, window)
    B, C, H, W = x.shape
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    ones = torch.ones(1, 1, H, W, device=x.device, dtype=xf.dtype)
    out = []
    for xb, mb in zip(to_window_groups(xf, grid, window), to_window_groups(ones, grid, window)):
        xb = xb.view(B, -1, *xb.shape[1:])
        count = (mb.sum(dim=(1, 2)) * C).clamp_min(1)[None, :, None, None]
        m = xb.sum(dim=(2, 3), keepdim=True) / count
        var = (((xb - m) * mb) ** 2).sum(dim=(2, 3), keepdim=True) / count
        y = (xb - m) * torch.rsqrt(var + eps) * mb
        out.append(y.reshape(-1, *y.shape[2:]).to(x.dtype))
    return out


def window_queries(x: torch.Tensor, w: torch.Tensor, grid: int, window: int | None,
                   group_stats: bool = False) -> list[torch.Tensor]:
    """q̂ of every token in the windowed grouping (one (groups, N, E) tensor per block); padded
    tokens are exactly 0 and carry no gradient (see :func:`normalized_queries`)."""
    B, C, H, W = x.shape
    ones = torch.ones(1, 1, H, W, device=x.device, dtype=x.dtype)
    out = []
    for yb, mb in zip(window_layer_norm(x, grid, window, group_stats),
                      to_window_groups(ones, grid, window)):
        qh = normalize(yb @ w.to(yb.dtype))
        if H % grid or W % grid:
            qh = (qh.view(B, -1, *qh.shape[1:]) * mb.to(qh.dtype)).view_as(qh)
        out.append(qh)
    return out


def softmax_scale(embed: int) -> float:
    """1/√E, the logits' scale."""
    return 1.0 / math.sqrt(embed)


def check_inputs(x: torch.Tensor, w: torch.Tensor) -> None:
    """One clear error for inputs SS-Attention cannot take."""
    if x.dim() != 4:
        raise ValueError(f"SS-Attention expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    if w.dim() != 2 or w.shape[0] != x.shape[1]:
        raise ValueError(f"Q/K matrix of shape {tuple(w.shape)} does not fit {x.shape[1]} channels")
    if not (x.is_floating_point() and w.is_floating_point()):
        raise ValueError(f"SS-Attention takes floating-point tensors, got x {x.dtype} and the "
                         f"Q/K matrix {w.dtype}")


def group_layer_norm(x: torch.Tensor, grid: int, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm with one mean/variance per attention group (sample, row phase, column phase),
    over the group's real pixels and all channels (exact blind spot)."""
    B, C, H, W = x.shape
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    Hp, Wp = padded_size(H, grid), padded_size(W, grid)
    xp = F.pad(xf, (0, Wp - W, 0, Hp - H))
    ones = F.pad(torch.ones(1, 1, H, W, device=x.device, dtype=xf.dtype), (0, Wp - W, 0, Hp - H))
    xg = xp.view(B, C, Hp // grid, grid, Wp // grid, grid)  # phases: dims 3 and 5
    mg = ones.view(1, 1, Hp // grid, grid, Wp // grid, grid)
    count = (mg.sum(dim=(1, 2, 4)) * C).clamp_min(1)  # (1, g, g)
    m = (xg.sum(dim=(1, 2, 4)) / count)[:, None, None, :, None, :]
    var = (((xg - m) * mg) ** 2).sum(dim=(1, 2, 4)) / count
    y = (xg - m) * torch.rsqrt(var[:, None, None, :, None, :] + eps)
    return y.reshape(B, C, Hp, Wp)[:, :, :H, :W].to(x.dtype)


def layer_norm(x: torch.Tensor, grid: int, group_stats: bool = False, eps: float = LN_EPS):
    """Image-wide LayerNorm over (C, H, W), or with per-group statistics."""
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


def real_token_mask(height: int, width: int, grid: int, device=None, dtype=torch.float32
                    ) -> torch.Tensor:
    """(g², N, 1): 1 at real tokens, 0 at the padded ones."""
    return to_groups(torch.ones(1, 1, height, width, device=device, dtype=dtype), grid)


def normalize(q: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """q̂ = q/(‖q‖ + eps) over the last dim, computed in at least fp32 (in fp16, 1e-8 rounds to
    0 and a zero q would give 0/0) and returned in q's dtype."""
    qf = q.to(torch.promote_types(q.dtype, torch.float32))
    return (qf / (torch.linalg.vector_norm(qf, dim=-1, keepdim=True) + eps)).to(q.dtype)


def normalized_queries(x: torch.Tensor, w: torch.Tensor, grid: int, group_stats: bool = False
                       ) -> torch.Tensor:
    """q̂ of every token, grouped (B·g², N, E); padded tokens are exactly 0.

    The padded rows are multiplied by the real-token mask, which changes nothing in value but
    gives those constants no gradient (dq = dq̂/(0 + 1e-8) would overflow fp16 and turn into
    0·inf = NaN in dW)."""
    B, C, H, W = x.shape
    y = layer_norm(x, grid, group_stats)
    qh = normalize(to_groups(y, grid) @ w.to(y.dtype))
    if H % grid or W % grid:
        mask = real_token_mask(H, W, grid, x.device, qh.dtype)
        qh = (qh.view(B, grid * grid, -1, qh.shape[-1]) * mask).view_as(qh)
    return qh


def materialised_attention(x: torch.Tensor, w: torch.Tensor, grid: int,
                           group_stats: bool = False, per_group: bool = False) -> torch.Tensor:
    """``x + attention(x)`` with the N×N matrices in x's dtype, from :func:`normalized_queries`:
    the same-dtype yardstick of the kernels' accuracy rule (tests and ``benchmarks/gpu_check``).
    per_group: one group at a time under activation checkpointing (N = 17.7k tokens: 2.5 GB
    per fp64 N×N matrix)."""
    from torch.utils.checkpoint import checkpoint

    def one(q, v, scale):
        return torch.softmax((1.0 + q @ q.transpose(-1, -2)) * scale, dim=-1) @ v

    B, C, H, W = x.shape
    q = normalized_queries(x, w, grid, group_stats)
    v = to_groups(x, grid)
    scale = softmax_scale(w.shape[1])
    if per_group:
        out = torch.stack([checkpoint(one, q[i], v[i], scale, use_reentrant=False)
                           for i in range(q.shape[0])])
    else:
        out = one(q, v, scale)
    return x + from_groups(out, B, H, W, grid)
