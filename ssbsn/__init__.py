"""SS-BSN: self-supervised blind-spot denoising with nonlocal self-similarity.

    >>> from ssbsn import SSBSN, SSAttention
    >>> model = SSBSN()                       # the paper's configuration
    >>> loss = (model(noisy) - noisy).abs().mean()   # self-supervised training forward
    >>> clean = model.denoise(noisy)          # PD-2 + R3 inference
"""
from .attention import SSAttention, ss_attention
from .checkpoint import CheckpointError
from .model import SSBSN
from .nn import BSN

__version__ = "0.1.0"
__all__ = ["BSN", "CheckpointError", "SSAttention", "SSBSN", "ss_attention"]
