"""Training-crop throughput on 12-megapixel photos (SIDD Medium's size): is a training epoch
decode-bound?

Synthesises a few 4000×3000 uint8 RGB images (PNG and TIFF) in a temporary folder and times
training crops (120×120, flips, as :class:`ssbsn.data.PatchDataset` draws them) three ways:

* ``old``: what the data path did before -- decode the whole image, convert it all to float64
  then float32, then crop;
* ``new, no cache``: :class:`ssbsn.data.FileSource` with a zero cache budget -- the whole image
  is still decoded for every crop (a TIFF is memory-mapped), but only the crop is converted;
* ``new``: :class:`ssbsn.data.FileSource` as training uses it -- decoded once, kept in the
  byte-bounded cache, crop first in the stored sample type.

Every crop is checked equal to the old path's before anything is timed.

    python -m benchmarks.data_loading [--images 3] [--crops 60] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ssbsn.data import PatchDataset
from ssbsn.data.patches import FileSource, dihedral, sample_rng
from ssbsn.images import read_image, split_alpha, to_model_range, write_image


def synthesise(folder: Path, n: int, suffix: str, h: int = 3000, w: int = 4000) -> list[Path]:
    """Photo-like content (smooth gradients + noise) so PNG compresses as a photo does."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / (300 + 40 * i))[..., None] * np.cos(yy / 250)[..., None]
        img = base + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
        p = folder / f"img{i}{suffix}"
        write_image(p, np.clip(img, 0, 255).astype(np.uint8))
        paths.append(p)
    return paths


class OldStyle(torch.utils.data.Dataset):
    """The previous PatchDataset.__getitem__: the whole image to float32 (via float64) first."""

    def __init__(self, paths, crop, seed=0):
        self.paths, self.crop, self.seed = list(paths), crop, seed

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = to_model_range(split_alpha(read_image(self.paths[index % len(self.paths)]))[0])
        rng = sample_rng(self.seed, 0, index)
        h, w = img.shape[:2]
        y = int(rng.integers(0, h - self.crop + 1))
        x = int(rng.integers(0, w - self.crop + 1))
        patch = dihedral(img[y:y + self.crop, x:x + self.crop], int(rng.integers(0, 8)))
        return torch.from_numpy(np.ascontiguousarray(patch.transpose(2, 0, 1), dtype=np.float32))


def crops_per_second(dataset, count: int) -> float:
    t = time.perf_counter()
    for i in range(count):
        dataset[i]
    return count / (time.perf_counter() - t)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--crops", type=int, default=60, help="crops timed per configuration")
    ap.add_argument("--crop", type=int, default=120)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for suffix in (".png", ".tif"):
            paths = synthesise(Path(tmp), args.images, suffix)
            old = OldStyle(paths, args.crop)
            new_nocache = PatchDataset(FileSource(paths, cache_bytes=0), args.crop, repeat=10 ** 6)
            new = PatchDataset(FileSource(paths), args.crop, repeat=10 ** 6)
            for i in range(2 * args.images):  # the check: the same crops (fills the cache too)
                assert torch.equal(old[i], new[i]) and torch.equal(old[i], new_nocache[i])
            n_old = max(args.crops // 6, args.images)  # the old path is slow: fewer crops
            rows.append((suffix, "old: decode + whole image to float64/float32",
                         crops_per_second(old, n_old)))
            rows.append((suffix, "new, no cache: decode (TIFF: memory map) + crop first",
                         crops_per_second(new_nocache, n_old)))
            rows.append((suffix, "new: decoded once (cache), crop first",
                         crops_per_second(new, args.crops * 100)))
            for p in paths:
                p.unlink()
    print(f"{args.images} images 4000×3000 uint8 RGB, {args.crop}×{args.crop} crops, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print("| format | path | crops/s |\n|---|---|---|")
    for suffix, what, rate in rows:
        print(f"| {suffix[1:].upper()} | {what} | {rate:,.1f} |")


if __name__ == "__main__":
    main()
