"""The dilated blind-spot network (BSN) without pixel-shuffle downsampling.

head: 1×1 conv in→C, ReLU → two branches (dilation 2 and 3) → concat (2C) →
tail: 1×1 2C→C, ReLU, 1×1 C→C/2, ReLU, 1×1 C/2→C/2, ReLU, 1×1 C/2→out.

A branch with dilation d: central-masked conv (kernel 2d−1, centre absent), ReLU, 1×1, ReLU,
1×1, ReLU, then ``num_modules`` blocks — D-ConvBlocks, the last ``ss_blocks`` of them SS-Blocks
with grid γ·d — then 1×1, ReLU. The Sequential indices match the authors' (``branch1.body.12``
is the first SS-Block of the default model).
"""
from __future__ import annotations

import torch
from torch import nn

from ..attention import SSAttention
from ..attention.common import check_window
from .blocks import DConvBlock, SSBlock
from .conv import CentralMaskedConv2d, DilatedConv2d, conv2d_relu, cpu_inference
from .strips import forward_in_strips


def run_layers(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``layers(x)``, each convolution followed by a ReLU run as one call
    (:func:`ssbsn.nn.conv.conv2d_relu`: fused on the CPU inference path, the two in turn
    elsewhere)."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU):
            if isinstance(m, (CentralMaskedConv2d, DilatedConv2d)):
                x = m(x, relu=True)
            else:
                x = conv2d_relu(x, m.weight, m.bias, padding=m.padding[0], dilation=m.dilation[0])
            i += 2
        else:
            x = m(x)
            i += 1
    return x


class Branch(nn.Module):
    def __init__(self, dilation: int, channels: int, num_modules: int, ss_blocks: int, gamma: int,
                 *, backend: str = "fused", group_stats: bool = False,
                 conv_backend: str = "torch", deterministic: bool = False,
                 window: int | None = None):
        super().__init__()
        if num_modules < 1:
            raise ValueError(f"num_modules must be at least 1, got {num_modules}")
        if not 0 <= ss_blocks <= num_modules:
            raise ValueError(f"ss_blocks must lie in 0..num_modules ({num_modules}), got "
                             f"{ss_blocks}")
        self.dilation = dilation
        layers: list[nn.Module] = [
            CentralMaskedConv2d(channels, channels, 2 * dilation - 1, backend=conv_backend),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1), nn.ReLU(),
            nn.Conv2d(channels, channels, 1), nn.ReLU(),
        ]
        for i in range(num_modules):
            if i < num_modules - ss_blocks:
                layers.append(DConvBlock(channels, dilation, conv_backend=conv_backend))
            else:
                layers.append(SSBlock(channels, dilation, gamma * dilation, backend=backend,
                                      group_stats=group_stats, conv_backend=conv_backend,
                                      deterministic=deterministic, window=window))
        layers += [nn.Conv2d(channels, channels, 1), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_layers(self.body, x)


class BSN(nn.Module):
    """The blind-spot network: output at a pixel does not depend on the input at that pixel.

    ``backend``: SS-Attention's (:data:`ssbsn.config.BACKENDS`); ``fused`` is its older
    spelling (True = "fused", False = "reference"). ``window``: SS-Attention's bounded scope
    in pixels (None: whole-map groups)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 3, base_channels: int = 128,
                 num_modules: int = 9, ss_blocks: int = 3, gamma: int = 2, dilations=(2, 3), *,
                 backend: str | None = None, group_stats: bool = False,
                 conv_backend: str = "torch", deterministic: bool = False,
                 fused: bool | None = None, window: int | None = None):
        super().__init__()
        backend = backend or ("reference" if fused is False else "fused")
        if base_channels % 2:
            raise ValueError(f"base_channels must be even, got {base_channels}")
        C = base_channels
        self.head = nn.Sequential(nn.Conv2d(in_channels, C, 1), nn.ReLU())
        opts = dict(backend=backend, group_stats=group_stats, conv_backend=conv_backend,
                    deterministic=deterministic, window=window)
        # named branch1, branch2, ... as in the authors' layout
        for i, d in enumerate(dilations, start=1):
            self.add_module(f"branch{i}", Branch(d, C, num_modules, ss_blocks, gamma, **opts))
        self.num_branches = len(dilations)
        #: CPU inference a strip of rows at a time (:mod:`ssbsn.nn.strips`)
        self.strips = True
        self.tail = nn.Sequential(
            nn.Conv2d(C * len(dilations), C, 1), nn.ReLU(),
            nn.Conv2d(C, C // 2, 1), nn.ReLU(),
            nn.Conv2d(C // 2, C // 2, 1), nn.ReLU(),
            nn.Conv2d(C // 2, out_channels, 1),
        )

    def branches(self) -> list[Branch]:
        return [getattr(self, f"branch{i}") for i in range(1, self.num_branches + 1)]

    def set_attention_window(self, window: int | None) -> None:
        """Change every SS-Attention's scope (the weights are the same for any window)."""
        for m in self.modules():
            if isinstance(m, SSAttention):
                check_window(window)
                m.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = cpu_inference(x)  # channels_last on the CPU inference path (ssbsn.nn.conv)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
            if self.strips:
                return forward_in_strips(self, x).contiguous()
        x = run_layers(self.head, x)
        y = run_layers(self.tail, torch.cat([b(x) for b in self.branches()], dim=1))
        return y.contiguous() if fast else y
