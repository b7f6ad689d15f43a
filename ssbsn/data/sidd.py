"""SIDD: the Medium sRGB training set, the validation/benchmark block files, and the
benchmark submission.

* Medium sRGB: ``Data/<scene-instance>/<prefix>_{NOISY,GT}_SRGB_{010,011}.PNG`` where
  ``<prefix>`` is the first ``_``-separated field of the folder name (e.g. ``0001``).
* Blocks: ``ValidationNoisyBlocksSrgb.mat`` / ``ValidationGtBlocksSrgb.mat`` /
  ``BenchmarkNoisyBlocksSrgb.mat``; MATLAB files whose variable has the file's original stem
  as its name (found in a renamed file too), uint8 of shape (40, 32, 256, 256, 3)
  (images × blocks × H × W × RGB).
* Submission: ``SubmitSrgb.mat`` with ``DenoisedBlocksSrgb`` (a 40×32 cell array of uint8
  256×256×3 blocks), ``TimeMPSrgb`` (seconds per megapixel) and ``OptionalData``, as the
  SIDD benchmark kit saves it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import DataError, ImageError

SIDD_SRGB_BLOCKS = (40, 32, 256, 256, 3)
SIDD_NOISY_KEYS = ("ValidationNoisyBlocksSrgb", "BenchmarkNoisyBlocksSrgb")
SIDD_GT_KEYS = ("ValidationGtBlocksSrgb",)
SIDD_BENCHMARK_KEY = "BenchmarkNoisyBlocksSrgb"  # the blocks a submission is made from


def scan_sidd_medium(root) -> list[tuple[Path, Path]]:
    """(noisy, ground truth) PNG pairs of SIDD Medium sRGB; ``root`` is the folder holding
    ``Data/`` or ``Data/`` itself."""
    root = Path(root)
    data = root / "Data" if (root / "Data").is_dir() else root
    if not data.is_dir():
        raise DataError(f"{root}: not a folder")
    pairs = []
    for scene in sorted(p for p in data.iterdir() if p.is_dir()):
        prefix = scene.name.split("_")[0]
        for idx in ("010", "011"):
            noisy = scene / f"{prefix}_NOISY_SRGB_{idx}.PNG"
            gt = scene / f"{prefix}_GT_SRGB_{idx}.PNG"
            if noisy.is_file():
                pairs.append((noisy, gt))
    if not pairs:
        raise DataError(f"{root}: no SIDD Medium images "
                        "(expected Data/<scene>/<prefix>_NOISY_SRGB_010.PNG, ...)")
    return pairs


def is_sidd_medium(root) -> bool:
    try:
        scan_sidd_medium(root)
        return True
    except DataError:
        return False


def load_sidd_blocks(path, key=None) -> np.ndarray:
    """The uint8 (images, blocks, H, W, 3) array of a SIDD block file.

    ``key``: the variable's name, or a tuple of names to look for in this order; by default
    the file stem, then the SIDD names (:data:`SIDD_NOISY_KEYS`, :data:`SIDD_GT_KEYS`), so a
    renamed SIDD file still loads."""
    import scipy.io
    path = Path(path)
    if key is None:
        key = (path.stem,) + SIDD_NOISY_KEYS + SIDD_GT_KEYS
    wanted = (key,) if isinstance(key, str) else tuple(key)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        try:
            names = [n[0] for n in scipy.io.whosmat(path)]
            hdf5 = False
        except NotImplementedError:  # MATLAB v7.3 = HDF5; stored with the axes reversed
            import h5py
            with h5py.File(path, "r") as f:
                names = list(f.keys())
            hdf5 = True
        key = next((k for k in wanted if k in names), None)
        if key is None:
            other = [k for k in SIDD_NOISY_KEYS + SIDD_GT_KEYS if k in names]
            if wanted[0] == SIDD_BENCHMARK_KEY and other:
                raise DataError(f"{path}: these are SIDD's {other[0]}, not the benchmark's "
                                f"noisy blocks; a submission is made from "
                                f"{SIDD_BENCHMARK_KEY}.mat ('ssbsn eval' scores the "
                                "validation blocks)")
            expected = " or ".join(repr(k) for k in dict.fromkeys(wanted))
            raise DataError(f"{path}: no variable {expected} in this .mat file "
                            f"(found: {', '.join(names) or 'none'})")
        if hdf5:
            import h5py
            with h5py.File(path, "r") as f:
                arr = np.asarray(f[key]).transpose()
        else:
            arr = scipy.io.loadmat(path, variable_names=[key]).get(key)
    except DataError:
        raise
    except Exception as e:  # scipy raises ValueError, TypeError, ... on a damaged file
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: cannot read MATLAB file ({msg})") from None
    arr = np.asarray(arr)
    if arr.ndim != 5 or arr.shape[-1] not in (1, 3) or arr.dtype != np.uint8:
        raise DataError(f"{path}: {key!r} should be uint8 (images, blocks, H, W, 3), "
                        f"got {arr.dtype} {arr.shape}")
    if 0 in arr.shape:
        raise DataError(f"{path}: {key!r} holds no blocks (shape {arr.shape})")
    return arr


def _savemat_atomic(path: Path, data: dict) -> None:
    import scipy.io
    with atomic_path(path) as tmp:
        scipy.io.savemat(str(tmp), data, do_compression=True)


def write_sidd_submission(path, blocks, time_mp: float = 0.0, optional: dict | None = None):
    """Write ``SubmitSrgb.mat``: ``blocks`` is uint8 (images, blocks, H, W, 3) (any array or
    nested sequence of that shape); the cells hold one uint8 block each."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 5 or blocks.dtype != np.uint8:
        raise DataError(f"SIDD submission needs uint8 (images, blocks, H, W, 3), got "
                        f"{blocks.dtype} {blocks.shape}")
    n, m = blocks.shape[:2]
    cells = np.empty((n, m), dtype=object)
    for i in range(n):
        for j in range(m):
            cells[i, j] = np.ascontiguousarray(blocks[i, j])
    info = {"MethodName": "SS-BSN", "Authors": "", "PaperTitle":
            "SS-BSN: Attentive Blind-Spot Network for Self-Supervised Denoising with Nonlocal "
            "Self-Similarity", "Venue": "IJCAI 2023"}
    info.update(optional or {})
    try:
        _savemat_atomic(Path(path), {"DenoisedBlocksSrgb": cells, "TimeMPSrgb": float(time_mp),
                                     "OptionalData": info})
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({e.strerror or e})") from None
