"""The blind-spot network's two convolutions, with a selectable backend.

* :class:`CentralMaskedConv2d` — a k×k convolution whose centre tap is absent from the
  computation: the forward uses ``weight * mask`` (out of place, the mask is a constant), so
  the centre never reaches the output and receives no gradient, whatever value it holds. The
  weight keeps the full k×k shape so that checkpoints stay compatible with the authors' layout
  and the parameter count is theirs.
* :class:`DilatedConv2d` — a 3×3 convolution with dilation d and padding d.

``backend="torch"`` uses ``F.conv2d`` (cuDNN on GPU). Inference on the CPU (float32, no
autograd; :func:`cpu_inference`) runs a convolution followed by a ReLU as one oneDNN call
(:func:`conv2d_relu`): the same arithmetic as the convolution and ``F.relu`` in turn on a
channels_last input, without the ReLU's pass over memory.

``backend="cuda"`` uses the CUDA extension in ``csrc/``: both convolutions as *tap*
convolutions, a list of (dy, dx) offsets — the masked k×k conv is the k²−1 offsets around the
centre (the centre tap is skipped, not multiplied by zero), the dilated conv the 9 offsets
d·(−1..1)², through the ``torch.library`` op ``ssbsn::tap_conv`` (:mod:`ssbsn.nn.conv_ops`:
fake kernels and autograd, so ``torch.compile`` traces it whole; weights packed once per
version). Implicit-GEMM kernels (tensor cores for fp16/bf16), fused bias + ReLU, NCHW or
channels_last, a deterministic weight gradient. fp32/fp16/bf16 tensors on a CUDA device;
under autocast, inputs are cast like ``F.conv2d`` does. ``SSBSN_CONV_ALGO=fma|wmma|auto``
picks the kernel family (auto: WMMA for fp16/bf16 on sm_80+, FMA otherwise).
:func:`conv_backend_info` says whether the extension is available and why not.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import _cuda_ext
from . import conv_ops  # noqa: F401 -- registers the ssbsn::tap_conv* ops
from ._cuda_ext import conv_backend_info

CONV_BACKENDS = ("torch", "cuda")
MAX_TAPS = 25  # csrc/conv_api.h kMaxTaps

__all__ = ["CONV_BACKENDS", "CentralMaskedConv2d", "DilatedConv2d", "centre_mask", "conv2d_relu",
           "conv_backend_info", "cpu_inference", "dilated_conv2d", "masked_conv2d"]


def _has_fused_conv_relu() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


_FUSED_CONV_RELU = _has_fused_conv_relu()


def cpu_inference(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the CPU inference path: a float32 CPU tensor with autograd and
    autocast off and oneDNN's fused convolution available. The network then runs in
    channels_last (oneDNN's native layout; NCHW inputs are reordered at every convolution)."""
    return (_FUSED_CONV_RELU and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"))


def conv2d_relu(x, weight, bias=None, padding: int = 0, dilation: int = 1):
    """``F.relu(F.conv2d(x, weight, bias, padding=padding, dilation=dilation))``: one oneDNN
    call with the ReLU as its post-op on the CPU inference path (:func:`cpu_inference`)."""
    if cpu_inference(x) and weight.dtype == torch.float32:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, [padding, padding], [1, 1], [dilation, dilation], 1, "relu", [], "")
    return F.relu(F.conv2d(x, weight, bias, padding=padding, dilation=dilation))


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
    if backend == "cuda":
        return _cuda_conv(x, weight, bias, _masked_taps(k), relu)
    w = weight * centre_mask(k, weight.device, weight.dtype)
    if relu:
        return conv2d_relu(x, w, bias, padding=k // 2)
    return F.conv2d(x, w, bias, padding=k // 2)


def dilated_conv2d(x, weight, bias=None, *, dilation: int, relu: bool = False,
                   backend: str = "torch"):
    """3×3 convolution with dilation d and padding d (same size out)."""
    _check_backend(backend)
    if backend == "cuda":
        return _cuda_conv(x, weight, bias, _dilated_taps(dilation), relu)
    if relu:
        return conv2d_relu(x, weight, bias, padding=dilation, dilation=dilation)
    return F.conv2d(x, weight, bias, padding=dilation, dilation=dilation)


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


# ----------------------------------------------------------------------------------------------
# backend="cuda"
# ----------------------------------------------------------------------------------------------
class _Taps:
    """A tap convolution: offsets (dy, dx) and their positions in the flattened k×k window."""

    def __init__(self, ksize: int, taps: list[tuple[int, int, int]]):
        self.ksize = ksize
        self.dy = tuple(t[0] for t in taps)
        self.dx = tuple(t[1] for t in taps)
        self.window = tuple(t[2] for t in taps)


def _masked_taps(k: int) -> _Taps:
    if k % 2 != 1 or not 1 < k * k - 1 <= MAX_TAPS:
        raise ValueError(f"conv backend 'cuda' supports masked kernels 3 and 5, got {k}")
    r = k // 2
    return _Taps(k, [(dy, dx, (dy + r) * k + dx + r)
                     for dy in range(-r, r + 1) for dx in range(-r, r + 1) if dy or dx])


def _dilated_taps(d: int) -> _Taps:
    if d < 1:
        raise ValueError(f"dilation must be positive, got {d}")
    return _Taps(3, [(d * i, d * j, (i + 1) * 3 + j + 1) for i in (-1, 0, 1) for j in (-1, 0, 1)])


def _algo_code(algo: str | None) -> int:
    name = os.environ.get("SSBSN_CONV_ALGO", "auto") if algo is None else algo
    if name not in _cuda_ext.ALGOS:
        raise ValueError(f"unknown conv algorithm {name!r}; choose one of {tuple(_cuda_ext.ALGOS)}")
    return _cuda_ext.ALGOS[name]


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _cuda_conv(x, weight, bias, taps: _Taps, relu: bool, algo: str | None = None):
    """The tap convolution on the extension; ``algo`` overrides ``SSBSN_CONV_ALGO``."""
    _cuda_ext.require_ops(x)  # a one-line error where the extension is missing
    code = _algo_code(algo)
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv backend 'cuda' takes a 4-D input and weight, got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1] or weight.shape[2] != taps.ksize or weight.shape[3] != taps.ksize:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit input {tuple(x.shape)} and kernel "
                         f"{taps.ksize}×{taps.ksize}")
    if x.shape[1] < 1 or weight.shape[0] < 1:
        raise ValueError("conv backend 'cuda' needs at least one input and one output channel")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} does not fit {weight.shape[0]} output channels")
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"input, weight and bias must share a dtype, got {x.dtype}, {weight.dtype} and "
                        f"{None if bias is None else bias.dtype}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"conv backend 'cuda' supports float32, float16 and bfloat16, got {x.dtype}")
    return torch.ops.ssbsn.tap_conv(x, weight, bias, list(taps.dy), list(taps.dx), list(taps.window),
                                    bool(relu), code)
