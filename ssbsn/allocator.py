"""Large CPU tensors on transparent huge pages: one page fault per 2 MiB instead of per 4 KiB.

glibc serves an allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it when it is freed. A full-resolution feature map is far above that (16 channels of a
12-megapixel PD map: 768 MB), so every activation of every layer is fresh memory that the
kernel faults in and zeroes page by page; the network then spends most of its time there, and
more per pixel the larger the image (the quick model's pass: 4 µs per pixel at 512², 9-10 at
1024² and above). PyTorch backs CPU tensors of 2 MiB and more with transparent huge pages
(``madvise``) when ``THP_MEM_ALLOC_ENABLE=1`` is in the environment when it starts, which
makes the per-pixel cost flat. (Keeping freed blocks in glibc's heap instead, with
``mallopt``, is as fast but lets the heap grow without bound when tensors of one size are
allocated and freed in turn: PyTorch's 64-byte-aligned requests do not fit the block they
freed.)

:func:`use_huge_pages` is called by the ``ssbsn`` command before it imports PyTorch. A program
of one's own sets ``THP_MEM_ALLOC_ENABLE=1`` in its environment, or calls this first thing.
Where the kernel's transparent huge pages are off (``never``), nothing changes.
"""
from __future__ import annotations

import os
import sys

VAR = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the environment says otherwise. PyTorch reads it
    once, so this works only before ``import torch``. Returns whether it is in force."""
    if "torch" not in sys.modules:
        os.environ.setdefault(VAR, "1")
    return os.environ.get(VAR) == "1"
