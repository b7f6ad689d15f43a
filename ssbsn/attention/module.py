"""``SSAttention``: the thin nn.Module over the functional API."""
from __future__ import annotations

import torch
from torch import nn

from .common import check_grid, check_positive, check_window
from .functional import BACKENDS, ss_attention


class SSAttention(nn.Module):
    """Self-similarity attention inside grids of period ``grid`` (γ·d). Returns ``x + attention(x)``.

    Args:
        channels: C, the number of input channels.
        grid: g, the period of the grid; pixels sharing row and column phase mod g attend
            to each other.
        backend: any backend of :func:`ss_attention` (:data:`ssbsn.config.BACKENDS`):
            "fused" (default: the memory-efficient path, Triton kernels on CUDA, SDPA on CPU),
            "reference" (the N×N oracle; memory grows as N²), "sdpa" or "triton".
        fused: the older spelling: ``True`` = "fused", ``False`` = "reference"; ``backend``
            wins when both are given.
        group_stats: LayerNorm statistics per attention group instead of per image, which makes
            the blind spot exact (the authors' checkpoints use per-image statistics).
        embed: width E of the shared Q/K projection (default C).
        deterministic: bitwise-repeatable gradients from the fused Triton kernels.
        window: the bounded scope in pixels (groups are one grid phase inside one window of
            the map; the cost grows linearly with the area); None: whole-map groups.
    """

    def __init__(self, channels: int, grid: int, fused: bool | None = None,
                 group_stats: bool = False,
                 embed: int | None = None, deterministic: bool = False,
                 backend: str | None = None, window: int | None = None):
        super().__init__()
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown SS-Attention backend {backend!r}; choose one of {BACKENDS}")
        check_grid(grid)
        check_positive("channels", channels)
        if embed is not None:
            check_positive("embed", embed)
        self.channels, self.grid = channels, grid
        self.backend = backend or ("reference" if fused is False else "fused")
        self.fused, self.group_stats = self.backend != "reference", group_stats
        self.deterministic = deterministic
        check_window(window)
        self.window = window
        self.wqk = nn.Parameter(torch.empty(channels, embed or channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.wqk, gain=1.414)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ss_attention(x, self.wqk, self.grid, group_stats=self.group_stats,
                            backend=self.backend,
                            deterministic=self.deterministic, window=self.window)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, grid={self.grid}, embed={self.wqk.shape[1]}, "
                f"backend={self.backend}, group_stats={self.group_stats}, window={self.window}")
