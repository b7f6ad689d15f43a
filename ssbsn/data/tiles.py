"""Cutting large training images into overlapping tiles (``ssbsn prep``): faster loading, as
the authors prepare SIDD (512×512 tiles overlapping by 128 pixels)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UsageError, UserError
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
    if size < 8:
        raise UsageError(f"--size must be at least 8, got {size}")
    if not 0 <= overlap < size:
        raise UsageError(f"--overlap must lie in 0..{size - 1} (below --size {size}), got "
                         f"{overlap}")


def _under(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def prep_inputs(inputs, exclude=None) -> list[Path]:
    """The images named by ``inputs`` (files, folders searched recursively, or one SIDD Medium
    root: its NOISY images). Images found inside the folder ``exclude`` (prep's output, which
    may lie inside an input folder) are left out, so a rerun never tiles the tiles."""
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    skip = Path(exclude).resolve() if exclude is not None else None
    if len(inputs) == 1 and Path(inputs[0]).is_dir() and is_sidd_medium(inputs[0]):
        return [n for n, _ in scan_sidd_medium(inputs[0]) if not _under(n, skip)]
    files = []
    for item in inputs:
        found = list_images(item, recursive=True)
        if Path(item).is_dir():
            found = [f for f in found if not _under(f, skip)]
            if not found:
                raise UserError(f"{item}: no images found outside the output folder {exclude}")
        files.extend(found)
    unique = {}
    for f in files:  # one file named twice (a file and its folder) is tiled once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _tile_names(f: Path, shape, size: int, overlap: int, suffix: str) -> list:
    h, w = shape[:2]
    step = size - overlap
    return [(y, x, f"{f.stem}_{y:05d}_{x:05d}{suffix}")
            for y in tile_origins(h, size, step) for x in tile_origins(w, size, step)]


def plan_tiles(files, out, size: int, overlap: int, overwrite: bool = False) -> dict:
    """Check every input's header and every output name before anything is written: each
    image at least ``size`` a side, no two tiles with the same name (inputs of the same name
    from different folders), no existing tile replaced without ``overwrite``, no input
    replaced at all. Returns {file: (H, W, C)} from the headers."""
    from ..images import image_shape
    check_tile_size(size, overlap)
    out = Path(out)
    inputs = {Path(f).resolve() for f in files}
    shapes, owner = {}, {}
    for f in files:
        f = Path(f)
        shape = image_shape(f)
        h, w = shape[:2]
        if min(h, w) < size:
            raise UserError(f"{f}: {h}×{w} is smaller than --size {size}")
        shapes[f] = shape
        for _, _, name in _tile_names(f, shape, size, overlap, ".png"):
            if name in owner and owner[name] != f:
                raise UserError(f"{f} and {owner[name]} would both write the tile {name} "
                                "(same file name); rename one or prepare them separately")
            owner[name] = f
        for suffix in (".png", ".tif"):  # 8-bit tiles are PNG, 16-bit and float TIFF
            for _, _, name in _tile_names(f, shape, size, overlap, suffix):
                dst = out / name
                if dst.exists() or dst.is_symlink():
                    if dst.resolve() in inputs:
                        raise UserError(f"{dst} is an input; it is never replaced by a tile")
                    if not overwrite:
                        raise UserError(f"{dst} exists; use --overwrite to replace it")
    return shapes


def write_tiles(files, out, size: int = 512, overlap: int = 128, progress: bool | None = False,
                overwrite: bool = False) -> int:
    """Cut every image of ``files`` into size×size tiles overlapping by ``overlap`` pixels,
    written to the folder ``out`` as ``<stem>_<y>_<x>.png`` (``.tif`` for 16-bit/float), with
    the image's ICC profile. Returns the number of tiles. ``progress``: a bar per image (None:
    on a terminal).

    All or nothing: every input and output name is checked first (:func:`plan_tiles`; existing
    tiles are replaced only with ``overwrite``), the tiles are written to a hidden folder in
    ``out`` and moved into place only when every input has been cut, so an unreadable input
    leaves ``out`` as it was."""
    import shutil
    import tempfile

    from tqdm import tqdm
    files = [Path(f) for f in files]
    shapes = plan_tiles(files, out, size, overlap, overwrite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ssbsn-prep.", dir=out))
    try:
        names = []
        for f in tqdm(files, desc="prep", unit="img",
                      disable=None if progress is None else not progress):
            img = split_alpha(read_image(f))[0]
            if img.shape[:2] != tuple(shapes[f][:2]):
                raise UserError(f"{f}: decodes to {img.shape[1]}×{img.shape[0]} pixels, not "
                                f"the {shapes[f][1]}×{shapes[f][0]} its header says")
            suffix = ".tif" if img.dtype != np.uint8 else ".png"
            icc = icc_profile(f)
            for y, x, name in _tile_names(f, img.shape, size, overlap, suffix):
                write_image(staging / name, img[y:y + size, x:x + size], icc_profile=icc)
                names.append(name)
        for name in names:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(names)
