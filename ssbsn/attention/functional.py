"""The functional SS-Attention API: one entry, several backends (the vocabulary
:data:`ssbsn.config.BACKENDS`, shared by the module, the model, training and the CLI).

``backend``:
  * ``"reference"``: plain PyTorch, materialises every group's N×N matrix (the oracle).
  * ``"sdpa"``: the reference's numerics through ``scaled_dot_product_attention`` (no N×N
    matrix on CPU: SDPA's flash kernel); the CPU memory-efficient path.
  * ``"triton"``: the fused Triton kernels (``ssbsn.kernels``); CUDA tensors, or CPU tensors under
    Triton's interpreter (TRITON_INTERPRET=1). Raises if they cannot run the inputs.
  * ``"fused"``: ``"triton"`` for CUDA tensors when triton is importable and supports the
    dtype/shape, ``"sdpa"`` for CPU tensors; any other case falls back to ``"sdpa"`` with a
    warning that names the reason. One exception, by measurement: inside ``torch.compile`` and
    with groups of at most :data:`COMPILED_SDPA_MAX_TOKENS` tokens, ``"sdpa"`` (the compiler
    fuses its gather and normalisation around SDPA). On an H200 at the training shapes
    (4×128×140×140, g = 4 and 6: 1,225 and 576 tokens per group, bf16 fwd+bwd) the compiled
    SDPA chain took 1.45 and 1.38 ms against the kernels' 3.03 and 2.45 ms, of which ~2.3 ms was
    host time; "fused" inside torch.compile, so routed, took 1.22 and 1.44 ms
    (benchmarks/results/h200/). That was measured when the op was opaque to the compiler. With
    compiled kernels it is now a ``torch.library.triton_op``, so torch.compile (and its CUDA
    graphs) launch the kernels themselves: ``backend="triton"`` inside torch.compile keeps them
    at every size, and benchmarks/gpu_check.py times it ("triton+compile") beside the routed
    "fused" so that a GPU run decides whether the routing stays. At 4,356 tokens and above the
    kernels are used either way (5.4× faster than eager SDPA there).
"""
from __future__ import annotations

import warnings

import torch

from ..config import BACKENDS
from .common import check_grid, check_window, padded_size, tokens_per_group, window_tokens
from .reference import ss_attention_reference
from .sdpa import ss_attention_sdpa

#: Inside ``torch.compile``, backend "fused" on CUDA takes the SDPA formulation for groups of at
#: most this many tokens (see the module docstring for the measurement).
COMPILED_SDPA_MAX_TOKENS = 2048


def group_tokens(height: int, width: int, grid: int, window: int | None = None) -> int:
    """The most tokens one group holds (padded ones included), with or without a window."""
    T = window_tokens(window, grid)
    if T is None:
        return tokens_per_group(height, width, grid)
    return min(T, padded_size(height, grid) // grid) * min(T, padded_size(width, grid) // grid)


def compiled_prefers_sdpa(x: torch.Tensor, grid: int, deterministic: bool,
                          compiling: bool | None = None, window: int | None = None) -> bool:
    """Whether backend "fused" takes the SDPA formulation for ``x`` (see the module docstring).
    ``compiling`` defaults to ``torch.compiler.is_compiling()``; deterministic gradients always
    keep the kernels (their dW reduction order is fixed, SDPA's backward is not)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    return (compiling and not deterministic and x.dim() == 4
            and group_tokens(x.shape[-2], x.shape[-1], grid, window) <= COMPILED_SDPA_MAX_TOKENS)


def _kernels():
    """``ssbsn.kernels`` or the reason it cannot be imported."""
    try:
        import ssbsn.kernels as kernels
    except Exception as e:  # triton missing or broken
        return None, f"ssbsn.kernels cannot be imported ({type(e).__name__}: {e})"
    return kernels, None


def ss_attention(x: torch.Tensor, w: torch.Tensor, grid: int, *, group_stats: bool = False,
                 backend: str = "reference", deterministic: bool = False,
                 window: int | None = None) -> torch.Tensor:
    """Return ``x + attention(x)`` (docs/ss_attention.md, steps 1-6).

    ``window``: the bounded scope in pixels of x (docs/ss_attention.md, "Bounded scope"):
    groups are one grid phase inside one window, so the cost grows linearly with the area;
    None: whole-map groups (the paper's). ``deterministic`` (triton/fused on CUDA) makes the
    gradients bitwise repeatable; the other backends ignore it (their determinism is
    PyTorch's).
    """
    check_grid(grid)
    check_window(window)
    if backend == "reference":
        return ss_attention_reference(x, w, grid, group_stats=group_stats, window=window)
    if backend == "sdpa":
        return ss_attention_sdpa(x, w, grid, group_stats=group_stats, window=window)
    if backend == "triton":
        kernels, why = _kernels()
        if kernels is None:
            raise RuntimeError(f"backend='triton': {why}")
        return kernels.ss_attention(x, w, grid, group_stats=group_stats,
                                    deterministic=deterministic, window=window)
    if backend == "fused":
        if x.device.type == "cpu" or compiled_prefers_sdpa(x, grid, deterministic,
                                                           window=window):
            return ss_attention_sdpa(x, w, grid, group_stats=group_stats, window=window)
        kernels, why = _kernels()
        if kernels is not None:
            why = kernels.unsupported_reason(x, w, grid, window)
            if why is None:
                return kernels.ss_attention(x, w, grid, group_stats=group_stats,
                                            deterministic=deterministic, window=window)
        warnings.warn(f"SS-Attention backend 'fused': the Triton kernels cannot run this input "
                      f"({why}); falling back to the SDPA path", RuntimeWarning, stacklevel=2)
        return ss_attention_sdpa(x, w, grid, group_stats=group_stats, window=window)
    raise ValueError(f"unknown SS-Attention backend {backend!r}; choose one of {BACKENDS}")
