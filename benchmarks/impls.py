"""The attention implementations being compared, and the shapes they are compared at.

Implementations (``IMPLS``), all computing SS-Attention's ``x + attention(x)`` unless noted:

* ``authors``        — the authors' formulation (benchmarks/authors.py), N×N per group.
* ``reference``      — ``ssbsn`` backend "reference" (plain PyTorch, N×N per group).
* ``sdpa``           — ``ssbsn`` backend "sdpa" (gather + SDPA, default dispatch), if present.
* ``fused``          — ``ssbsn`` backend "fused" (= triton on CUDA; on CPU it is sdpa → skipped).
* ``triton``         — ``ssbsn`` backend "triton" (the fused Triton kernels; CUDA only).
* ``fused[channels_last]``, ``triton[channels_last]`` — the same on channels_last inputs (the
  kernels' fast path: one token = C contiguous values); the others are timed on NCHW.
* ``gather+sdpa[K]`` — benchmark-local gather + ``F.scaled_dot_product_attention`` pinned to
  kernel K ∈ {flash, efficient, cudnn, math} with ``torch.nn.attention.sdpa_kernel``.
* ``gather+sdpa+compile`` — the same function (default dispatch) under ``torch.compile``.
* ``gather+flex``    — gather + compiled ``flex_attention`` (dense within each group).
* ``msa[explicit]`` / ``msa[sdpa]`` — the paper's baseline (Eq. 6): multi-head self-attention
  over *all* pixels with Q, K, V, O projections (head dim 64), explicit N×N or via SDPA.
* ``gather/scatter`` — only the data movement of the gather (to groups) and scatter (back):
  reported in GB/s.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from ssbsn.attention.common import (from_groups, normalized_queries, padded_size, softmax_scale,
                                   to_groups)

from .authors import authors_ss_attention

try:
    from ssbsn.attention import functional as _functional
except Exception:  # noqa: BLE001
    _functional = None


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class AttnShape:
    name: str
    B: int
    C: int
    H: int
    W: int
    g: int
    tags: tuple = ()

    @property
    def Hp(self) -> int:
        return padded_size(self.H, self.g)

    @property
    def Wp(self) -> int:
        return padded_size(self.W, self.g)

    @property
    def N(self) -> int:
        """tokens per group (padded)"""
        return (self.Hp // self.g) * (self.Wp // self.g)

    @property
    def groups(self) -> int:
        return self.B * self.g * self.g

    @property
    def tokens(self) -> int:
        return self.B * self.H * self.W

    def flops_fwd(self, family: str = "ss") -> float:
        """Kernel FLOPs of one forward: 4·N²·C per group (docs/ss_attention.md); MSA: one group of H·W."""
        if family == "msa":
            return 4.0 * (self.H * self.W) ** 2 * self.C * self.B
        return 4.0 * self.N ** 2 * self.C * self.groups

    def nxn_bytes(self, family: str, elt: int) -> float:
        """Bytes of one materialised attention matrix (all groups)."""
        if family == "msa":
            return float(self.B) * (self.H * self.W) ** 2 * elt * msa_heads(self.C)
        return float(self.groups) * self.N ** 2 * elt

    def id(self) -> str:
        return f"{self.name}-{self.B}x{self.C}x{self.H}x{self.W}-g{self.g}"


def shapes(size: str) -> list[AttnShape]:
    """The attention shapes of a bench size. Tags: train / sidd / large / sweep, smoke, compile
    (shapes on which the slow-to-compile implementations run)."""
    if size == "full":
        out = [
            AttnShape("train-g4", 4, 128, 140, 140, 4, ("train", "compile")),
            AttnShape("train-g6", 4, 128, 140, 140, 6, ("train", "compile")),
            AttnShape("sidd-g4", 1, 128, 264, 264, 4, ("sidd", "compile")),
            AttnShape("sidd-g6", 1, 128, 264, 264, 6, ("sidd",)),
            AttnShape("large-g4", 4, 128, 532, 532, 4, ("large", "compile")),
            AttnShape("large-g6", 4, 128, 532, 532, 6, ("large",)),
        ]
        for side in (64, 128, 256, 512, 1024):       # N = 256 … 65536 tokens per group
            out.append(AttnShape(f"sweep-N{(side // 4) ** 2}", 1, 128, side, side, 4,
                                 ("sweep", "compile")))
        return out
    # "small": CPU-sized (C=32/64, maps of 24-96 px). The real 1×128×264×264 CPU memory target
    # has its own case (test_bench_memory_target.py).
    out = [
        AttnShape("train-g4", 2, 64, 60, 60, 4, ("train", "compile")),
        AttnShape("train-g6", 2, 64, 60, 60, 6, ("train",)),
        AttnShape("sidd-g4", 1, 64, 80, 80, 4, ("sidd",)),
    ]
    for side in (32, 48, 64, 96):                    # N = 64 … 576 tokens per group
        out.append(AttnShape(f"sweep-N{(side // 4) ** 2}", 1, 32, side, side, 4, ("sweep",)))
    return out


def smoke_shape() -> AttnShape:
    """The tiny shape of the CI subset (``-m smoke``), in both sizes."""
    return AttnShape("tiny-g4", 1, 32, 24, 24, 4, ("smoke",))


def msa_heads(C: int) -> int:
    return max(1, C // 64)


# --------------------------------------------------------------------------- SS-Attention impls
def gather_attend_scatter(x: torch.Tensor, w: torch.Tensor, g: int,
                          attend: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]):
    """Gather tokens into (B, g², N, ·), attend(q̂, v, scale) per group, scatter back; q̂ and
    the grouping are the package's shared ones (``ssbsn.attention.common``). The "+1" of the
    logits is dropped (softmax is shift-invariant)."""
    B, C, H, W = x.shape
    q = normalized_queries(x, w, g)
    v = to_groups(x, g)
    G = g * g
    o = attend(q.view(B, G, q.shape[1], q.shape[2]), v.view(B, G, v.shape[1], C),
               softmax_scale(w.shape[1]))
    return x + from_groups(o.reshape(B * G, -1, C), B, H, W, g)


def _sdpa(q, v, scale):
    return F.scaled_dot_product_attention(q, q, v, scale=scale)


def gather_sdpa(x, w, g):
    return gather_attend_scatter(x, w, g, _sdpa)


SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


def pinned_sdpa(kernel: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, SDPA_KERNELS[kernel])

    def fn(x, w, g):
        with sdpa_kernel([backend]):
            return gather_sdpa(x, w, g)
    return fn


def _raise_recompile_limits() -> None:
    import torch._dynamo as dynamo
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 512))
    if hasattr(dynamo.config, "accumulated_recompile_limit"):
        dynamo.config.accumulated_recompile_limit = max(
            dynamo.config.accumulated_recompile_limit, 4096)


@functools.cache
def compiled_gather_sdpa():
    """gather_sdpa under torch.compile (built once per process)."""
    _raise_recompile_limits()
    return torch.compile(gather_sdpa, dynamic=False)


@functools.cache
def compiled_gather_flex():
    """gather + compiled flex_attention (built once per process)."""
    from torch.nn.attention.flex_attention import flex_attention
    _raise_recompile_limits()
    flex = torch.compile(flex_attention, dynamic=False)

    def attend(q, v, scale):
        return flex(q, q, v, scale=scale)

    def fn(x, w, g):
        return gather_attend_scatter(x, w, g, attend)
    return fn


def package_backend(name: str):
    def fn(x, w, g):
        return _functional.ss_attention(x, w, g, backend=name)
    return fn


def package_backends() -> tuple:
    return tuple(getattr(_functional, "BACKENDS", ())) if _functional is not None else ()


# --------------------------------------------------------------------------- MSA (Eq. 6)
def msa_params(C: int, device, dtype, requires_grad=False, seed=1):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ws = [(torch.randn(C, C, generator=gen) / math.sqrt(C)).to(device, dtype) for _ in range(4)]
    return [w.requires_grad_(requires_grad) for w in ws]


def _msa(x, ws, attend):
    wq, wk, wv, wo = ws
    B, C, H, W = x.shape
    h = msa_heads(C)
    t = x.flatten(2).transpose(1, 2)                         # (B, HW, C)

    def heads(z):
        return z.view(B, H * W, h, C // h).transpose(1, 2)   # (B, h, HW, d)
    o = attend(heads(t @ wq), heads(t @ wk), heads(t @ wv))
    o = o.transpose(1, 2).reshape(B, H * W, C) @ wo
    return x + o.transpose(1, 2).reshape(B, C, H, W)


def msa_explicit(x, ws, g=None):
    def attend(q, k, v):
        a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        return a @ v
    return _msa(x, ws, attend)


def msa_sdpa(x, ws, g=None):
    return _msa(x, ws, lambda q, k, v: F.scaled_dot_product_attention(q, k, v))


# --------------------------------------------------------------------------- gather/scatter
def gather_scatter(x, w, g):
    """Data movement only: the gather of x into groups and the scatter back."""
    B, C, H, W = x.shape
    return from_groups(to_groups(x, g), B, H, W, g)


def gather_scatter_bytes(s: AttnShape, elt: int) -> float:
    dense = s.B * s.C * s.H * s.W * elt
    grouped = s.B * s.C * s.Hp * s.Wp * elt
    return 2.0 * (dense + grouped)        # to_groups: read + write, from_groups: read + write


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Impl:
    name: str
    family: str = "ss"            # "ss" (vs reference), "msa" (vs msa[explicit]), "layout"
    materialises: bool = False    # stores the full N×N (used for the CPU OOM estimate)
    compiled: bool = False        # slow to compile: runs only on shapes tagged "compile"
    modes: tuple = ("fwd", "bwd", "fwdbwd")
    extra: dict = field(default_factory=dict)


IMPLS = [
    Impl("authors", materialises=True),
    Impl("reference", materialises=True),
    Impl("sdpa"),
    Impl("fused"),
    Impl("triton"),
    Impl("fused[channels_last]", extra={"layout": "channels_last"}),
    Impl("triton[channels_last]", extra={"layout": "channels_last"}),
    Impl("gather+sdpa[flash]"),
    Impl("gather+sdpa[efficient]"),
    Impl("gather+sdpa[cudnn]"),
    Impl("gather+sdpa[math]", materialises=True),
    Impl("gather+sdpa+compile", compiled=True),
    Impl("gather+flex", compiled=True),
    Impl("msa[explicit]", family="msa", materialises=True),
    Impl("msa[sdpa]", family="msa"),
    Impl("gather/scatter", family="layout", modes=("fwd",)),
]
IMPL_BY_NAME = {i.name: i for i in IMPLS}


CL_SUFFIX = "[channels_last]"


def base_name(impl: Impl) -> str:
    """The implementation without its input layout: "triton[channels_last]" → "triton" (the
    same code, timed on channels_last inputs — the fused kernels' fast path on a GPU)."""
    return impl.name[:-len(CL_SUFFIX)] if impl.name.endswith(CL_SUFFIX) else impl.name


def availability(impl: Impl, dev: torch.device) -> str | None:
    """None if the implementation can run on this machine, else the reason it cannot."""
    n = base_name(impl)
    cuda = dev.type == "cuda"
    if n in ("sdpa", "fused", "triton"):
        have = package_backends()
        if n not in have:
            return (f"ssbsn backend {n!r} not available yet "
                    f"(ssbsn.attention.functional.BACKENDS = {have})")
        if n == "triton" and not cuda:
            return ("Triton kernels need a CUDA device (on CPU only under TRITON_INTERPRET=1, "
                    "far too slow to benchmark)")
        if n == "fused" and not cuda:
            return "on CPU the 'fused' backend is the 'sdpa' backend (see the sdpa rows)"
        if n == "triton":
            try:
                import ssbsn.kernels  # noqa: F401
                import triton  # noqa: F401
            except Exception as e:  # noqa: BLE001
                return f"ssbsn.kernels/triton not importable: {type(e).__name__}: {e}"
    if n in ("gather+sdpa[efficient]", "gather+sdpa[cudnn]") and not cuda:
        return f"SDPA kernel {n[12:-1]!r} exists only on CUDA"
    if n == "gather+flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except Exception as e:  # noqa: BLE001
            return f"flex_attention not importable: {e}"
    return None


def mode_unsupported(impl: Impl, mode: str, dev: torch.device) -> str | None:
    if mode not in impl.modes:
        return f"{impl.name} is data movement only: timed in fwd mode"
    if impl.name == "gather+flex" and mode != "fwd" and dev.type == "cpu":
        return "FlexAttention has no backward on CPU (torch raises 'does not support backward on CPU')"
    return None


def unsupported_input(impl: Impl, x: torch.Tensor, w: torch.Tensor, g: int) -> str | None:
    """The Triton kernels' own verdict on an input (dtype, C, …), where they offer one."""
    if base_name(impl) != "triton" or x.device.type != "cuda":
        return None
    try:
        import ssbsn.kernels as kernels
    except Exception as e:  # noqa: BLE001
        return f"ssbsn.kernels not importable: {type(e).__name__}: {e}"
    fn = getattr(kernels, "unsupported_reason", None)
    return fn(x, w, g) if fn is not None else None


def build(impl: Impl) -> Callable:
    """fn(x, params, g) → output, where params is w (SS) or the 4 MSA matrices."""
    n = base_name(impl)
    if n == "authors":
        return authors_ss_attention
    if n in ("reference", "sdpa", "fused", "triton"):
        return package_backend(n)
    if n.startswith("gather+sdpa["):
        return pinned_sdpa(n[len("gather+sdpa["):-1])
    if n == "gather+sdpa+compile":
        return compiled_gather_sdpa()
    if n == "gather+flex":
        return compiled_gather_flex()
    if n == "msa[explicit]":
        return msa_explicit
    if n == "msa[sdpa]":
        return msa_sdpa
    if n == "gather/scatter":
        return gather_scatter
    raise KeyError(n)


def reference_fn(impl: Impl) -> Callable:
    """The oracle an implementation's results are checked against."""
    if impl.family == "msa":
        return msa_explicit
    return package_backend("reference") if _functional is not None else authors_ss_attention
