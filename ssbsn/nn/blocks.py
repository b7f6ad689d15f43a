"""The two modules of a branch: D-ConvBlock and SS-Block (docs/model.md).

    D-ConvBlock(x) = x + body(x),                 body = conv1×1 ∘ ReLU ∘ dconv ∘ ReLU ∘ dconv
    SS-Block(x)    = x + body(SSAttention(x)),    SSAttention(x) = x + attention(x)

Parameter names (conv1, conv2, conv3, and attn.wqk) follow the authors' layout, so their
checkpoints map one to one (``ssbsn.checkpoint``).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import SSAttention
from .conv import DilatedConv2d


class DConvBlock(nn.Module):
    def __init__(self, channels: int, dilation: int, *, conv_backend: str = "torch"):
        super().__init__()
        self.conv1 = DilatedConv2d(channels, channels, dilation, backend=conv_backend)
        self.conv2 = DilatedConv2d(channels, channels, dilation, backend=conv_backend)
        self.conv3 = nn.Conv2d(channels, channels, kernel_size=1)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x, relu=True), relu=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SSBlock(DConvBlock):
    def __init__(self, channels: int, dilation: int, grid: int, *, backend: str = "fused",
                 group_stats: bool = False, conv_backend: str = "torch",
                 deterministic: bool = False, window: int | None = None):
        super().__init__(channels, dilation, conv_backend=conv_backend)
        self.attn = SSAttention(channels, grid, group_stats=group_stats, backend=backend,
                                deterministic=deterministic, window=window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(self.attn(x))
