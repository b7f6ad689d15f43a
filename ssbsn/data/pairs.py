"""Paired (noisy, clean) datasets for evaluation: folders paired by file name, a folder holding
``noisy/`` and ``clean/``, SIDD validation block files (.mat) and SIDD Medium roots."""
from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..images import read_image, split_alpha
from .folder import paired_images
from .sidd import (SIDD_GT_KEYS, SIDD_NOISY_KEYS, is_sidd_medium, load_sidd_blocks,
                   scan_sidd_medium)


def sidd_clean_file(noisy: Path, clean: str | None) -> Path:
    """``clean`` if given, else the SIDD clean-block file beside the noisy one."""
    if clean:
        return Path(clean)
    for name in (noisy.name.replace("Noisy", "Gt"), "ValidationGtBlocksSrgb.mat"):
        c = noisy.with_name(name)
        if c != noisy and c.is_file():
            return c
    raise DataError(f"{noisy}: no clean blocks to compare with (no ValidationGtBlocksSrgb.mat "
                    "beside it); give CLEAN, the .mat file of the clean blocks")


def open_pairs(noisy, clean=None):
    """(names, loader) for a paired dataset; ``loader(i)`` → (noisy, clean) arrays as read
    (uint8/uint16/float, alpha removed).

    ``noisy``/``clean``: two folders paired by file name; one folder holding noisy/ and clean/;
    a SIDD validation .mat (the clean one beside it unless ``clean`` is given) or the folder
    holding both; or a SIDD Medium root."""
    n = Path(noisy)
    if n.is_dir() and (n / "ValidationNoisyBlocksSrgb.mat").is_file() and clean is None:
        n = n / "ValidationNoisyBlocksSrgb.mat"
    if n.suffix.lower() == ".mat":
        nb = load_sidd_blocks(n, (n.stem,) + SIDD_NOISY_KEYS)
        cb = load_sidd_blocks(sidd_clean_file(n, clean), (Path(clean).stem,) + SIDD_GT_KEYS
                              if clean else SIDD_GT_KEYS)
        if nb.shape != cb.shape:
            raise DataError(f"noisy blocks {nb.shape} and clean blocks {cb.shape} differ in shape")
        names = [f"{i:02d}_{k:02d}" for i in range(nb.shape[0]) for k in range(nb.shape[1])]
        m = nb.shape[1]
        return names, lambda i: (nb[i // m, i % m], cb[i // m, i % m])
    if n.is_dir() and clean is None and (n / "noisy").is_dir() and (n / "clean").is_dir():
        pairs = paired_images(n / "noisy", n / "clean")
    elif n.is_dir() and clean is None and is_sidd_medium(n):
        pairs = scan_sidd_medium(n)
    elif n.is_dir() and clean is not None:
        pairs = paired_images(n, Path(clean))
    else:
        raise DataError(f"{noisy}: not a paired dataset (give NOISY and CLEAN folders, a folder "
                        "with noisy/ and clean/, a SIDD validation .mat or a SIDD Medium root)")

    def load(i):
        a = split_alpha(read_image(pairs[i][0]))[0]
        b = split_alpha(read_image(pairs[i][1]))[0]
        if a.shape != b.shape:
            raise DataError(f"{pairs[i][0]} and {pairs[i][1]} differ in shape: "
                            f"{a.shape} vs {b.shape}")
        return a, b
    return [str(p[0]) for p in pairs], load
