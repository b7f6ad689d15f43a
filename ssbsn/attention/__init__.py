"""SS-Attention: reference, functional API and module."""
from .functional import ss_attention
from .module import SSAttention
from .reference import ss_attention_reference

__all__ = ["SSAttention", "ss_attention", "ss_attention_reference"]
