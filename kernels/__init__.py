"""Fused Triton kernels for SS-Attention (installed as ``ssbsn.kernels``).

``ss_attention(x, w, grid, *, group_stats=False, deterministic=False, window=None)`` returns
``x + attention(x)`` (``window``: the bounded scope in pixels; None: whole-map groups); it is
registered as the ``torch.library`` op ``ssbsn::ss_attention(x, w, grid, group_stats,
deterministic, window=0)`` (window 0: whole map; with its backward
``ssbsn::ss_attention_backward``), a differentiable ``torch.library.triton_op`` whose kernels
``torch.compile(fullgraph=True)`` traces and launches itself (docs/kernels.md, "Host path").
CUDA tensors run compiled kernels; CPU tensors run under Triton's interpreter when
TRITON_INTERPRET=1 was set before triton was imported (the op is then opaque to the compiler).
"""
from .ss_attention import INTERPRET, SUPPORTED_DTYPES, ss_attention, unsupported_reason

__all__ = ["INTERPRET", "SUPPORTED_DTYPES", "ss_attention", "unsupported_reason"]
