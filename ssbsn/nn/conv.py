"""The blind-spot network's two convolutions, with a selectable backend.

* :class:`CentralMaskedConv2d` — a k×k convolution whose centre tap is absent from the
  computation: the forward uses ``weight * mask`` (out of place, the mask is a constant), so
  the centre never reaches the output and receives no gradient, whatever value it holds. The
  weight keeps the full k×k shape so that checkpoints stay compatible with the authors' layout
  and the parameter count is theirs.
* :class:`DilatedConv2d` — a 3×3 convolution with dilation d and padding d.

``backend="torch"`` uses ``F.conv2d`` (cuDNN on GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CONV_BACKENDS = ("torch",)


def _check_backend(backend: str) -> None:
    if backend not in CONV_BACKENDS:
        raise ValueError(f"unknown conv backend {backend!r}; choose one of {CONV_BACKENDS}")


def centre_mask(kernel_size: int, device=None, dtype=None) -> torch.Tensor:
    mask = torch.ones(kernel_size, kernel_size, device=device, dtype=dtype)
    mask[kernel_size // 2, kernel_size // 2] = 0
    return mask


def masked_conv2d(x, weight, bias=None, *, relu: bool = False, backend: str = "torch"):
    """Central-masked convolution, padding k//2: the centre tap of ``weight`` is ignored."""
    _check_backend(backend)
    k = weight.shape[-1]
    out = F.conv2d(x, weight * centre_mask(k, weight.device, weight.dtype), bias, padding=k // 2)
    return F.relu(out) if relu else out


def dilated_conv2d(x, weight, bias=None, *, dilation: int, relu: bool = False,
                   backend: str = "torch"):
    """3×3 convolution with dilation d and padding d (same size out)."""
    _check_backend(backend)
    out = F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)
    return F.relu(out) if relu else out


class CentralMaskedConv2d(nn.Conv2d):
    """k×k convolution (k odd), padding k//2, with the centre tap structurally excluded."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 backend: str = "torch"):
        if kernel_size % 2 != 1:
            raise ValueError(f"masked convolution needs an odd kernel size, got {kernel_size}")
        _check_backend(backend)
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.backend = backend
        with torch.no_grad():
            self.weight[:, :, kernel_size // 2, kernel_size // 2] = 0

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return masked_conv2d(x, self.weight, self.bias, relu=relu, backend=self.backend)


class DilatedConv2d(nn.Conv2d):
    """3×3 convolution with dilation d and padding d."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, *,
                 backend: str = "torch"):
        _check_backend(backend)
        super().__init__(in_channels, out_channels, 3, padding=dilation, dilation=dilation)
        self.backend = backend

    def forward(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return dilated_conv2d(x, self.weight, self.bias, dilation=self.dilation[0], relu=relu,
                              backend=self.backend)
