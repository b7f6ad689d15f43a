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
    warning that names the reason.
"""
from __future__ import annotations

import warnings

import torch

from ..config import BACKENDS
from .reference import ss_attention_reference
from .sdpa import ss_attention_sdpa



def _kernels():
    """``ssbsn.kernels`` or the reason it cannot be imported."""
    try:
        import ssbsn.kernels as kernels
    except Exception as e:  # triton missing or broken
        return None, f"ssbsn.kernels cannot be imported ({type(e).__name__}: {e})"
    return kernels, None


def ss_attention(x: torch.Tensor, w: torch.Tensor, grid: int, *, group_stats: bool = False,
                 backend: str = "reference", deterministic: bool = False) -> torch.Tensor:
    """Return ``x + attention(x)`` (docs/ss_attention.md, steps 1-6).

    ``deterministic`` (triton/fused on CUDA) makes the gradients bitwise repeatable; the other
    backends ignore it (their determinism is PyTorch's).
    """
    if backend == "reference":
        return ss_attention_reference(x, w, grid, group_stats=group_stats)
    if backend == "sdpa":
        return ss_attention_sdpa(x, w, grid, group_stats=group_stats)
    if backend == "triton":
        kernels, why = _kernels()
        if kernels is None:
            raise RuntimeError(f"backend='triton': {why}")
        return kernels.ss_attention(x, w, grid, group_stats=group_stats,
                                    deterministic=deterministic)
    if backend == "fused":
        if x.device.type == "cpu":
            return ss_attention_sdpa(x, w, grid, group_stats=group_stats)
        kernels, why = _kernels()
        if kernels is not None:
            why = kernels.unsupported_reason(x, w, grid)
            if why is None:
                return kernels.ss_attention(x, w, grid, group_stats=group_stats,
                                            deterministic=deterministic)
        warnings.warn(f"SS-Attention backend 'fused': the Triton kernels cannot run this input "
                      f"({why}); falling back to the SDPA path", RuntimeWarning, stacklevel=2)
        return ss_attention_sdpa(x, w, grid, group_stats=group_stats)
    raise ValueError(f"unknown SS-Attention backend {backend!r}; choose one of {BACKENDS}")
