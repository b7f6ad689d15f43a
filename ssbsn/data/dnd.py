"""DND (Plötz & Roth, CVPR 2017): sRGB images, bounding boxes and the bundled submission.

Layout of the download:
* ``images_srgb/0001.mat`` … ``0050.mat``: MATLAB v7.3 (HDF5) files; ``InoisySRGB`` is the
  noisy image, float in 0..1, stored with its axes reversed (h5py reads (3, W, H)).
* ``info.mat`` (HDF5): group ``info``, dataset ``boundingboxes`` of object references (one per
  image); each reference points at a (4, 20) array, i.e. 20 boxes ``[r0, c0, r1, c1]``,
  1-based and inclusive (512×512 crops).

Submission (the DND kit's ``bundle_submissions_srgb``): one ``%04d.mat`` per image holding
``Idenoised`` — a 20-cell array of float32 (H, W, 3) denoised crops in 0..1 — with
``israw = False`` and ``eval_version = "1.0"``; the folder of those 50 files is what is
uploaded.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import plain_mode
from ..errors import DataError
from .sidd import _savemat_atomic


def _h5(path):
    import h5py
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"{path}: not an HDF5 (MATLAB v7.3) file ({e})") from None


def read_dnd_boxes(info_path) -> np.ndarray:
    """int64 (images, 20, 4) array of 1-based inclusive boxes [r0, c0, r1, c1]."""
    with _h5(info_path) as f:
        if "info" not in f or "boundingboxes" not in f["info"]:
            raise DataError(f"{info_path}: no 'info/boundingboxes' (not a DND info.mat)")
        info = f["info"]
        refs = np.asarray(info["boundingboxes"]).reshape(-1)
        boxes = []
        for ref in refs:
            b = np.asarray(f[ref]).T  # stored (4, 20) → (20, 4)
            if b.ndim != 2 or b.shape[1] != 4:
                raise DataError(f"{info_path}: a bounding-box entry has shape {b.shape}, "
                                "expected (20, 4)")
            boxes.append(b.astype(np.int64))
    if not boxes:
        raise DataError(f"{info_path}: no bounding boxes")
    return np.stack(boxes)


def read_dnd_crop(image_path, box) -> np.ndarray:
    """One box of a DND sRGB image as float32 (h, w, 3) in 0..1 (reads only that region)."""
    r0, c0, r1, c1 = (int(v) for v in box)
    with _h5(image_path) as f:
        if "InoisySRGB" not in f:
            raise DataError(f"{image_path}: no 'InoisySRGB' dataset (not a DND sRGB image)")
        d = f["InoisySRGB"]
        if d.ndim != 3 or d.shape[0] != 3:
            raise DataError(f"{image_path}: 'InoisySRGB' has shape {d.shape}, expected (3, W, H)")
        if not (1 <= r0 <= r1 <= d.shape[2] and 1 <= c0 <= c1 <= d.shape[1]):
            raise DataError(f"{image_path}: box {[r0, c0, r1, c1]} outside the "
                            f"{d.shape[2]}×{d.shape[1]} image")
        crop = np.asarray(d[:, c0 - 1:c1, r0 - 1:r1]).T  # (3, w, h) → (h, w, 3)
    crop = crop.astype(np.float32)
    if not np.isfinite(crop).all():
        raise DataError(f"{image_path}: NaN or Inf in box {[r0, c0, r1, c1]}")
    lo, hi = (float(crop.min()), float(crop.max())) if crop.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:  # never clip silently: 0..255 data would come out all white
        raise DataError(f"{image_path}: 'InoisySRGB' holds samples outside 0..1 in box "
                        f"{[r0, c0, r1, c1]} (min {lo:g}, max {hi:g}); DND's sRGB images are "
                        "floats in 0..1")
    return crop


class DNDBoxes:
    """The DND benchmark as (image number, box number, path, box) entries.

    ``root`` holds ``info.mat`` and ``images_srgb/``. Numbers are 1-based as in the file names.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.boxes = read_dnd_boxes(self.root / "info.mat")
        self.entries = []
        for i, img_boxes in enumerate(self.boxes, start=1):
            path = self.root / "images_srgb" / f"{i:04d}.mat"
            if not path.is_file():
                raise DataError(f"{path}: missing (info.mat lists {len(self.boxes)} images)")
            for k, box in enumerate(img_boxes, start=1):
                self.entries.append((i, k, path, box))

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, idx: int) -> np.ndarray:
        """Box ``idx`` as float32 (h, w, 3) in 0..1."""
        _, _, path, box = self.entries[idx]
        return read_dnd_crop(path, box)


def is_dnd(root) -> bool:
    root = Path(root)
    return (root / "info.mat").is_file() and (root / "images_srgb").is_dir()


BUNDLE_FILE = re.compile(r"\d{4}\.mat")


def check_bundle_target(out_dir, overwrite: bool = False) -> None:
    """Refuse ``out_dir`` as the bundle's folder unless it is missing or empty, or, with
    ``overwrite``, a folder holding a bundle (``NNNN.mat`` files) and nothing else: a folder
    with other files is never replaced."""
    from ..errors import UserError
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if not out_dir.is_dir() or out_dir.is_symlink():
        raise UserError(f"{out_dir} exists and is not a folder")
    entries = sorted(out_dir.iterdir())
    if not entries:
        return
    if not overwrite:
        raise UserError(f"{out_dir} exists and is not an empty folder; use --overwrite to "
                        "replace the bundle in it")
    other = [p for p in entries if not (p.is_file() and BUNDLE_FILE.fullmatch(p.name))]
    if other:
        raise UserError(f"{out_dir} holds files other than a DND bundle (e.g. {other[0].name}); "
                        "it is not replaced, choose another OUT")


def write_dnd_bundle(out_dir, results: dict, overwrite: bool = False) -> list[Path]:
    """Write the bundled sRGB submission.

    ``results`` maps image number (1-based) to the list of its denoised crops (float (h, w, 3)
    in 0..1, in box order). Files go to a temporary folder beside ``out_dir`` that replaces it
    only when all are written; ``out_dir`` must not exist or be empty, or with ``overwrite``
    hold a bundle and nothing else (:func:`check_bundle_target`).
    """
    out_dir = Path(out_dir)
    try:
        check_bundle_target(out_dir, overwrite)
    except DataError:
        raise
    except ValueError as e:
        raise DataError(str(e)) from None
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=parent))
    try:
        written = []
        for i in sorted(results):
            crops = results[i]
            cells = np.empty((len(crops),), dtype=object)
            for k, c in enumerate(crops):
                cells[k] = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
            name = f"{i:04d}.mat"
            _savemat_atomic(tmp / name, {"Idenoised": cells, "israw": False,
                                         "eval_version": "1.0"})
            written.append(out_dir / name)
        os.chmod(tmp, plain_mode(out_dir, 0o777))  # not mkdtemp's 0700
        if out_dir.exists() and any(out_dir.iterdir()):  # an old bundle: moved aside first
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
            return written
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
        return written
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
