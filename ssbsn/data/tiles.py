"""Cutting large training images into overlapping tiles (``ssbsn prep``): faster loading, as
the authors prepare SIDD (512×512 tiles overlapping by 128 pixels)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from ..images import icc_profile, read_image, split_alpha, write_image
from .folder import list_images
from .sidd import is_sidd_medium, scan_sidd_medium


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The centre size×size square of an (H, W, C) image (smaller sides stay whole), its first
    three channels, contiguous."""
    h, w = img.shape[:2]
    s = min(size, h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.ascontiguousarray(img[y:y + s, x:x + s, :3])


def tile_origins(n: int, size: int, step: int) -> list[int]:
    """Start offsets of ``size``-long tiles every ``step`` along ``n``; the last tile ends at
    ``n`` (it overlaps its neighbour more when ``step`` does not divide the length)."""
    starts = list(range(0, max(n - size, 0) + 1, step))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


def check_tile_size(size: int, overlap: int) -> None:
    if size < 8 or not 0 <= overlap < size:
        raise UserError("--size must be ≥ 8 and 0 ≤ --overlap < --size")


def prep_inputs(inputs) -> list[Path]:
    """The images named by ``inputs`` (files, folders searched recursively, or one SIDD Medium
    root: its NOISY images)."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and is_sidd_medium(inputs[0]):
        return [n for n, _ in scan_sidd_medium(inputs[0])]
    return list_images(inputs, recursive=True)


def write_tiles(files, out, size: int = 512, overlap: int = 128, progress: bool | None = False
                ) -> int:
    """Cut every image of ``files`` into size×size tiles overlapping by ``overlap`` pixels,
    written to the folder ``out`` as ``<stem>_<y>_<x>.png`` (``.tif`` for 16-bit/float), with
    the image's ICC profile. Returns the number of tiles. ``progress``: a bar per image (None:
    on a terminal)."""
    from tqdm import tqdm
    check_tile_size(size, overlap)
    out = Path(out)
    count = 0
    for f in tqdm(files, desc="prep", unit="img",
                  disable=None if progress is None else not progress):
        img = split_alpha(read_image(f))[0]
        h, w = img.shape[:2]
        if min(h, w) < size:
            raise UserError(f"{f}: {h}×{w} is smaller than --size {size}")
        step = size - overlap
        suffix = ".tif" if img.dtype != np.uint8 else ".png"
        icc = icc_profile(f)
        for y in tile_origins(h, size, step):
            for x in tile_origins(w, size, step):
                write_image(out / f"{f.stem}_{y:05d}_{x:05d}{suffix}",
                            img[y:y + size, x:x + size], icc_profile=icc)
                count += 1
    return count
