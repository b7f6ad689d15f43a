"""Network building blocks: the blind-spot convolutions, the blocks and the BSN."""
from .blocks import DConvBlock, SSBlock
from .bsn import BSN, Branch
from .conv import CentralMaskedConv2d, DilatedConv2d

__all__ = ["BSN", "Branch", "CentralMaskedConv2d", "DConvBlock", "DilatedConv2d", "SSBlock"]
