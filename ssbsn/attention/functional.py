"""The functional SS-Attention API: one entry, several backends.

``backend`` is one of ``"reference"`` (plain PyTorch, materialises N×N) — more backends are
added by the fused-attention work.
"""
from __future__ import annotations

import torch

from .reference import ss_attention_reference

BACKENDS = ("reference",)


def ss_attention(x: torch.Tensor, w: torch.Tensor, grid: int, *, group_stats: bool = False,
                 backend: str = "reference") -> torch.Tensor:
    """Return ``x + attention(x)`` (SPEC.md steps 1-6)."""
    if backend == "reference":
        return ss_attention_reference(x, w, grid, group_stats=group_stats)
    raise ValueError(f"unknown SS-Attention backend {backend!r}; choose one of {BACKENDS}")
