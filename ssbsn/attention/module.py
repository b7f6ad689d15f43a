"""``SSAttention``: the thin nn.Module over the functional API."""
from __future__ import annotations

import torch
from torch import nn

from .functional import ss_attention


class SSAttention(nn.Module):
    """Self-similarity attention inside grids of period ``grid`` (γ·d). Returns ``x + attention(x)``.

    Args:
        channels: C, the number of input channels.
        grid: g, the period of the grid; pixels sharing row and column phase mod g attend
            to each other.
        fused: use the fused kernels (Triton on CUDA, a memory-efficient path on CPU).
        group_stats: LayerNorm statistics per attention group instead of per image, which makes
            the blind spot exact (the authors' checkpoints use per-image statistics).
        embed: width E of the shared Q/K projection (default C).
        deterministic: bitwise-repeatable gradients from the fused Triton kernels.
    """

    def __init__(self, channels: int, grid: int, fused: bool = False, group_stats: bool = False,
                 embed: int | None = None, deterministic: bool = False):
        super().__init__()
        self.channels, self.grid = channels, grid
        self.fused, self.group_stats = fused, group_stats
        self.deterministic = deterministic
        self.wqk = nn.Parameter(torch.empty(channels, embed or channels))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.wqk, gain=1.414)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = "fused" if self.fused else "reference"
        return ss_attention(x, self.wqk, self.grid, group_stats=self.group_stats, backend=backend,
                            deterministic=self.deterministic)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, grid={self.grid}, embed={self.wqk.shape[1]}, "
                f"fused={self.fused}, group_stats={self.group_stats}")
