"""The BSN's CPU inference a strip of rows at a time.

Between two SS-Attentions the network is a chain of convolutions, ReLUs and residual sums: its
output rows [lo, hi) depend only on its input rows [lo − r, hi + r), r the sum of the
convolutions' radii (dilation · (k // 2)). Each such chain runs on strips of rows with r rows of
context on either side, each convolution zero-padding the strip's edges as it pads the map's;
where a strip's edge is a cut inside the map, the zeros reach at most r rows in, inside the
context, which is dropped. The result is the whole map's (up to the convolution's own rounding,
which does not depend on where the rows were cut). SS-Attention runs on the whole map between
the strips (its groups and the LayerNorm's statistics span it).

Why: a layer of a 12-megapixel map is hundreds of megabytes, freshly allocated (and faulted in)
for every layer and read back from memory by the next one; a strip's layers are a few megabytes
that stay in the cache and in the allocator's reused memory. The head and each branch's first
chain run in one pass of strips; the last SS-Block of each branch, the rest of the branch and the
tail in another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import DConvBlock, SSBlock

#: A strip's feature map (channels × rows × width × 4 bytes) is kept under this size: below
#: glibc's largest mmap threshold (32 MiB), so its memory is reused from strip to strip.
STRIP_BYTES = 12 << 20
#: At least this many rows per strip for each row of context (the context is computed twice).
MIN_ROWS_PER_CONTEXT = 4


def body_radius(block: DConvBlock) -> int:
    """Rows of context on each side that a D-ConvBlock's (or an SS-Block's) body needs."""
    return radius(block.conv1) + radius(block.conv2) + radius(block.conv3)


def radius(m: nn.Module) -> int:
    """Rows of context on each side that ``m``'s output needs."""
    if isinstance(m, SSBlock):
        raise TypeError("an SS-Block's attention spans the map")
    if isinstance(m, DConvBlock):
        return body_radius(m)
    if isinstance(m, nn.Conv2d):
        return m.dilation[0] * (m.kernel_size[0] // 2)
    if isinstance(m, nn.ReLU):
        return 0
    raise TypeError(f"no strip rule for {type(m).__name__}")


@dataclass
class BranchPlan:
    """A branch as a chain before its first SS-Block, then each SS-Block with the chain after
    it (``posts``: (block, following modules, radius of block body + those modules))."""
    pre: list[nn.Module]
    posts: list[tuple[SSBlock, list[nn.Module], int]] = field(default_factory=list)

    @property
    def pre_radius(self) -> int:
        return sum(radius(m) for m in self.pre)


def branch_plan(body: nn.Sequential) -> BranchPlan:
    pre: list[nn.Module] = []
    posts: list[list] = []
    for m in body:
        if isinstance(m, SSBlock):
            posts.append([m, [], body_radius(m)])
        elif posts:
            posts[-1][1].append(m)
            posts[-1][2] += radius(m)
        else:
            pre.append(m)
    return BranchPlan(pre, [tuple(p) for p in posts])


def strip_rows(channels: int, width: int, context: int) -> int:
    """Rows per strip: at most :data:`STRIP_BYTES` of a ``channels``-channel float32 map
    ``width`` wide, at least :data:`MIN_ROWS_PER_CONTEXT` per row of context."""
    by_size = STRIP_BYTES // max(1, 4 * channels * width)
    return max(1, by_size, MIN_ROWS_PER_CONTEXT * context)


def _empty_channels_last(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """An uninitialised channels_last map of ``like``'s type (allocated in that layout: a
    ``.contiguous()`` of a new NCHW tensor would copy a whole map of garbage)."""
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=torch.channels_last)


def in_strips(fn, inputs: list[torch.Tensor], context: int, rows: int,
              rows_only: bool = False) -> list[torch.Tensor]:
    """``fn(*inputs)`` (a tensor or a tuple of them) on the whole map, computed on strips of
    ``rows`` rows with ``context`` rows on either side (``fn`` a chain of radius at most
    ``context``); a list of channels_last maps. ``rows_only``: ``fn(a, b)`` takes the strip's
    rows [a, b) and reads its inputs itself (``inputs[0]`` then gives only the map's size)."""
    B, _, H, W = inputs[0].shape
    outs = None
    for lo in range(0, H, rows):
        hi = min(H, lo + rows)
        a, b = max(0, lo - context), min(H, hi + context)
        ys = fn(a, b) if rows_only else fn(*[t[:, :, a:b] for t in inputs])
        ys = ys if isinstance(ys, tuple) else (ys,)
        if outs is None:
            outs = [_empty_channels_last(y, B, y.shape[1], H, W) for y in ys]
        for out, y in zip(outs, ys):
            out[:, :, lo:hi] = y[:, :, lo - a:hi - a]
    return outs


class AttentionRows:
    """An SS-Attention with a bounded scope read a strip at a time: the rows a strip asks for
    are computed a row of windows at a time (:func:`ssbsn.attention.sdpa.windowed_rows`, with
    the whole map's LayerNorm statistics) and kept until the strips have moved past them, so
    the attention's output is never a whole map. Strips must ask for rows in order."""

    def __init__(self, attn, z: torch.Tensor):
        from ..attention.common import layer_norm_stats, window_tokens
        self.attn, self.z = attn, z
        self.side = window_tokens(attn.window, attn.grid) * attn.grid
        self.stats = None if attn.group_stats else layer_norm_stats(z)
        self.buf, self.lo = z[:, :, :0], 0

    @staticmethod
    def applies(attn, z: torch.Tensor) -> bool:
        """Whether ``attn`` on ``z`` is windowed SDPA (the CPU path of "fused" and "sdpa")."""
        from ..attention.common import is_windowed
        return (attn.backend in ("fused", "sdpa") and attn.window is not None
                and is_windowed(z.shape[-2], z.shape[-1], attn.grid, attn.window))

    def rows(self, a: int, b: int) -> torch.Tensor:
        """``z + attention(z)``, rows [a, b)."""
        from ..attention.sdpa import windowed_rows
        H, hi = self.z.shape[-2], self.lo + self.buf.shape[-2]
        if b > hi:
            lo = a // self.side * self.side
            start = max(hi, lo)
            end = min(H, -(-b // self.side) * self.side)
            B, C, _, W = self.z.shape
            new = _empty_channels_last(self.z, B, C, end - lo, W)
            if start > lo:
                new[:, :, :start - lo] = self.buf[:, :, lo - self.lo:]
            windowed_rows(self.z, self.attn.wqk, self.attn.grid, self.attn.window,
                          self.attn.group_stats, self.stats, start, end, new[:, :, start - lo:])
            self.buf, self.lo = new, lo
        return self.buf[:, :, a - self.lo:b - self.lo]


def _post(block: SSBlock, follow: list[nn.Module], a: torch.Tensor, z: torch.Tensor):
    from .bsn import run_layers
    return run_layers(follow, z + block.body(a))


def forward_in_strips(bsn, x: torch.Tensor) -> torch.Tensor:
    """``bsn(x)`` on the CPU inference path (channels_last float32, no autograd), in strips."""
    from .bsn import run_layers
    plans = [branch_plan(b.body) for b in bsn.branches()]
    C, W = bsn.head[0].out_channels, x.shape[-1]

    def heads_and_pres(xs):
        h = run_layers(bsn.head, xs)
        return tuple(run_layers(p.pre, h) for p in plans)

    ctx = max(p.pre_radius for p in plans)
    zs = in_strips(heads_and_pres, [x], ctx, strip_rows(C * len(plans), W, ctx))
    atts: list[torch.Tensor | None] = []
    for i, p in enumerate(plans):
        for block, follow, r in p.posts[:-1]:
            a = block.attn(zs[i])
            zs[i] = in_strips(lambda a_, z_, b=block, f=follow: _post(b, f, a_, z_), [a, zs[i]],
                              r, strip_rows(C, W, r))[0]
        if not p.posts:
            atts.append(None)
        elif AttentionRows.applies(p.posts[-1][0].attn, zs[i]):
            atts.append(AttentionRows(p.posts[-1][0].attn, zs[i]))
        else:
            atts.append(p.posts[-1][0].attn(zs[i]))

    def branches_and_tail(a, b):
        outs = []
        for i, p in enumerate(plans):
            z_ = zs[i][:, :, a:b]
            if not p.posts:
                outs.append(z_)
                continue
            att = atts[i]
            att = att.rows(a, b) if isinstance(att, AttentionRows) else att[:, :, a:b]
            outs.append(_post(p.posts[-1][0], p.posts[-1][1], att, z_))
        return run_layers(bsn.tail, torch.cat(outs, dim=1))

    ctx = max((p.posts[-1][2] for p in plans if p.posts), default=0)
    return in_strips(branches_and_tail, [x], ctx, strip_rows(C * 2 * len(plans), W, ctx),
                     rows_only=True)[0]
