"""Training data: image sources and random crops with flips and 90° rotations.

A *source* is a list of images: ``len(source)``, ``source.shape(i)`` (from the file header,
without decoding), ``source.load(i)`` → the whole image as float32 (H, W, C) in 0..255 (the
model's range) and ``source.crop(i, y, x, size)`` → the same numbers for one size×size window
only. :class:`PatchDataset` draws one random crop per item and applies one of the 8
flips/rotations.

Crops are cut before any conversion: the image stays in its stored sample type (uint8, uint16,
float) and only the crop becomes float32, so a crop of a 12-megapixel photo costs microseconds
once the image is decoded. :class:`FileSource` decodes each file once and keeps the decoded
images in a least-recently-used cache bounded in bytes (``cache_bytes``, per process: every
DataLoader worker holds its own); an uncompressed uint8/uint16 TIFF is memory-mapped instead
of read.

Randomness is a pure function of ``(seed, epoch, index)``: the crop of item i in epoch e is
the same whichever process or worker loads it and whenever it does. That is what makes a
resumed run, or a run split over several processes, see exactly the crops of an
uninterrupted single-process run.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from ..images import ImageError, image_shape, is_tiff, read_image, split_alpha, to_model_range
from .dnd import DNDBoxes, is_dnd
from .folder import list_images
from .sidd import DataError, is_sidd_medium, load_sidd_blocks, scan_sidd_medium


DEFAULT_CACHE_BYTES = int(float(os.environ.get("SSBSN_DATA_CACHE_MB", 2048)) * 2 ** 20)


class ArraySource:
    """Images held in memory (uint8, uint16 or float 0..1 arrays, (H, W) or (H, W, C))."""

    def __init__(self, images, names=None):
        self.images = [a[..., None] if a.ndim == 2 else a for a in (np.asarray(i) for i in images)]
        self.names = list(names) if names is not None else [f"#{i}" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def shape(self, i: int):
        return self.images[i].shape

    def native(self, i: int) -> np.ndarray:
        """Image ``i`` in its stored sample type, (H, W, C)."""
        return self.images[i]

    def load(self, i: int) -> np.ndarray:
        return to_model_range(self.native(i))

    def crop(self, i: int, y: int, x: int, size: int) -> np.ndarray:
        """``load(i)[y:y+size, x:x+size]``, converting the window only."""
        return to_model_range(self.native(i)[y:y + size, x:x + size])


class DecodedCache:
    """Decoded images by key, least recently used dropped first once their bytes pass
    ``budget`` (an image larger than the budget is not kept)."""

    def __init__(self, budget: int):
        self.budget, self.used = int(budget), 0
        self._items: OrderedDict = OrderedDict()

    def get(self, key):
        arr = self._items.get(key)
        if arr is not None:
            self._items.move_to_end(key)
        return arr

    def put(self, key, arr: np.ndarray) -> None:
        size = arr.nbytes if not isinstance(arr, np.memmap) else 0  # a map costs no memory
        if size > self.budget:
            return
        self._items[key] = arr
        self.used += size
        while self.used > self.budget:
            _, old = self._items.popitem(last=False)
            self.used -= old.nbytes if not isinstance(old, np.memmap) else 0

    def __len__(self) -> int:
        return len(self._items)


def _tiff_memmap(path: Path):
    """An uncompressed, contiguous uint8/uint16 TIFF as a read-only (H, W, C) memory map, or
    None (then it is decoded)."""
    import tifffile
    try:
        with tifffile.TiffFile(path) as tif:
            if len(tif.pages) != 1 or len(tif.series) != 1:
                return None
            page = tif.pages[0]
            if page.dtype not in (np.uint8, np.uint16) or not page.is_memmappable:
                return None
            planar = page.ndim == 3 and page.planarconfig == 2
        arr = tifffile.memmap(path, mode="r")
    except Exception:  # noqa: BLE001 -- anything unusual: the decoder reads it (and reports)
        return None
    if planar:
        arr = np.moveaxis(arr, 0, -1)
    return arr[..., None] if arr.ndim == 2 else arr


class FileSource(ArraySource):
    """Image files, read when needed and kept decoded up to ``cache_bytes`` (per process).
    Shapes are checked from the headers at construction."""

    def __init__(self, paths, cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.paths = [Path(p) for p in paths]
        self.names = [str(p) for p in self.paths]
        self._shapes = [image_shape(p) for p in self.paths]
        self.cache = DecodedCache(cache_bytes)

    def __len__(self) -> int:
        return len(self.paths)

    def shape(self, i: int):
        return self._shapes[i]

    def native(self, i: int) -> np.ndarray:
        arr = self.cache.get(i)
        if arr is None:
            path = self.paths[i]
            arr = _tiff_memmap(path) if is_tiff(path) else None
            if arr is None:
                arr = read_image(path)
            if tuple(arr.shape) != tuple(self._shapes[i]):
                raise ImageError(f"{path}: the pixels ({arr.shape}) do not match the header "
                                 f"({self._shapes[i]})")
            self.cache.put(i, arr)
        return arr

    def load(self, i: int) -> np.ndarray:
        colour, _ = split_alpha(self.native(i))
        return to_model_range(colour)

    def crop(self, i: int, y: int, x: int, size: int) -> np.ndarray:
        colour, _ = split_alpha(self.native(i)[y:y + size, x:x + size])
        return to_model_range(colour)


class DNDSource:
    """The DND benchmark's noisy boxes (self-supervised training on the test images, as the
    authors do for DND)."""

    def __init__(self, root):
        self.dnd = DNDBoxes(root)
        self.names = [f"{i:04d}_{k:02d}" for i, k, _, _ in self.dnd.entries]

    def __len__(self) -> int:
        return len(self.dnd)

    def shape(self, i: int):
        r0, c0, r1, c1 = self.dnd.entries[i][3]
        return (int(r1 - r0 + 1), int(c1 - c0 + 1), 3)

    def load(self, i: int) -> np.ndarray:
        return self.dnd.load(i) * np.float32(255.0)

    def crop(self, i: int, y: int, x: int, size: int) -> np.ndarray:
        return self.load(i)[y:y + size, x:x + size]  # a box is small (≤ 512×512)


def open_training_source(path, kind: str = "auto"):
    """(source, description) for ``path``: a folder or file list of noisy images, a SIDD
    Medium root, a SIDD block .mat file (noisy blocks), or a DND root.

    ``kind``: "auto" (detect), "folder", "sidd-medium", "sidd-mat" or "dnd".
    """
    paths = [Path(p) for p in (path if isinstance(path, (list, tuple)) else [path])]
    first = paths[0]
    if kind == "auto":
        if len(paths) == 1 and first.suffix.lower() == ".mat":
            kind = "sidd-mat"
        elif len(paths) == 1 and first.is_dir() and is_dnd(first):
            kind = "dnd"
        elif len(paths) == 1 and first.is_dir() and is_sidd_medium(first):
            kind = "sidd-medium"
        else:
            kind = "folder"
    if kind == "dnd" and not is_dnd(first):
        raise DataError(f"{first}: not a DND root (--kind dnd expects info.mat and "
                        "images_srgb/ in it)")
    if kind == "sidd-mat" and not (first.is_file() and first.suffix.lower() == ".mat"):
        raise DataError(f"{first}: not a SIDD block .mat file (--kind sidd-mat)")
    if kind == "sidd-mat":
        blocks = load_sidd_blocks(first)
        flat = blocks.reshape((-1,) + blocks.shape[2:])
        return ArraySource(list(flat)), f"SIDD blocks {first} ({len(flat)} blocks)"
    if kind == "dnd":
        src = DNDSource(first)
        return src, f"DND {first} ({len(src)} boxes)"
    if kind == "sidd-medium":
        pairs = scan_sidd_medium(first)
        return FileSource([n for n, _ in pairs]), f"SIDD Medium {first} ({len(pairs)} noisy images)"
    if kind == "folder":
        files = list_images(paths, recursive=True)
        return FileSource(files), f"{len(files)} images from {', '.join(map(str, paths))}"
    raise DataError(f"unknown data kind {kind!r} (auto, folder, sidd-medium, sidd-mat, dnd)")


def dihedral(arr: np.ndarray, k: int) -> np.ndarray:
    """k in 0..7 on an (H, W, ...) array: rotate by 90°·(k mod 4), then flip left-right if
    k ≥ 4 (the same order as :func:`ssbsn.restore.estimate.transform`)."""
    arr = np.rot90(arr, k % 4, axes=(0, 1))
    return arr[:, ::-1] if k >= 4 else arr


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


class PatchDataset(torch.utils.data.Dataset):
    """One random ``crop``×``crop`` patch per item (C, crop, crop) float32 in 0..255.

    ``repeat`` visits each image that many times per epoch. Grey images are replicated to
    ``channels`` = 3; an RGB image with ``channels`` = 1 is an error. Call
    :meth:`set_epoch` before each epoch, or index with ``(epoch, index)`` pairs.
    """

    def __init__(self, source, crop: int, channels: int = 3, augment: bool = True,
                 repeat: int = 1, seed: int = 0):
        if len(source) == 0:
            raise DataError("the training data holds no images")
        self.source, self.crop, self.channels = source, int(crop), channels
        self.augment, self.repeat, self.seed = augment, int(repeat), int(seed)
        self.epoch = 0
        for i in range(len(source)):
            h, w, c = source.shape(i)
            name = source.names[i]
            if min(h, w) < self.crop:
                raise ImageError(f"{name}: {h}×{w} is smaller than the {self.crop}×{self.crop} "
                                 "training crop (use a smaller --crop)")
            colour = c - 1 if c in (2, 4) else c  # an alpha channel is dropped
            if colour not in (1, 3) or (channels == 1 and colour == 3):
                raise ImageError(f"{name}: {c} channels do not fit a {channels}-channel model")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source) * self.repeat

    def __getitem__(self, index) -> torch.Tensor:
        """Crop ``index`` of the current epoch, or of ``epoch`` for an ``(epoch, index)`` pair
        (what training's sampler passes, so that DataLoader workers need no set_epoch)."""
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        i = index % len(self.source)
        h, w = self.source.shape(i)[:2]
        rng = sample_rng(self.seed, epoch, index)
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        patch, _ = split_alpha(self.source.crop(i, y, x, self.crop))
        if patch.shape[-1] == 1 and self.channels == 3:
            patch = np.repeat(patch, 3, axis=-1)
        if self.augment:
            patch = dihedral(patch, int(rng.integers(0, 8)))
        return torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1), dtype=np.float32))
