"""Hardening of images, the Python API's inputs, data safety and progress (issue #34): each
test fails on the behaviour the issue reports and checks the fix against an independent
oracle (Pillow, numpy, a file's bytes, the network's real forward calls)."""
import hashlib
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from ssbsn import Denoiser, SSBSN
from ssbsn.cli import main
from ssbsn.errors import ImageError, UserError
from ssbsn.images import image_shape, read_image, write_image

TINY = dict(base_channels=8, num_modules=2, ss_blocks=1)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = SSBSN(**TINY, inference=dict(r3=False))
    with torch.no_grad():  # outputs around mid-grey that vary, so 8-bit results differ
        model.bsn.tail[-1].bias.fill_(120.0)
        model.bsn.tail[-1].weight.mul_(200.0)
    path = tmp_path_factory.mktemp("w") / "m.safetensors"
    model.save(path)
    return path


@pytest.fixture(scope="module")
def denoiser(weights):
    return Denoiser.from_weights(weights, device="cpu")


def _img(shape, dtype=np.uint8, seed=0):
    hi = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape).astype(dtype)


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssbsn: error: "), err
    assert "Traceback" not in err[0] and "internal error" not in err[0]
    return err[0]


# ------------------------------------------------------------------ images

def _cmyk_jpeg(path, shape=(24, 30)):
    from PIL import Image
    rgb = _img(shape + (3,), seed=3)
    Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    with Image.open(path) as im:
        assert im.mode == "CMYK"
        return np.asarray(im.convert("RGB"))  # Pillow's own conversion: the oracle


def test_cmyk_jpeg_is_read_as_pillows_rgb(tmp_path):
    expected = _cmyk_jpeg(tmp_path / "c.jpg")
    a = read_image(tmp_path / "c.jpg")
    assert a.shape == expected.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, expected)
    assert image_shape(tmp_path / "c.jpg") == expected.shape


def test_cmyk_jpeg_everywhere_images_are_read(tmp_path, weights):
    """denoise (3 channels out, not 4), training crops, prep tiles and eval pairs see RGB."""
    from ssbsn.data import open_pairs, open_training_source
    from ssbsn.data.patches import PatchDataset
    folder = tmp_path / "in"
    folder.mkdir()
    expected = _cmyk_jpeg(folder / "c.jpg")
    assert main(["denoise", str(folder / "c.jpg"), "-o", str(tmp_path / "out.png"),
                 "-w", str(weights)]) == 0
    assert read_image(tmp_path / "out.png").shape == expected.shape
    source, _ = open_training_source([str(folder)], "folder")
    crop = PatchDataset(source, 16, 3, augment=False, repeat=1, seed=0)[(0, 0)]
    assert crop.shape == (3, 16, 16)
    assert main(["prep", str(folder), "-o", str(tmp_path / "tiles"), "--size", "16",
                 "--overlap", "0"]) == 0
    tile = read_image(tmp_path / "tiles" / "c_00000_00000.png")
    np.testing.assert_array_equal(tile, expected[:16, :16])
    (tmp_path / "clean").mkdir()
    write_image(tmp_path / "clean" / "c.png", expected)
    names, load = open_pairs(folder, tmp_path / "clean")
    np.testing.assert_array_equal(load(0)[0], expected)


def _png_header_only(path, w, h):
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4)) + chunk(b"IEND", b""))


def _tiff_header_only(path, h, w):
    """A TIFF whose header claims h×w RGB pixels and holds none of them (the file is cut
    after the header)."""
    tifffile.imwrite(path, shape=(h, w, 3), dtype="uint8", photometric="rgb")
    with open(path, "r+b") as f:
        f.truncate(4096)
    with tifffile.TiffFile(path) as t:  # the header still says so
        assert t.pages[0].shape == (h, w, 3)


@pytest.mark.parametrize("kind", ["png", "tiff"])
def test_image_bombs_are_refused_as_too_large_before_decoding(tmp_path, kind, monkeypatch):
    import tracemalloc
    path = tmp_path / ("bomb.png" if kind == "png" else "bomb.tif")
    if kind == "png":
        _png_header_only(path, 30000, 30000)
    else:
        _tiff_header_only(path, 100000, 100000)
    for f in (read_image, image_shape):
        tracemalloc.start()
        with pytest.raises(ImageError, match=r"too large.*megapixels") as e:
            f(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert str(path) in str(e.value) and "unknown error" not in str(e.value)
        assert peak < 64 << 20  # nothing near the image's size was allocated


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_tiff_comes_back_in_its_own_type(tmp_path, weights, dtype):
    a = np.random.default_rng(1).random((20, 24, 3)).astype(dtype)
    tifffile.imwrite(tmp_path / "f.tif", a, photometric="rgb")
    b = read_image(tmp_path / "f.tif")
    assert b.dtype == dtype
    np.testing.assert_array_equal(a, b)
    assert main(["denoise", str(tmp_path / "f.tif"), "-o", str(tmp_path / "o.tif"),
                 "-w", str(weights)]) == 0
    with tifffile.TiffFile(tmp_path / "o.tif") as t:
        assert t.pages[0].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype,shape", [(np.uint16, (20, 24, 3)), (np.uint16, (20, 24)),
                                         (np.float32, (20, 24, 3))])
def test_output_type_that_cannot_hold_the_samples_is_refused_before_the_work(
        tmp_path, weights, monkeypatch, capsys, dtype, shape):
    if dtype == np.uint16:
        a = _img(shape, np.uint16)
    else:
        a = np.random.default_rng(0).random(shape).astype(dtype)
    tifffile.imwrite(tmp_path / "in.tif", a, photometric="rgb" if len(shape) == 3 else None)
    out = tmp_path / ("o.png" if len(shape) == 3 else "o.jpg")
    calls = []
    monkeypatch.setattr(Denoiser, "denoise_image", lambda *a, **k: calls.append(1))
    assert main(["denoise", str(tmp_path / "in.tif"), "-o", str(out), "-w", str(weights)]) == 1
    line = _one_error_line(capsys)
    assert f"{out}:" in line and ".tmp" not in line and ".tif" in line
    assert calls == [] and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
